"""Memory and step time of PPO's critics against GRPO with LoRA, side by side in one run.

Run from the repository root (CPU, Linux; a few minutes on 2 idle cores):

    /work/venv/bin/python benchmarks/ppo_memory.py

Options: `--device cuda --model 0.5b` on a GPU (a Qwen2.5-0.5B-shaped model built from a local config),
`--steps 8 --repeats 2 --hidden-size 512 --num-layers 8 --completion-length 32 --threads 1`.

Three configurations train the same policy (LoRA r=8 on q_proj and v_proj) on the same prompts, with the same
batch (8 completions per step, 2 per prompt), the same fixed completion length and the same KL setting (beta = 0.05;
with PEFT the reference is the base model with the adapters disabled, so no reference copy is loaded):

- `grpo_lora`: `trl_plus.GRPOTrainer` (TRL's GRPO loss), no critic.
- `ppo_lora_critic`: `trl_plus.PPOTrainer` with the default critic: a second LoRA adapter plus a value head on the
  policy's own base model (one copy of the base weights).
- `ppo_full_critic`: `trl_plus.PPOTrainer` with a separate full critic (`value_model=` the same checkpoint, loaded
  with AutoModelForTokenClassification and fully trained).

Every run is a fresh process forked from a server that imported torch/transformers/trl once, so runs share no
allocator state. Peak memory counts everything the run allocates after the imports: the policy's weights, the
critic, optimizer states, activations and generation. On CPU it is the peak RSS (VmHWM, reset after the imports) minus
the RSS then; on CUDA `torch.cuda.max_memory_allocated` (nothing is on the GPU before). Step time is TRL's `step_time`
metric (wall time of a training step, generation included), the first 2 steps dropped, median over steps and repeats.
Runs alternate their order across repeats to cancel drift.

Target (issue 11): the LoRA critic costs at most 1.05x the memory of GRPO with LoRA, and clearly less than a
separate critic. PPO back-propagates policy and value loss at once; its critic forward is checkpointed whole so that
both graphs do not hold their activations together (one more critic forward per micro-batch: see the step time).
"""

import argparse
import os
import statistics
import tempfile
import time

from fresh_process import (
    fork_server_context,
    measured_run_settings,
    quiet_run,
    run_in_fresh_process,
    steady_environment,
    train_measured,
)

HEAVY_MODULES = ["torch", "transformers", "datasets", "peft", "trl", "trl_plus", "trl_plus.trainer.ppo"]
WARMUP_STEPS = 2
MEMORY_TARGET = 1.05
CONFIGS = ("grpo_lora", "ppo_lora_critic", "ppo_full_critic")


def digit_reward(completions, **kwargs):
    """1.0 per digit: cheap, deterministic."""
    return [float(sum(ch.isdigit() for ch in completion)) for completion in completions]


def build_model(options: dict) -> None:
    """Save the benchmark model and its character tokenizer to `options["model_path"]` (no download)."""
    from trl_plus.tiny import save_tiny_model

    if options["model"] == "0.5b":  # Qwen2.5-0.5B's shape (its 151k vocabulary aside: the tokenizer has 48 tokens)
        shape = dict(hidden_size=896, num_layers=24, intermediate_size=4864, num_attention_heads=14)
        shape.update(max_position_embeddings=4096)
    else:
        shape = dict(hidden_size=options["hidden_size"], num_layers=options["num_layers"], max_position_embeddings=512)
    save_tiny_model(options["model_path"], **shape)


