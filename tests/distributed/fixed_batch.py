"""The fixed global batch of the torchrun checks (`check_two_process.py`, `check_ppo.py`) and their bookkeeping.

12 samples ("sample s" prompts of 4 tokens, completions of 1 to 8 tokens ending with eos, fixed rewards) are returned
by a TRL `rollout_func` instead of generated, so a 1-process and a 2-process run see the same data whatever rows each
process holds. Every prompt has the same length: no left padding, so a row's log-probs do not depend on its batch.
"""

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

COMPLETION_LENGTHS = [1, 2, 3, 2, 5, 3, 8, 4, 7, 6, 8, 5]  # valid tokens of each sample, eos included
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 2.0, -1.0, 0.0, 1.0, 1.0, 1.0, 3.0]
NUM_SAMPLES = len(COMPLETION_LENGTHS)
MAX_COMPLETION_LENGTH = max(COMPLETION_LENGTHS)
PROMPT_LENGTH = 4


def start(model_dir: str) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(rank, world size) from torchrun's environment, and the fixed batch in the tokens of `model_dir`'s tokenizer."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = make_samples(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), samples


def make_samples(vocab_size: int, eos_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The fixed global batch, by sample id: prompts `(12, 4)`, completions and mask `(12, 8)` right-padded."""
    generator = torch.Generator().manual_seed(1234)
    first_token = max(eos_token_id, pad_token_id) + 2  # skip the special tokens
    prompt_ids = torch.randint(first_token, vocab_size, (NUM_SAMPLES, PROMPT_LENGTH), generator=generator)
    completion_ids = torch.randint(first_token, vocab_size, (NUM_SAMPLES, MAX_COMPLETION_LENGTH), generator=generator)
    lengths = torch.tensor(COMPLETION_LENGTHS)
    completion_mask = (torch.arange(MAX_COMPLETION_LENGTH) < lengths.unsqueeze(1)).long()
    completion_ids[torch.arange(NUM_SAMPLES), lengths - 1] = eos_token_id  # each completion ends with eos
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "completion_mask": completion_mask}


def make_dataset():
    """The prompts "sample 0" ... "sample 11", with a `sample` column that TRL passes on to the reward function."""
    from datasets import Dataset

    sample_ids = list(range(NUM_SAMPLES))
    return Dataset.from_dict({"prompt": [f"sample {s}" for s in sample_ids], "sample": sample_ids})


def config_settings(out_dir: Path, world_size: int) -> dict:
    """Config fields every check shares: CPU in fp32, the fixed batch split evenly over the processes, no saving."""
    return dict(
        output_dir=str(out_dir / "trainer"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=NUM_SAMPLES // world_size,
        max_completion_length=MAX_COMPLETION_LENGTH,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


def fixed_data(samples) -> dict:
    """The trainer arguments that feed it the fixed batch: its rewards, its prompts and a rollout_func returning it."""
    return dict(reward_funcs=fixed_reward, train_dataset=make_dataset(), rollout_func=make_rollout_func(samples))


def make_rollout_func(samples):
    """A TRL `rollout_func` that returns each sample's fixed prompt and completion instead of generating."""

    def rollout_func(prompts, trainer):
        ids = [int(prompt.removeprefix("sample ")) for prompt in prompts]
        return {
            "prompt_ids": [samples["prompt_ids"][s].tolist() for s in ids],
            "completion_ids": [samples["completion_ids"][s, : COMPLETION_LENGTHS[s]].tolist() for s in ids],
            "logprobs": None,
        }

    return rollout_func


def fixed_reward(completions, sample, **kwargs):
    """The sample's fixed reward; `sample` is a dataset column, which TRL passes to reward functions."""
    return [REWARDS[s] for s in sample]


def check(checks: dict, name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0):
    """Record in `checks[name]` whether `actual` equals `expected` within `atol + rtol * |expected|`."""
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    checks[name] = {
        "max_abs_err": error.max().item(),
        "max_abs_expected": expected.abs().max().item(),
        "atol": atol,
        "rtol": rtol,
        "ok": bool((error <= allowed).all()) and actual.shape == expected.shape,
    }


def finish(out_dir: Path, rank: int, summary: dict, tensors: dict) -> int:
    """Write OUT_DIR/rank{R}.json and .pt and print the failed checks; the exit code."""
    checks = summary["checks"]
    summary["failures"] = sorted(name for name, result in checks.items() if not result["ok"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, out_dir / f"rank{rank}.pt")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(summary, indent=2))
    for name in summary["failures"]:
        print(f"[rank {rank}] MISMATCH {name}: {checks[name]}", file=sys.stderr)
    return 1 if summary["failures"] else 0


def exit_process(exit_code: int) -> NoReturn:
    """Leave the process group once every rank is done, then exit without finalizing the interpreter.

    A gloo worker thread can still be releasing a finished collective's tensors when Python finalizes; it then needs
    the GIL, which a finalizing interpreter refuses by ending the thread, and the process aborts ("terminate called
    without an active exception": 4 of 158 runs of check_dynamic_sampling.py). Every result is written by now, so skip
    finalization.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
