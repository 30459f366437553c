"""A tiny end-to-end run of a trl_plus trainer on CPU, with no downloads.

    python examples/quickstart_cpu.py --algo dapo --steps 10

It builds a tiny Qwen2 and a character tokenizer locally, and trains it on "a+b=" prompts with a reward for answering
with the right digits. The model is random, so the point is the plumbing (generation, rewards, the algorithm's loss
and metrics), not accuracy.
"""

import argparse
import tempfile

from datasets import Dataset

import trl_plus
from trl_plus.tiny import save_tiny_model

ALGORITHMS = {
    "grpo": (trl_plus.GRPOConfig, trl_plus.GRPOTrainer),
    "dapo": (trl_plus.DAPOConfig, trl_plus.DAPOTrainer),
    "gspo": (trl_plus.GSPOConfig, trl_plus.GSPOTrainer),
    "aspo": (trl_plus.ASPOConfig, trl_plus.ASPOTrainer),
    "rloo": (trl_plus.RLOOConfig, trl_plus.RLOOTrainer),
    "reinforce_pp": (trl_plus.ReinforcePPConfig, trl_plus.ReinforcePPTrainer),
}


def sum_digit_reward(prompts, completions, **kwargs):
    """1 for each character of the completion that matches the digits of a+b, position by position."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        a, b = prompt.rstrip("=").split("+")
        answer = str(int(a) + int(b))
        rewards.append(sum(x == y for x, y in zip(completion, answer, strict=False)) / len(answer))
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="dapo")
    parser.add_argument("--steps", type=int, default=10)
    cli = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="trl-plus-quickstart-")
    model_path = save_tiny_model(f"{workdir}/model")
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(10) for b in range(10)]})
    config_class, trainer_class = ALGORITHMS[cli.algo]
    args = config_class(
        output_dir=f"{workdir}/out",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-3,
        max_steps=cli.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        # A random tiny model rarely stops by itself: keep truncated completions in the loss.
        mask_truncated_completions=False,
    )
    trainer = trainer_class(model=model_path, reward_funcs=sum_digit_reward, args=args, train_dataset=dataset)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"{cli.algo}: mean reward first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}")


if __name__ == "__main__":
    main()
