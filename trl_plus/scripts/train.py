"""The trl-style training script behind `trl-plus <algorithm>` and `examples/<algorithm>.py`.

    trl-plus dapo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward --use_peft --lora_target_modules all-linear --output_dir Qwen2.5-0.5B-DAPO

As TRL's own scripts, it parses the command line with `trl.TrlParser` into (`ScriptArguments`, the algorithm's
config, `trl.ModelConfig`): every config field is a flag, and `--config recipe.yaml` sets any of them from a file.
The dataset is a Hub name or a local `.json`/`.jsonl`/`.csv`/`.parquet` file whose prompts are plain text or chat
messages; rewards are named (see `trl_plus.scripts.rewards`).
"""

import os
from dataclasses import dataclass, field

import torch
import trl
from datasets import load_dataset
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .algorithms import ALGORITHMS
from .rewards import REWARD_FUNCS, get_reward_funcs

# Local data files by extension -> the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's script arguments (`dataset_name`, `dataset_config`, `dataset_train_split`, ...) plus rewards and columns.

    `dataset_name` is a Hub dataset, a local dataset folder, or a local `.json`/`.jsonl`/`.csv`/`.parquet` file.
    """

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Reward functions, summed (weights: --reward_weights). Names: {list(REWARD_FUNCS)}, or a dotted "
            "import path (my_lib.rewards.my_reward). TRL's accuracy rewards need `pip install math-verify`. "
            "Default: answer_match_reward (majority_vote_reward for ttrl, which never reads the labels)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification reward model (Hub id or path), added to the reward functions."},
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompt: plain text, or a list of chat messages ({'role', 'content'})."},
    )
    solution_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the reference answer, renamed to `solution` (what accuracy rewards read)."},
    )
    conversational: bool = field(
        default=False,
        metadata={"help": "Turn plain-text prompts into a user message, so the model's chat template is applied."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "A system message put before each prompt (implies --conversational)."}
    )


class _Parser(TrlParser):
    """`TrlParser` that asks for the model and the dataset before it builds any config: building the training config
    runs its own checks (bf16 needs a GPU, ...), whose errors would otherwise come first."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        if namespace.model_name_or_path is None:
            self.error("--model_name_or_path is required.")
        if namespace.dataset_name is None:
            self.error("--dataset_name is required (a Hub dataset or a local .json/.jsonl/.csv/.parquet file).")
        return namespace, remaining


def make_parser(algorithm: str, prog: str | None = None) -> TrlParser:
    config_class = ALGORITHMS[algorithm].config_class
    return _Parser((ScriptArguments, config_class, ModelConfig), prog=prog)


def main(algorithm: str, argv: list[str] | None = None, prog: str | None = None):
    """Train with `algorithm` (a key of `ALGORITHMS`) from command-line arguments (`sys.argv[1:]` when None).

    Returns the trainer after training and saving.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algorithm!r}; valid choices: {list(ALGORITHMS)}.")
    parser = make_parser(algorithm, prog=prog)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    quantization_config = _quantization_config(model_args, training_args)

    reward_names = script_args.reward_funcs or list(ALGORITHMS[algorithm].default_reward_funcs)
    reward_funcs = get_reward_funcs(reward_names, training_args)
    if script_args.reward_model_name_or_path:
        reward_funcs.append(script_args.reward_model_name_or_path)
    if not reward_funcs:
        parser.error("Give at least one reward: --reward_funcs or --reward_model_name_or_path.")

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    dataset = _load_dataset(script_args)
    trainer = ALGORITHMS[algorithm].trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=_split(dataset, script_args.dataset_train_split),
        eval_dataset=_split(dataset, script_args.dataset_test_split) if training_args.eval_strategy != "no" else None,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers (wandb, trackio, ...), the process group
        trainer.end()
    return trainer


def _quantization_config(model_args: ModelConfig, training_args):
    """bitsandbytes 4/8-bit loading (QLoRA with --use_peft), which needs a CUDA GPU: say so before loading anything."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if training_args.use_cpu or not torch.cuda.is_available():
        raise ValueError(
            f"{flag} quantizes the model with bitsandbytes, which needs a CUDA GPU, and this run has none "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}, use_cpu is {training_args.use_cpu}). "
            "Drop the flag to train without quantization (add --use_peft for LoRA)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{flag} needs bitsandbytes: pip install 'trl-plus[quantization]'.") from error
    return get_quantization_config(model_args)


def _load_dataset(script_args: ScriptArguments):
    """The dataset (all splits) with a `prompt` column, and a `solution` column when `solution_column` is set."""
    name = script_args.dataset_name
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(f"Cannot read {name}: local data files must end in one of {list(DATA_FILE_BUILDERS)}.")
        dataset = load_dataset(DATA_FILE_BUILDERS[extension], data_files=name, streaming=script_args.dataset_streaming)
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)

    renames = {script_args.prompt_column: "prompt"}
    if script_args.solution_column is not None:
        renames[script_args.solution_column] = "solution"
    renames = {old: new for old, new in renames.items() if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    if script_args.conversational or script_args.system_prompt is not None:
        system = (
            [] if script_args.system_prompt is None else [{"role": "system", "content": script_args.system_prompt}]
        )

        def to_messages(row):
            prompt = row["prompt"]
            return {"prompt": [*system, {"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt}

        dataset = dataset.map(to_messages)
    return dataset


def _split(dataset, split: str):
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r}; its splits are {list(dataset)}.")
    return dataset[split]
