"""`trl-plus demo`: RL raising a tiny model's accuracy on CPU in about a minute, with no downloads.

    trl-plus demo [--algo dapo] [--rl-steps 300] [--seed 0] [--output-dir trl-plus-demo]
    trl-plus demo --rlhf [...]    # classic RLHF instead: reward model, then PPO against it (`trl_plus.rlhf_demo`)

1. The task: reverse three letters (`abc:` -> `cba`), generated here; the reward is 1.0 for an exact match. 256
   held-out prompts are never trained on.
2. The model: a tiny Qwen2 with a character tokenizer (`trl_plus.tiny`), built locally.
3. Warm start: supervised training (a plain torch loop) stopped as soon as greedy held-out accuracy reaches 25%. RL
   needs a model that is partly right: a group of samples where some are right and some wrong is its only signal.
4. RL: the chosen trl_plus trainer on the prompts alone, rewarded by exact match, under TRL's progress bar.
5. Held-out accuracy (greedy decoding) after the warm start and after RL, and a PNG of the mean reward per step.
"""

import argparse
import contextlib
import itertools
import os
import random
import string
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProgressCallback
from transformers.utils import logging as transformers_logging

from .scripts.algorithms import ALGORITHMS
from .tiny import build_char_tokenizer, build_tiny_model

NUM_HELD_OUT = 256
WARM_START_TARGET = 0.25  # stop the supervised phase at this held-out accuracy
WARM_START_MAX_STEPS = 1000
WARM_START_EVAL_EVERY = 5
ANSWER_LENGTH = 3
PROMPT_LENGTH = ANSWER_LENGTH + 1  # "abc:"


# ---------------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------------


def reverse_task() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held_out) lists of (prompt, answer) for every three-letter string: `abc:` -> `cba`.

    The held-out prompts are the same for every seed, so accuracies are comparable across runs.

    >>> train, held_out = reverse_task()
    >>> len(train), len(held_out), held_out[0]
    (17320, 256, ('evr:', 'rve'))
    """
    triples = itertools.product(string.ascii_lowercase, repeat=ANSWER_LENGTH)
    examples = [("".join(letters) + ":", "".join(reversed(letters))) for letters in triples]
    random.Random(0).shuffle(examples)
    return examples[NUM_HELD_OUT:], examples[:NUM_HELD_OUT]


def exact_match_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is the answer, else 0.0 (TRL passes the dataset's `answer` column)."""
    return [float(completion.strip() == target) for completion, target in zip(completions, answer, strict=True)]