def run_once(name: str, options: dict) -> dict:
    """Train one configuration in this (fresh) process; its step times (s) and peak memory (MiB)."""
    import transformers
    from datasets import Dataset
    from peft import LoraConfig

    from trl_plus import GRPOConfig, GRPOTrainer
    from trl_plus.trainer.ppo import PPOConfig, PPOTrainer

    quiet_run(options["threads"])
    on_cuda = options["device"] == "cuda"
    tokenizer = transformers.AutoTokenizer.from_pretrained(options["model_path"])
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(8) for b in range(8)]})
    settings = dict(
        measured_run_settings(options, tokenizer.eos_token_id, on_cuda),
        gradient_checkpointing=options["gradient_checkpointing"],
        per_device_train_batch_size=8,
        num_generations=2,
        learning_rate=1e-4,
        beta=0.05,
    )
    trainer_class, config_class, extra = {
        "grpo_lora": (GRPOTrainer, GRPOConfig, {}),
        "ppo_lora_critic": (PPOTrainer, PPOConfig, {}),
        "ppo_full_critic": (PPOTrainer, PPOConfig, {"value_model": options["model_path"]}),
    }[name]
    args = config_class(**settings, **extra)
    peft_config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)

    run = train_measured(
        trainer_class,
        args,
        model_path=options["model_path"],
        reward_funcs=digit_reward,
        dataset=dataset,
        peft_config=peft_config,
        on_cuda=on_cuda,
    )
    trainer = run.pop("trainer")
    return {
        **run,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["local", "0.5b"], default="local", help="'0.5b': Qwen2.5-0.5B's shape.")
    parser.add_argument("--hidden-size", type=int, default=512, help="Hidden size of the local model.")
    parser.add_argument("--num-layers", type=int, default=8, help="Layers of the local model.")
    parser.add_argument("--completion-length", type=int, default=32, help="Fixed completion length in tokens.")
    parser.add_argument("--steps", type=int, default=6, help="Training steps per run (the first 2 are warm-up).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per configuration, in alternating order.")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Activation checkpointing in all.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (CPU).")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS}")
    return args


def main() -> None:
    args = parse_args()
    steady_environment(args.device, args.threads)
    work_dir = tempfile.mkdtemp(prefix="trl-plus-ppo-memory-")
    options = {**vars(args), "work_dir": work_dir, "model_path": os.path.join(work_dir, "model")}
    context = fork_server_context(HEAVY_MODULES)
    build = context.Process(target=build_model, args=(options,))
    build.start()
    build.join()

    runs = {name: [] for name in CONFIGS}
    started = time.time()
    for repeat in range(args.repeats):
        order = CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]
        for name in order:
            runs[name].append(run_in_fresh_process(context, run_once, name, options, name))
            print(f"  repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['peak_mib']:.1f} MiB", flush=True)

    summary = {
        name: {
            "mib": statistics.median(run["peak_mib"] for run in config_runs),
            "step": statistics.median(t for run in config_runs for t in run["step_times"][WARMUP_STEPS:]),
            "trainable": config_runs[0]["trainable_params"],
            "total": config_runs[0]["total_params"],
            "lengths": config_runs[0]["lengths"],
        }
        for name, config_runs in runs.items()
    }
    base = summary["grpo_lora"]
    model_desc = f"hidden {args.hidden_size}, {args.num_layers} layers"
    model_desc = "Qwen2.5-0.5B-shaped" if args.model == "0.5b" else model_desc
    print(
        f"\nPPO critics vs GRPO with LoRA on {args.device} ({model_desc}, {base['total'] / 1e6:.1f}M params; "
        f"8 completions x {args.completion_length} tokens per step; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.repeats} repeats x {args.steps} steps, "
        f"{time.time() - started:.0f} s)"
    )
    print(f"{'configuration':<18}{'peak MiB':>10}{'x GRPO':>9}{'step s':>9}{'x GRPO':>9}{'trainable':>12}")
    for name, row in summary.items():
        print(
            f"{name:<18}{row['mib']:>10.1f}{row['mib'] / base['mib']:>9.2f}{row['step']:>9.3f}"
            f"{row['step'] / base['step']:>9.2f}{row['trainable'] / 1e6:>11.2f}M"
        )
    lora_ratio = summary["ppo_lora_critic"]["mib"] / base["mib"]
    full_ratio = summary["ppo_full_critic"]["mib"] / base["mib"]
    print(
        f"LoRA critic memory {lora_ratio:.2f}x GRPO-LoRA (target <= {MEMORY_TARGET}): "
        f"{'PASS' if lora_ratio <= MEMORY_TARGET else 'FAIL'}; separate full critic {full_ratio:.2f}x: the LoRA "
        f"critic uses {summary['ppo_lora_critic']['mib'] / summary['ppo_full_critic']['mib']:.2f}x its memory "
        f"({'PASS' if lora_ratio < full_ratio else 'FAIL'})"
    )
    lengths = {name: row["lengths"] for name, row in summary.items()}
    if any(value != [args.completion_length] for value in lengths.values()):
        print(f"warning: completion lengths were not fixed: {lengths}")


if __name__ == "__main__":
    main()
