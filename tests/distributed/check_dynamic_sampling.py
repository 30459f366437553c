"""Two-process check of DAPO dynamic sampling; `tests/test_dynamic_sampling.py` launches it and checks its output.

    OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" torchrun --nproc_per_node 2 tests/distributed/check_dynamic_sampling.py \
        --model PATH --out DIR

Each process trains (gloo on CPU) and writes `DIR/rank{RANK}.json`: for every generation step, its own row count and
tensor shapes, the dynamic-sampling metrics, and the rows of the whole global batch (gathered: rank, prompt,
completion, reward, masked), re-scored from the decoded text. Four runs, one after the other:

- `signal`: 6 rows per process and 4 completions per prompt, so the 3 groups of a step are rows 0-3 | 4-7 | 8-11 and
  group 1 straddles the processes; `+` prompts have a reward signal, `-` prompts (about half) never do. 3 steps.
- `exhausted`: every reward is 1.0 and max_num_gen_batches=2: one step on a fully masked batch.
- `strict`: the same with dynamic_sampling_strict=True: every process must raise RuntimeError (none may hang).
- `resume`: as `signal`, 4 steps with a checkpoint after 2, then 2 steps resumed from it: the logged losses, the
  extra-prompt stream's position and the largest difference between the two runs' final weights.
- `selective`: GRESO selective rollout without dynamic sampling, 8 steps on 9 prompts (3 groups a step, 3 steps an
  epoch) whose rewards depend only on the prompt and the row's position in its group (`selective_reward`), so that a
  1-process run over the same global batches must make the same decisions. Per step: the sampler's selective-rollout
  state (history, exploration probabilities, reward range; its generator's state goes to `rank{RANK}.pt`), the
  `selective_rollout/*` and `sampling/*` metrics, the row count and the prompts of every generated round (gathered).

`--scenarios` picks the runs (default: the first four); the results are written by `fixed_batch.finish`.

An exception other than that RuntimeError fails the launch (non-zero exit code).
"""

import argparse
import os
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from fixed_batch import exit_process, finish

from trl_plus import GRPOConfig, GRPOTrainer
from trl_plus.trainer.grpo import SURPLUS_BUFFER_FILE

# `+` prompts have a reward signal, `-` prompts never do; 1- and 2-digit operands give prompts of 4 to 6 characters.
PROMPTS = [f"{a}{op}{b}=" for a in (1, 2, 11, 12) for b in (3, 14) for op in "+-"]


def signal_reward(prompts, completions, **kwargs):
    """`+` prompts: sum of character codes mod 5 (varies with the completion); `-` prompts: always 1.0."""
    return [float(sum(map(ord, c)) % 5) if "+" in p else 1.0 for p, c in zip(prompts, completions, strict=True)]


def constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


# `a` prompts are always rewarded 0 (zero-variance, unsolved), `c` prompts always 3 (zero-variance, solved once the
# range [0, 3] has been seen), `b` prompts by the row's position in its group (0, 1, 2, 3: always a signal).
SELECTIVE_PROMPTS = [f"{kind}{index}=" for kind in "abc" for index in range(3)]
SELECTIVE_GROUP_SIZE = 4


def selective_reward(prompts, completions, **kwargs):
    """Depends only on the prompt and the row's global position (the rows of a step are global in rank order and each
    process holds as many), never on the completion: a 1- and a 2-process run see the same rewards."""
    offset = int(os.environ.get("RANK", "0")) * len(prompts)
    rewards = {"a": lambda row: 0.0, "b": lambda row: float(row % SELECTIVE_GROUP_SIZE), "c": lambda row: 3.0}
    return [rewards[prompt[0]](offset + index) for index, prompt in enumerate(prompts)]


