"""Every benchmark script answers `--help`: its options are documented and its help text formats (argparse expands
`%` in help strings, so a literal percent sign that is not written `%%` crashes `--help`)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if "argparse" in path.read_text())


def test_every_benchmark_with_options_is_covered():
    assert SCRIPTS == ["gpu_check.py", "learning.py", "overhead.py", "ppo_memory.py", "sampling.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: ") and "--help" in result.stdout
