"""The `trl-plus` command.

    trl-plus demo [--algo dapo]                  # a 1-minute CPU run, no downloads: accuracy before/after RL
    trl-plus demo --rlhf                         # reward model + PPO against it on CPU, no downloads
    trl-plus rlhf --model_name_or_path ... --preference_dataset_name ...   # RewardTrainer, then PPO against it
    trl-plus <algorithm> --model_name_or_path ... --dataset_name ... [any config flag]
    trl-plus <algorithm> --help                  # every flag of the algorithm's config
    trl-plus --help                              # the algorithms, with their papers

`trl-plus <algorithm>` trains in this process (one GPU, or the CPU). To use several GPUs, launch the same command
through accelerate: `accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml -m
trl_plus.cli dapo ...`.
"""

import argparse
import sys

from .scripts.algorithms import ALGORITHMS

DEMO_HELP = "train a tiny model on CPU in about a minute, no downloads, and show held-out accuracy before and after"
RLHF_HELP = "classic RLHF: train a reward model with TRL's RewardTrainer, then PPO against it (examples/rlhf.py)"


def _build_parser() -> argparse.ArgumentParser:
    width = max(map(len, [*ALGORITHMS, "demo", "rlhf"]))
    lines = [f"  {name:<{width}}  {a.description}\n  {'':<{width}}  {a.paper}" for name, a in ALGORITHMS.items()]
    parser = argparse.ArgumentParser(
        prog="trl-plus",
        usage="trl-plus {demo,rlhf,<algorithm>} [args]",
        description="RL-for-LLM algorithms as drop-in TRL trainers.",
        epilog=(
            f"commands:\n  {'demo':<{width}}  {DEMO_HELP} (--rlhf: the RLHF pipeline)\n"
            f"  {'rlhf':<{width}}  {RLHF_HELP}\n\nalgorithms (trl-plus <algorithm> --help for its flags):\n"
            + "\n".join(lines)
            + "\n\nexample:\n  trl-plus dapo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct "
            "--dataset_name trl-lib/DeepMath-103K --reward_funcs accuracy_reward --use_peft --output_dir out"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _version() -> str:
    from importlib.metadata import version

    return version("trl-plus")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # --help and --version exit here; other options are errors
        parser.print_help()
        return 0
    command, args = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        demo_main(args)
    elif command == "rlhf":
        from .scripts.rlhf import main as rlhf_main

        rlhf_main(args, prog="trl-plus rlhf")
    elif command in ALGORITHMS:
        from .scripts.train import main as train_main

        train_main(command, args, prog=f"trl-plus {command}")
    else:
        parser.error(f"unknown algorithm or command {command!r}; valid choices: demo, rlhf, {', '.join(ALGORITHMS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