@torch.no_grad()
def accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]) -> float:
    """Fraction of `examples` whose greedy completion is exactly the answer (prompts all have the same length)."""
    was_training = model.training
    model.eval()
    inputs = tokenizer([prompt for prompt, _ in examples], return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=ANSWER_LENGTH + 2, do_sample=False)
    model.train(was_training)
    completions = tokenizer.batch_decode(output[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    answers = [answer for _, answer in examples]
    return sum(exact_match_reward(completions, answers)) / len(examples)


# ---------------------------------------------------------------------------------------------------------------------
# Warm start and RL
# ---------------------------------------------------------------------------------------------------------------------


def warm_start(
    model, tokenizer, train, held_out, seed: int, batch_size: int = 64, learning_rate: float = 3e-3
) -> tuple[int, float]:
    """Supervised training on prompt -> answer<eos> (loss on the answer only) until held-out accuracy reaches
    `WARM_START_TARGET`. Returns the number of steps taken and the held-out accuracy."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for step in range(1, WARM_START_MAX_STEPS + 1):
        batch = rng.sample(train, batch_size)
        # Prompts and answers have fixed lengths: no padding needed.
        input_ids = torch.tensor(
            [tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id] for prompt, answer in batch]
        )
        labels = input_ids.clone()
        labels[:, :PROMPT_LENGTH] = -100  # the loss is on the answer and <eos> only
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % WARM_START_EVAL_EVERY == 0:
            held_out_accuracy = accuracy(model, tokenizer, held_out)
            if held_out_accuracy >= WARM_START_TARGET:
                return step, held_out_accuracy
    raise RuntimeError(f"The warm start did not reach {WARM_START_TARGET:.0%} held-out accuracy.")


class RewardProgressCallback(ProgressCallback):
    """The trainer's progress bar with the latest mean reward on it, instead of one printed dict per logged step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "reward" in logs:
            self.training_bar.set_postfix(reward=f"{logs['reward']:.2f}")


def train_rl(algo: str, model_path: str, tokenizer, train, output_dir: str, rl_steps: int, seed: int):
    """Train the warm-started model saved at `model_path` with `algo`'s trainer; returns the trainer."""
    algorithm = ALGORITHMS[algo]
    args = algorithm.config_class(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=64,  # completions: 8 prompts x 8 samples per step
        num_generations=8,
        max_completion_length=ANSWER_LENGTH + 3,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_steps=rl_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=False,  # keep the progress bar, whatever the logging level
    )
    dataset = Dataset.from_dict({"prompt": [prompt for prompt, _ in train], "answer": [answer for _, answer in train]})
    trainer = algorithm.trainer_class(
        model=model_path,  # a path, so that algorithms with a KL term (beta > 0) can load the reference model
        reward_funcs=exact_match_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RewardProgressCallback)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _demo_environment():
    """One torch thread; of transformers, only errors and the trainer's progress bar; all restored on exit.

    The matrices are tiny: a second thread costs more in synchronization than it saves, and many times more when
    another process competes for the cores.
    """
    num_threads, verbosity = torch.get_num_threads(), transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # saving and loading bars; the trainer's bar is another
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notices about transformers' internals
            yield
    finally:
        torch.set_num_threads(num_threads)
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()


@dataclass
class DemoResult:
    """What a demo run measured. The warm-started model is in `<output_dir>/warm_start`, the RL one in
    `<output_dir>/<algo>`."""

    algo: str
    warm_start_steps: int
    accuracy_before: float  # held-out, after the warm start
    accuracy_after: float  # held-out, after RL
    rewards: list[float]  # mean reward of each RL step
    plot_path: str
    seconds: float


def run_demo(algo: str = "dapo", rl_steps: int = 300, output_dir: str = "trl-plus-demo", seed: int = 0) -> DemoResult:
    if algo not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algo!r}; valid choices: {list(ALGORITHMS)}.")
    start = time.perf_counter()
    with _demo_environment():
        train, held_out = reverse_task()
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed)
        print(f"Task: reverse three letters ({held_out[0][0]} -> {held_out[0][1]}); exact-match reward.")
        print(f"Model: tiny Qwen2, {model.num_parameters() / 1e6:.2f}M parameters, character tokenizer, CPU.")

        steps, accuracy_before = warm_start(model, tokenizer, train, held_out, seed)
        print(f"Warm start: {steps} supervised steps, held-out accuracy {accuracy_before:.1%}.")
        model_path = os.path.join(output_dir, "warm_start")
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)

        print(f"RL ({rl_steps} steps) with {ALGORITHMS[algo].description}.")
        trainer = train_rl(algo, model_path, tokenizer, train, os.path.join(output_dir, algo), rl_steps, seed)
        trainer.save_model()
        accuracy_after = accuracy(trainer.model, tokenizer, held_out)
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]

    plot_path = plot_rewards(rewards, algo, accuracy_before, accuracy_after, os.path.join(output_dir, "rewards.png"))
    return DemoResult(algo, steps, accuracy_before, accuracy_after, rewards, plot_path, time.perf_counter() - start)


def plot_rewards(rewards: list[float], algo: str, before: float, after: float, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(rewards) + 1)
    window = 10
    smoothed = [sum(rewards[max(0, i - window) : i]) / len(rewards[max(0, i - window) : i]) for i in steps]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, rewards, alpha=0.35, label="mean reward per step")
    axes.plot(steps, smoothed, label=f"moving average ({window} steps)")
    axes.set(xlabel="RL step", ylabel="mean exact-match reward", ylim=(0, 1))
    axes.set_title(f"trl-plus demo: {algo}, held-out accuracy {before:.0%} -> {after:.0%}")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> DemoResult:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--rlhf" in argv:
        from .rlhf_demo import main as rlhf_main

        return rlhf_main([arg for arg in argv if arg != "--rlhf"])
    parser = argparse.ArgumentParser(
        prog="trl-plus demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rlhf", action="store_true", help="the RLHF demo instead (trl-plus demo --rlhf --help)")
    parser.add_argument("--algo", choices=list(ALGORITHMS), default="dapo", help="the RL algorithm (default: dapo)")
    parser.add_argument("--rl-steps", type=int, default=300, help="RL steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="trl-plus-demo", help="where the models and the PNG go")
    cli = parser.parse_args(argv)
    result = run_demo(cli.algo, cli.rl_steps, cli.output_dir, cli.seed)
    print(
        f"Held-out accuracy (greedy, {NUM_HELD_OUT} prompts never trained on): {result.accuracy_before:.1%} after "
        f"the warm start -> {result.accuracy_after:.1%} after {result.algo} "
        f"({100 * (result.accuracy_after - result.accuracy_before):+.1f} points)."
    )
    print(f"Reward curve: {result.plot_path}. Total time {result.seconds:.0f} s.")
    return result


if __name__ == "__main__":
    main()