class MicroBatchRecorder(GRPOTrainer):
    """Records the row count and loss of every micro-batch trained; `tests/test_dynamic_sampling.py` builds on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batch_rows = []
        self.micro_batch_losses = []

    def latest_dynamic_sampling_metrics(self) -> dict:
        return {
            name.removeprefix("dynamic_sampling/"): values[-1]
            for name, values in self._metrics["train"].items()
            if name.startswith("dynamic_sampling/")
        }

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.micro_batch_rows.append(inputs["completion_ids"].size(0))
        self.micro_batch_losses.append(loss.item())
        return loss


class RecordingTrainer(MicroBatchRecorder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        tokenizer = self.processing_class
        prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        rewards = self.reward_funcs[0](prompts=prompts, completions=completions)
        masked = (batch["completion_mask"].sum(dim=1) == 0).tolist()
        rank = self.accelerator.process_index
        rows = [
            {"rank": rank, "prompt": p, "completion": c, "reward": r, "masked": m}
            for p, c, r, m in zip(prompts, completions, rewards, masked, strict=True)
        ]
        self.records.append(
            {
                "num_rows": batch["completion_ids"].size(0),
                "shapes": {key: list(value.shape) for key, value in batch.items() if value.dim() > 0},
                "num_items_in_batch": batch["num_items_in_batch"].item(),
                "global_loss_tokens": self.accelerator.gather(batch["completion_mask"].sum()).sum().item(),
                "metrics": self.latest_dynamic_sampling_metrics(),
                "global_rows": gather_object(rows),
            }
        )
        return batch


def make_trainer(model, output_dir, reward, **overrides):
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=6,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dynamic_sampling=True,
    )
    settings.update(overrides)
    args = GRPOConfig(**settings)
    return RecordingTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )


def run(model, output_dir, reward, **overrides):
    trainer = make_trainer(model, output_dir, reward, **overrides)
    error = None
    try:
        trainer.train()
    except RuntimeError as exc:
        if "max_num_gen_batches" not in str(exc):
            raise
        error = str(exc)
    return {
        "steps": trainer.records,
        "micro_batch_rows": trainer.micro_batch_rows,
        "micro_batch_losses": trainer.micro_batch_losses,
        "error": error,
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
    }


def resume(model, output_dir):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = os.path.join(output_dir, "uninterrupted", "checkpoint-2")
    trainers = {}
    for name, resume_from_checkpoint in (("uninterrupted", None), ("resumed", checkpoint)):
        trainers[name] = make_trainer(model, os.path.join(output_dir, name), signal_reward, **settings)
        trainers[name].train(resume_from_checkpoint=resume_from_checkpoint)
    weights = dict(trainers["uninterrupted"].model.named_parameters())
    saved_stream = torch.load(os.path.join(checkpoint, SURPLUS_BUFFER_FILE), weights_only=True)["prompt_stream"]
    return {
        **{
            name: {
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                "rounds": [entry["dynamic_sampling/rounds"] for entry in trainer.state.log_history if "loss" in entry],
                "stream": trainer._sampler.prompt_stream.state_dict(),
            }
            for name, trainer in trainers.items()
        },
        "saved_stream": saved_stream,
        "max_weight_difference": max(
            (param - weights[name]).abs().max().item() for name, param in trainers["resumed"].model.named_parameters()
        ),
    }


class SelectiveRecorder(GRPOTrainer):
    """Records, per training step, the selective-rollout state and metrics, the row count and the generated rounds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records, self.generator_states, self._rounds = [], [], []

    def _generate_and_score_round(self, inputs):
        output = super()._generate_and_score_round(inputs)
        if self.model.training:  # every process generates every round: the gather runs everywhere
            self._rounds.append(gather_object([row["prompt"] for row in inputs]))
        return output

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        state = self._sampler.state_dict()["selective_rollout"]
        self.generator_states.append(state.pop("generator"))
        metrics = {
            name: values[-1]
            for name, values in self._metrics["train"].items()
            if name.startswith(("selective_rollout/", "sampling/"))
        }
        self.records.append(
            {"state": state, "metrics": metrics, "num_rows": batch["completion_ids"].size(0), "rounds": self._rounds}
        )
        self._rounds = []
        return batch


def selective(model, output_dir):
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(SELECTIVE_PROMPTS) * SELECTIVE_GROUP_SIZE // 3 // world_size(),
        num_generations=SELECTIVE_GROUP_SIZE,
        max_completion_length=4,
        learning_rate=1e-2,
        max_steps=8,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        selective_rollout=True,
        selective_rollout_exploration=0.2,
    )
    trainer = SelectiveRecorder(
        model=model,
        reward_funcs=selective_reward,
        args=GRPOConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": SELECTIVE_PROMPTS}),
    )
    trainer.train()
    results = {
        "steps": trainer.records,
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
    }
    return results, {"generator_states": torch.stack(trainer.generator_states)}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


SCENARIOS = ("signal", "exhausted", "strict", "resume", "selective")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=SCENARIOS[:4])
    cli = parser.parse_args()
    out = cli.out
    runs = {
        "signal": lambda: run(cli.model, os.path.join(out, "signal"), signal_reward),
        "exhausted": lambda: run(
            cli.model, os.path.join(out, "exhausted"), constant_reward, max_steps=1, max_num_gen_batches=2
        ),
        "strict": lambda: run(
            cli.model,
            os.path.join(out, "strict"),
            constant_reward,
            max_steps=1,
            max_num_gen_batches=2,
            dynamic_sampling_strict=True,
        ),
        "resume": lambda: resume(cli.model, os.path.join(out, "resume")),
    }
    results, tensors = {}, {}
    for name in cli.scenarios:
        if name == "selective":
            results[name], tensors[name] = selective(cli.model, os.path.join(out, name))
        else:
            results[name] = runs[name]()
    results["world_size"] = world_size()
    results["checks"] = {}  # everything is checked by the tests, from these files
    return finish(Path(out), int(os.environ.get("RANK", "0")), results, tensors)


if __name__ == "__main__":
    exit_process(main())
