"""Every `examples/<algorithm>.py` trains 2 steps on CPU: a tiny model saved locally, a local JSONL dataset.

The scripts run in this process (`runpy`, as `python examples/<algorithm>.py` would), which saves a Python start and
the imports per script. Also: LoRA, chat-formatted prompts, a CSV file, and the errors a user meets first.
"""

import argparse
import ast
import json
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trl_plus.scripts.algorithms import ALGORITHMS
from trl_plus.scripts.rewards import answer_match_reward, get_reward_funcs
from trl_plus.scripts.train import main, make_parser
from trl_plus.tiny import save_tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# A character-level chat template, so that conversational prompts work with the tiny tokenizer.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


@pytest.fixture(scope="module")
def chat_model_path(tmp_path_factory):
    path = save_tiny_model(str(tmp_path_factory.mktemp("tiny-chat-model")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory):
    """Plain-text prompts with the answer in a column named like GSM8K's."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"question": f"{a}+{b}", "answer": f"#### {a + b}"} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def cpu_args(model_path, dataset_path, output_dir, *extra):
    """A 2-step CPU run on `dataset_path` (columns `question` and `answer` unless `extra` says otherwise)."""
    return [
        "--model_name_or_path", model_path,
        "--dataset_name", dataset_path,
        "--prompt_column", "question",
        "--solution_column", "answer",
        "--reward_funcs", "answer_match_reward",
        "--output_dir", str(output_dir),
        "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
        "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--max_num_gen_batches", "2", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_every_algorithm_has_an_example():
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts == set(ALGORITHMS) | {"rlhf"}  # rlhf.py: the pipeline of two trainers, tests/test_rlhf_pipeline.py


def docstring_commands(script: Path) -> list[list[str]]:
    """The commands in a script's docstring (`python ...` or `accelerate launch ...`, with `\\` continuations)."""
    lines = ast.get_docstring(ast.parse(script.read_text())).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip().startswith(("python ", "accelerate launch "))]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_docstring_commands_use_only_known_flags(algorithm):
    script = EXAMPLES / f"{algorithm}.py"
    commands = docstring_commands(script)
    assert [command[0] for command in commands] == ["python", "accelerate"]  # one GPU, then several
    parser = make_parser(algorithm)
    for command in commands:
        script_args = command[command.index(f"examples/{algorithm}.py") + 1 :]
        if command[0] == "accelerate":
            assert (EXAMPLES.parent / command[command.index("--config_file") + 1]).is_file()
        # argparse alone: flags and value types are checked, without building the configs (bf16 needs a GPU).
        _, unknown = argparse.ArgumentParser.parse_known_args(parser, script_args)
        assert unknown == [], f"{script.name}: {unknown}"


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_example_trains_two_steps(algorithm, tiny_model_path, jsonl_dataset, tmp_path, monkeypatch):
    script = EXAMPLES / f"{algorithm}.py"
    extra = ["--value_pretrain_steps", "1"] if algorithm == "vapo" else []  # VAPO's 50 would take both steps
    monkeypatch.setattr(sys, "argv", [str(script), *cpu_args(tiny_model_path, jsonl_dataset, tmp_path, *extra)])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "model.safetensors").exists()


def test_lora_and_chat_prompts(chat_model_path, jsonl_dataset, tmp_path):
    argv = cpu_args(
        chat_model_path, jsonl_dataset, tmp_path,
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear", "--system_prompt", "sum",
    )  # fmt: skip
    trainer = main("dapo", argv)
    assert trainer.state.global_step == 2
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    assert trainer.train_dataset[0]["prompt"] == [
        {"role": "system", "content": "sum"},
        {"role": "user", "content": "0+0"},
    ]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_csv_dataset_with_default_columns(tiny_model_path, tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("prompt,solution\n" + "".join(f"{a}+{b}=,{a + b}\n" for a in range(4) for b in range(4)))
    columns = ["--prompt_column", "prompt", "--solution_column", "solution"]  # the defaults TRL's datasets use
    trainer = main("grpo", cpu_args(tiny_model_path, str(path), tmp_path / "out", *columns))
    assert trainer.state.global_step == 2


def test_load_in_4bit_on_cpu_is_a_clear_error(tiny_model_path, jsonl_dataset, tmp_path):
    with pytest.raises(
        ValueError, match="--load_in_4bit quantizes the model with bitsandbytes, which needs a CUDA GPU"
    ):
        main("dapo", cpu_args(tiny_model_path, jsonl_dataset, tmp_path, "--use_peft", "--load_in_4bit"))


def test_unknown_reward_lists_the_names(tiny_model_path, jsonl_dataset, tmp_path):
    argv = cpu_args(tiny_model_path, jsonl_dataset, tmp_path)
    argv[argv.index("answer_match_reward")] = "acuracy_reward"
    with pytest.raises(
        ValueError, match="Unknown reward function 'acuracy_reward': expected one of .*accuracy_reward"
    ):
        main("dapo", argv)


def test_missing_split_names_the_splits(tiny_model_path, jsonl_dataset, tmp_path):
    argv = cpu_args(tiny_model_path, jsonl_dataset, tmp_path, "--eval_strategy", "steps", "--eval_steps", "1")
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train'\]"):
        main("dapo", argv)


def test_reward_registry(tmp_path):
    from trl_plus import DAPOConfig

    args = DAPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_completion_length=100)
    penalty, vote, match = get_reward_funcs(
        ["get_soft_overlong_punishment", "majority_vote_reward", "answer_match_reward"], args
    )
    assert penalty(completion_ids=[[0] * 80, [0] * 90]) == [0.0, -0.5]  # L_max 100, L_cache 20
    assert vote(prompts=["q"] * 3, completions=["1", "1", "2"]) == [1.0, 1.0, 0.0]
    assert match is answer_match_reward
    assert match(completions=[[{"role": "assistant", "content": "it is 7"}]], answer=["#### 7"]) == [1.0]
    args.overlong_buffer_len = 20
    with pytest.raises(ValueError, match="already adds DAPO's overlong penalty"):
        get_reward_funcs(["get_soft_overlong_punishment"], args)
