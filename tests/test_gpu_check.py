"""`benchmarks/gpu_check.py`: its dependency check, and its `--smoke` mode (CPU, tiny model, 1 step per trainer)."""

import importlib.util
import re
import sys
from pathlib import Path

from conftest import load_benchmark, run_isolated

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_missing_packages_and_gpu_are_named_and_exit_2(monkeypatch, capsys):
    gpu_check = load_benchmark("gpu_check")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util, "find_spec", lambda name: None if name in ("trl", "datasets") else find_spec(name)
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "gpu_check cannot run; missing:",
        "  - python package `trl`",
        "  - python package `datasets`",
        "  - a CUDA GPU (torch.cuda.is_available() is False; `--smoke` runs on CPU)",
    ]
    assert gpu_check.main(["--smoke"]) == 2  # smoke needs no GPU, the packages still
    assert "a CUDA GPU" not in capsys.readouterr().err


def test_smoke_run_trains_every_trainer_and_prints_ratios_to_trl():
    returncode, output = run_isolated([sys.executable, str(SCRIPT), "--smoke", "--steps", "1"], timeout_s=240)
    assert returncode == 0, output[-5000:]
    rows = dict(
        (match[0], (int(match[1]), float(match[2]), float(match[3]), float(match[4]), float(match[5])))
        for match in re.findall(r"^(\w+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", output, flags=re.M)
    )
    assert list(rows) == ["trl_grpo_lora", "dapo", "ppo_lora_critic", "vapo"], output
    assert rows["trl_grpo_lora"][2] == 1.0 and rows["trl_grpo_lora"][4] == 1.0  # the reference's own ratios
    assert [row[0] for row in rows.values()] == [8, 8, 1, 4]  # completions per prompt: each trainer's default
    base_mib, base_step = rows["trl_grpo_lora"][1], rows["trl_grpo_lora"][3]
    for name, (_, mib, mib_ratio, step_s, step_ratio) in rows.items():
        assert mib > 0 and step_s > 0, name
        # The ratios are printed to 2 decimals from unrounded figures, which are printed to 1 (MiB) and 3 (s)
        # decimals: recomputed from the printed figures they agree within those roundings.
        assert abs(mib_ratio - mib / base_mib) <= 0.005 + mib / base_mib * (0.05 / mib + 0.05 / base_mib), name
        step_rounding = step_s / base_step * (0.0005 / step_s + 0.0005 / base_step)
        assert abs(step_ratio - step_s / base_step) <= 0.005 + step_rounding + 1e-9, name
    assert "warning: completion lengths" not in output  # every completion had the forced length
