"""The `trl-plus` command: help, subcommand help, errors, and the console script."""

import dataclasses
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from trl_plus.cli import main
from trl_plus.scripts.algorithms import ALGORITHMS


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `trl-plus <argv>` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_lists_every_algorithm_with_description_and_paper(argv, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert "demo" in out
    for name, algorithm in ALGORITHMS.items():
        assert name in out
        assert algorithm.description in out
        assert algorithm.paper in out


def test_unknown_algorithm_exits_2_listing_the_valid_ones(capsys):
    code, _, err = run_cli(["dapoo", "--model_name_or_path", "x"], capsys)
    assert code == 2
    assert "unknown algorithm or command 'dapoo'" in err
    assert f"valid choices: demo, rlhf, {', '.join(ALGORITHMS)}" in err


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_algorithm_help_shows_script_config_and_model_flags(algorithm, capsys):
    code, out, _ = run_cli([algorithm, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: trl-plus {algorithm}")
    for flag in (
        "--dataset_name",
        "--reward_funcs",
        "--num_generations",
        "--use_peft",
        "--load_in_4bit",
        "--report_to",
    ):
        assert flag in out
    # Every field of the algorithm's config is a flag.
    for config_field in dataclasses.fields(ALGORITHMS[algorithm].config_class):
        if config_field.init:
            assert f"--{config_field.name}" in out


def test_demo_help(capsys):
    code, out, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0
    assert "--algo" in out and "--rl-steps" in out and "reverse three letters" in out


def test_missing_model_is_a_usage_error(capsys):
    code, _, err = run_cli(["dapo", "--dataset_name", "data.jsonl", "--use_cpu"], capsys)
    assert code == 2
    assert "--model_name_or_path is required" in err


DATASET_REQUIRED = "--dataset_name is required (a Hub dataset or a local .json/.jsonl/.csv/.parquet file)."


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["dapo", "--dataset_name", "data.jsonl"], "--model_name_or_path is required."),
        (["vapo"], "--model_name_or_path is required."),
        (["ppo", "--model_name_or_path", "m"], DATASET_REQUIRED),
    ],
)
def test_a_missing_model_or_dataset_is_said_before_the_config_is_built(argv, error, capsys):
    # Without --use_cpu and --bf16 false, building the GPU-shaped config on a CPU machine would fail first on bf16.
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.splitlines()[-1] == f"trl-plus {argv[0]}: error: {error}"
    assert err.count("error:") == 1


def test_the_model_may_come_from_the_config_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: my-model\nlearning_rate: 1.0e-5\n")
    code, _, err = run_cli(["grpo", "--config", str(recipe)], capsys)
    assert code == 2
    assert err.splitlines()[-1] == f"trl-plus grpo: error: {DATASET_REQUIRED}"


def test_console_script():
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="trl-plus")
    assert entry_point.value == "trl_plus.cli:main"
    script = Path(sys.executable).with_name("trl-plus")
    if not script.exists():
        pytest.skip("the package is not installed with its console scripts")
    result = subprocess.run([str(script), "nope"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown algorithm or command 'nope'; valid choices: demo, rlhf, grpo, dapo" in result.stderr
