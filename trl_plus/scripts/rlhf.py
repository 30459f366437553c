"""The RLHF pipeline behind `trl-plus rlhf` and `examples/rlhf.py`: a reward model trained by TRL's RewardTrainer,
then PPO against it with a critic initialized from it (InstructGPT, arXiv 2203.02155), optionally with PPO-ptx.

    trl-plus rlhf --model_name_or_path <sft model> --preference_dataset_name trl-lib/ultrafeedback_binarized \\
        --use_peft --lora_target_modules all-linear --output_dir out

1. Unless `--reward_model_name_or_path` names a trained one, a reward model (sequence classification, one label) is
   trained from `--reward_model_init` (default: the policy's checkpoint, as InstructGPT) on the preference dataset
   (`chosen` / `rejected`, optionally `prompt`) by TRL's `RewardTrainer`, and saved in `<output_dir>/reward_model`.
2. PPO trains the policy against it (`reward_funcs` = the reward model, as TRL's GRPO takes one) on the prompts of
   `--dataset_name` (default: the preference dataset's `prompt` column), with `value_model` = the reward model unless
   `--value_model` says otherwise: with `--use_peft` the policy is LoRA and the critic gets a LoRA adapter of its own
   on the reward model's body, its score head becoming the value head. `--ptx_dataset_name` (a `text` column) with
   `--ptx_coef` adds PPO-ptx.

Every `PPOConfig` field is a flag (`--beta`, `--normalize_reward`, `--reward_clip`, `--kl_target`, ...), and so are
TRL's `ModelConfig` fields (`--use_peft`, `--lora_r`, ...); `--config recipe.yaml` sets any of them from a file.
"""

import os
from dataclasses import dataclass, field

import trl
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, RewardConfig, RewardTrainer, TrlParser, get_peft_config
from trl.data_utils import is_conversational

from ..trainer.ppo import PPOConfig, PPOTrainer
from .train import DATA_FILE_BUILDERS


@dataclass
class RLHFScriptArguments(trl.ScriptArguments):
    """TRL's script arguments (`dataset_name` is the prompt dataset, optional here) plus the reward model's stage."""

    preference_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Preference pairs for the reward model: `chosen`, `rejected` (and `prompt`) columns."},
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An already trained reward model (sequence classification, 1 label): skips step 1."},
    )
    reward_model_init: str | None = field(
        default=None, metadata={"help": "Checkpoint the reward model starts from. None: the policy's."}
    )
    reward_max_steps: int = field(default=1000, metadata={"help": "RewardTrainer optimizer steps."})
    reward_learning_rate: float = field(default=1e-5, metadata={"help": "RewardTrainer learning rate."})
    reward_per_device_train_batch_size: int = field(default=8, metadata={"help": "RewardTrainer batch size."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column of the prompt dataset holding prompts."})
    ptx_dataset_name: str | None = field(
        default=None, metadata={"help": "Plain text for PPO-ptx (a `text` column); needs --ptx_coef > 0."}
    )


def _load(name: str, split: str):
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(f"Cannot read {name}: local data files must end in one of {list(DATA_FILE_BUILDERS)}.")
        return load_dataset(DATA_FILE_BUILDERS[extension], data_files=name, split=split)
    return load_dataset(name, split=split)


def pairs_tokenized_as_ppo_scores(pairs, tokenizer):
    """Plain-text preference pairs tokenized as TRL's GRPO/PPO will score the policy's completions: `prompt + chosen`
    (and `+ rejected`) with no special tokens, in `chosen_ids` / `rejected_ids` (RewardTrainer then skips its own
    processing).

    RewardTrainer appends eos to plain-text pairs, while GRPO decodes completions without special tokens and scores
    `prompt + completion`: the reward model would be trained on the hidden state of eos and read on that of the last
    character, a position its head never saw (in `trl-plus demo --rlhf`, 100% training accuracy and 23% held-out
    accuracy scored as PPO scores). Chat-formatted pairs need none of this: both sides apply the chat template.
    """
    columns = pairs.column_names

    def tokenize(row):
        prompt = row["prompt"] if "prompt" in columns else ""
        return {
            f"{side}_ids": tokenizer(prompt + row[side], add_special_tokens=False)["input_ids"]
            for side in ("chosen", "rejected")
        }

    return pairs.map(tokenize, remove_columns=columns)


def train_reward_model(script_args: RLHFScriptArguments, training_args: PPOConfig, model_name: str) -> str:
    """Step 1: TRL's RewardTrainer on the preference pairs; returns the saved reward model's path."""
    output_dir = os.path.join(training_args.output_dir, "reward_model")
    reward_args = RewardConfig(
        output_dir=output_dir,
        max_steps=script_args.reward_max_steps,
        learning_rate=script_args.reward_learning_rate,
        per_device_train_batch_size=script_args.reward_per_device_train_batch_size,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        gradient_checkpointing=training_args.gradient_checkpointing,
        seed=training_args.seed,
        report_to=training_args.report_to,
        logging_steps=training_args.logging_steps,
        save_strategy="no",
        disable_tqdm=training_args.disable_tqdm,
    )
    pairs = _load(script_args.preference_dataset_name, script_args.dataset_train_split)
    init = script_args.reward_model_init or model_name
    tokenizer = AutoTokenizer.from_pretrained(init)
    if not is_conversational(pairs[0]):
        pairs = pairs_tokenized_as_ppo_scores(pairs, tokenizer)
    trainer = RewardTrainer(model=init, args=reward_args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> PPOTrainer:
    """Run the pipeline from command-line arguments (`sys.argv[1:]` when None); returns the PPO trainer."""
    parser = TrlParser((RLHFScriptArguments, PPOConfig, ModelConfig), prog=prog)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required (the supervised policy).")
    if script_args.reward_model_name_or_path is None and script_args.preference_dataset_name is None:
        parser.error("Give --preference_dataset_name (to train the reward model) or --reward_model_name_or_path.")
    if script_args.dataset_name is None and script_args.preference_dataset_name is None:
        parser.error("Give --dataset_name (the PPO prompts), or a --preference_dataset_name with a `prompt` column.")

    reward_model = script_args.reward_model_name_or_path or train_reward_model(
        script_args, training_args, model_args.model_name_or_path
    )
    prompts = _load(script_args.dataset_name or script_args.preference_dataset_name, script_args.dataset_train_split)
    if script_args.prompt_column != "prompt":
        prompts = prompts.rename_column(script_args.prompt_column, "prompt")
    prompts = prompts.select_columns(["prompt"])
    ptx = None if script_args.ptx_dataset_name is None else _load(script_args.ptx_dataset_name, "train")
    trainer = PPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[reward_model],
        args=training_args,
        train_dataset=prompts,
        peft_config=get_peft_config(model_args),
        value_model=training_args.value_model or reward_model,
        ptx_dataset=ptx,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Policy saved to {training_args.output_dir}; reward model: {reward_model}.")
    return trainer
