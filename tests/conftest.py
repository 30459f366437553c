import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from datasets import Dataset

from trl_plus.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Qwen2 and its character tokenizer saved locally (trainers load it by path, as they would a Hub id)."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def prompt_dataset():
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})


def digit_reward(completions, **kwargs):
    """1.0 per digit in the completion, so groups mostly differ in reward."""
    return [float(sum(ch.isdigit() for ch in completion)) for completion in completions]


def make_config(config_class, output_dir, **overrides):
    """A CPU-sized config: tiny batches, short completions, fp32, no logging to disk."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module, without running its main: its sibling imports (`fresh_process`) resolve,
    its dataclasses find their module, and the environment variables it sets for its own runs are undone."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    environment = dict(os.environ)
    sys.path.insert(0, str(BENCHMARKS))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        sys.path.remove(str(BENCHMARKS))
        os.environ.clear()
        os.environ.update(environment)
    return module


def run_isolated(command: list[str], timeout_s: float, extra_env: dict | None = None) -> tuple[int, str]:
    """Run `command` (e.g. torchrun) on CPU in its own session; on timeout kill the whole session (a deadlock shows as
    a failure, not a hung suite). Returns the exit code and the combined output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.update(extra_env or {})
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the session this call started
        output, _ = process.communicate()
        pytest.fail(f"{command} ran over {timeout_s} s:\n{output[-5000:]}")
    return process.returncode, output


requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def run_one_and_two_processes(script: Path, model_path: str, root: Path, timeout_s: float = 300) -> dict:
    """Run a `tests/distributed` check script with `python` and with `torchrun --nproc_per_node 2`, on CPU.

    Each run must exit 0 and each of its ranks must have written `rank{R}.json` and `rank{R}.pt` (see
    `fixed_batch.finish`). Returns {"single": [(summary, tensors)], "two": [rank 0's, rank 1's]}.
    """
    commands = {
        "single": [sys.executable, str(script), model_path, str(root / "single")],
        "two": [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            "--standalone",  # rendezvous on a free port the OS picks
            *(str(script), model_path, str(root / "two")),
        ],
    }
    results = {}
    for name, command in commands.items():
        returncode, output = run_isolated(command, timeout_s)
        assert returncode == 0, f"{name} run exited {returncode}:\n{output[-8000:]}"
        out_dir, num_ranks = root / name, 1 if name == "single" else 2
        missing = [rank for rank in range(num_ranks) if not (out_dir / f"rank{rank}.json").exists()]
        assert not missing, f"{name} run: ranks {missing} wrote no results:\n{output[-8000:]}"
        results[name] = [
            (json.loads((out_dir / f"rank{r}.json").read_text()), torch.load(out_dir / f"rank{r}.pt"))
            for r in range(num_ranks)
        ]
    return results
