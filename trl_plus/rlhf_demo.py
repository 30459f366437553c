"""`trl-plus demo --rlhf`: classic RLHF end to end on CPU in a few minutes, with no downloads.

    trl-plus demo --rlhf [--ppo-steps 60] [--reward-steps 150] [--ptx-coef 0.0] [--beta 0.05] [--seed 0]

The InstructGPT pipeline (arXiv 2203.02155) on a toy preference task built here:

1. The task: a prompt is three letters and ":" (`abc:`); a completion should be four letters. The *true preference*,
   hidden from everything but the labeller, is the number of vowels in a well-formed completion (exactly four
   lowercase letters), and -1 for a malformed one: of two completions, the one it scores higher is preferred. A
   quarter of the labelled pairs put a malformed completion against a well-formed one, so that the reward model
   learns what the policy could drift to. 256 held-out prompts and 512 held-out pairs are never trained on.
2. Supervised policy: a tiny Qwen2 (`trl_plus.tiny`) trained to answer any prompt with four uniformly random letters
   (a plain torch loop), so it starts at the true preference of random text (about 0.77 vowels).
3. Reward model: initialized from the supervised policy and trained by TRL's `RewardTrainer` (Bradley-Terry) on
   preference pairs labelled by the true preference, tokenized as PPO scores (no eos appended: see
   `trl_plus.scripts.rlhf.pairs_tokenized_as_ppo_scores`). Its held-out pairwise accuracy is printed, scored as PPO
   scores (TRL's reward-model path: prompt + completion text).
4. PPO (`trl_plus.PPOTrainer`): a LoRA policy, a critic initialized from the reward model (its own LoRA adapter, the
   reward model's score head as the value head), a KL penalty to the supervised policy in the reward, the reward
   model's scores normalized with running statistics; optionally PPO-ptx on the supervised data (`--ptx-coef`).
5. On the held-out prompts, before and after PPO (sampled completions, temperature 1): the policy's mean reward-model
   score, its KL to the reference (the supervised policy; per sequence, in nats) and the true preference. A reward
   model score that rises while the true preference does not is the reward model being exploited. The curves of
   the three go to a PNG.
"""

import argparse
import contextlib
import itertools
import os
import random
import string
import time
from dataclasses import dataclass

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PrinterCallback, ProgressCallback
from trl import RewardConfig, RewardTrainer

from .demo import _demo_environment
from .scripts.rlhf import pairs_tokenized_as_ppo_scores
from .tiny import build_char_tokenizer, build_tiny_model
from .trainer.ppo import PPOConfig, PPOTrainer

VOWELS = "aeiou"
COMPLETION_LENGTH = 4
PROMPT_LENGTH = 4  # "abc:"
NUM_HELD_OUT_PROMPTS = 256
NUM_HELD_OUT_PAIRS = 512
NUM_TRAIN_PAIRS = 4096


# ---------------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------------


def true_preference(completion: str) -> float:
    """The hidden preference the reward model learns to imitate: the number of vowels of a well-formed completion
    (exactly four lowercase letters), -1 for any other.

    >>> true_preference("abec"), true_preference("xyzw"), true_preference("abe"), true_preference("abec5")
    (2.0, 0.0, -1.0, -1.0)
    """
    if len(completion) != COMPLETION_LENGTH or not all(c in string.ascii_lowercase for c in completion):
        return -1.0
    return float(sum(character in VOWELS for character in completion))


def true_preference_reward(completions: list[str], **kwargs) -> list[float]:
    """`true_preference` as a reward function; PPO gets it with weight 0: TRL logs it, nothing trains on it."""
    return [true_preference(completion) for completion in completions]


def random_letters(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(COMPLETION_LENGTH))


def malformed(rng: random.Random) -> str:
    """A completion of the wrong length, or with a character that is not a lowercase letter."""
    if rng.random() < 0.5:
        length = rng.choice([1, 2, 3, 5, 6])
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    letters = list(random_letters(rng))
    letters[rng.randrange(COMPLETION_LENGTH)] = rng.choice(string.digits + " +-*=?.,:")
    return "".join(letters) + ("" if rng.random() < 0.5 else rng.choice(string.ascii_lowercase + string.digits))


def preference_pairs(prompts: list[str], num_pairs: int, seed: int) -> dict[str, list[str]]:
    """{prompt, chosen, rejected}: two random completions per row whose true preferences differ, the preferred one
    chosen (the labeller)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    while len(rows["prompt"]) < num_pairs:
        first = random_letters(rng)
        second = malformed(rng) if rng.random() < 0.25 else random_letters(rng)
        if true_preference(first) == true_preference(second):
            continue
        chosen, rejected = (first, second) if true_preference(first) > true_preference(second) else (second, first)
        rows["prompt"].append(rng.choice(prompts))
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
    return rows


def prompt_split() -> tuple[list[str], list[str]]:
    """(train, held_out) prompts: every three-letter string and ":", shuffled the same way for every seed.

    >>> train, held_out = prompt_split()
    >>> len(train), len(held_out)
    (17320, 256)
    """
    prompts = ["".join(letters) + ":" for letters in itertools.product(string.ascii_lowercase, repeat=3)]
    random.Random(0).shuffle(prompts)
    return prompts[NUM_HELD_OUT_PROMPTS:], prompts[:NUM_HELD_OUT_PROMPTS]


# ---------------------------------------------------------------------------------------------------------------------
# The three stages
# ---------------------------------------------------------------------------------------------------------------------


def supervised_policy(tokenizer, prompts: list[str], seed: int, steps: int = 150, batch_size: int = 64):
    """A tiny model trained to answer a prompt with four random letters and <eos> (loss on the answer only)."""
    model = build_tiny_model(tokenizer, seed=seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [rng.choice(prompts) + random_letters(rng) for _ in range(batch_size)]
        input_ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts])
        labels = input_ids.clone()
        labels[:, :PROMPT_LENGTH] = -100
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def train_reward_model(policy_path: str, tokenizer, pairs: dict, output_dir: str, steps: int, seed: int) -> str:
    """TRL's RewardTrainer (Bradley-Terry) on the pairs, from the supervised policy's weights; returns its path."""
    model = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)
    args = RewardConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        max_steps=steps,
        lr_scheduler_type="constant",
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )
    # Tokenized as PPO will score: prompt + completion, no eos (RewardTrainer would append one).
    dataset = pairs_tokenized_as_ppo_scores(Dataset.from_dict(pairs), tokenizer)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # one printed dict per logged step otherwise
    trainer.train()
    trainer.save_model(output_dir)
    return output_dir


@torch.no_grad()
def reward_model_scores(reward_model: PreTrainedModel, tokenizer, prompts, completions) -> torch.Tensor:
    """The reward model's score of each prompt + completion text, tokenized as TRL's GRPO/PPO scores it (no special
    tokens; the rows have one length, so no padding)."""
    texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return reward_model(**encoded).logits[:, 0].float()


def pairwise_accuracy(reward_model, tokenizer, pairs: dict) -> float:
    chosen = reward_model_scores(reward_model, tokenizer, pairs["prompt"], pairs["chosen"])
    rejected = reward_model_scores(reward_model, tokenizer, pairs["prompt"], pairs["rejected"])
    return (chosen > rejected).float().mean().item()


def train_ppo(
    policy_path, reward_path, prompts, ptx_texts, output_dir, steps: int, ptx_coef: float, beta: float, seed: int
):
    """PPO with a LoRA policy and a critic initialized from the reward model (its own LoRA adapter); returns the
    trainer after training."""
    args = PPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=32,
        num_generations=1,
        max_completion_length=COMPLETION_LENGTH + 2,
        learning_rate=2e-3,
        critic_learning_rate=2e-3,
        lr_scheduler_type="constant",
        beta=beta,
        normalize_reward=True,
        reward_clip=5.0,
        reward_weights=[1.0, 0.0],  # the reward model trains; the true preference is only logged
        ptx_coef=ptx_coef,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=False,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = PPOTrainer(
        model=policy_path,  # a path: the reference is the supervised policy, the LoRA adapter disabled
        reward_funcs=[reward_path, true_preference_reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=peft_config,
        value_model=reward_path,
        ptx_dataset=Dataset.from_dict({"text": ptx_texts}) if ptx_coef > 0 else None,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_RewardModelProgress)
    trainer.train()
    return trainer


class _RewardModelProgress(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "reward" in logs:
            self.training_bar.set_postfix(rm_score=f"{logs['reward']:.2f}")


# ---------------------------------------------------------------------------------------------------------------------
# Held-out measures
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyMeasures:
    reward_model_score: float  # mean, held-out prompts
    kl: float  # mean per-sequence KL to the reference, nats
    true_preference: float  # mean vowels per completion
    samples: list[str]  # the first few prompts and completions


def _sequence_log_probs(model, input_ids, completion_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits[:, PROMPT_LENGTH - 1 : -1].float()
    log_probs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, PROMPT_LENGTH:, None]).squeeze(-1)
    return (log_probs * completion_mask).sum(-1)


@torch.no_grad()
def measure_policy(model, tokenizer, reward_model, prompts: list[str], seed: int) -> PolicyMeasures:
    """Sample one completion per held-out prompt (temperature 1, as PPO samples) and measure it. The KL to the
    reference is the per-sequence log-ratio log pi(y|x) - log pi_ref(y|x) averaged over the samples (the k1
    estimate); the reference is the model with its LoRA adapter disabled (0 for a model without one)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    encoded = tokenizer(prompts, return_tensors="pt")
    output = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=COMPLETION_LENGTH + 2)
    completion_ids = output[:, PROMPT_LENGTH:]
    is_eos = completion_ids == tokenizer.eos_token_id
    # Tokens up to and including the first <eos>: what the policy chose.
    completion_mask = (torch.cumsum(is_eos.int(), -1) - is_eos.int() == 0).float()
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    scores = reward_model_scores(reward_model, tokenizer, prompts, completions)
    log_probs = _sequence_log_probs(model, output, completion_mask)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ref_log_probs = _sequence_log_probs(model, output, completion_mask)
    else:
        ref_log_probs = log_probs
    model.train(was_training)
    return PolicyMeasures(
        reward_model_score=scores.mean().item(),
        kl=(log_probs - ref_log_probs).mean().item(),
        true_preference=sum(map(true_preference, completions)) / len(completions),
        samples=[prompt + completion for prompt, completion in zip(prompts[:6], completions, strict=False)],
    )


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RLHFDemoResult:
    reward_model_accuracy: float  # held-out pairs, scored as PPO scores them
    before: PolicyMeasures
    after: PolicyMeasures
    curves: dict[str, list[float]]  # per PPO step: "reward_model_score", "true_preference", "kl"
    plot_path: str
    seconds: float


def run_rlhf_demo(
    ppo_steps: int = 60,
    reward_steps: int = 150,
    ptx_coef: float = 0.0,
    beta: float = 0.05,
    output_dir: str = "trl-plus-rlhf-demo",
    seed: int = 0,
) -> RLHFDemoResult:
    start = time.perf_counter()
    progress_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the reward-model stage's tokenization; the trainers' own bars stay
    with _demo_environment(), contextlib.ExitStack() as stack:
        if progress_bars:
            stack.callback(datasets.enable_progress_bars)
        train_prompts, held_out_prompts = prompt_split()
        tokenizer = build_char_tokenizer()
        print("Task: prompt 'abc:', four letters back; the hidden true preference: more vowels.")
        model = supervised_policy(tokenizer, train_prompts, seed)
        policy_path = os.path.join(output_dir, "sft")
        model.save_pretrained(policy_path)
        tokenizer.save_pretrained(policy_path)

        pairs = preference_pairs(train_prompts, NUM_TRAIN_PAIRS, seed)
        held_out_pairs = preference_pairs(held_out_prompts, NUM_HELD_OUT_PAIRS, seed=10_000 + seed)
        reward_path = train_reward_model(
            policy_path, tokenizer, pairs, os.path.join(output_dir, "reward_model"), reward_steps, seed
        )
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path).eval()
        accuracy = pairwise_accuracy(reward_model, tokenizer, held_out_pairs)
        print(
            f"Reward model: {reward_steps} RewardTrainer steps on {NUM_TRAIN_PAIRS} pairs; held-out pairwise "
            f"accuracy {accuracy:.1%} (chance: 50%)."
        )
        before = measure_policy(model, tokenizer, reward_model, held_out_prompts, seed)

        ptx_texts = [prompt + random_letters(random.Random(seed + i)) for i, prompt in enumerate(train_prompts[:2048])]
        print(f"PPO ({ppo_steps} steps): LoRA policy, critic initialized from the reward model, KL to the SFT policy.")
        trainer = train_ppo(
            policy_path,
            reward_path,
            train_prompts,
            ptx_texts,
            os.path.join(output_dir, "ppo"),
            ppo_steps,
            ptx_coef,
            beta,
            seed,
        )
        trainer.save_model()
        after = measure_policy(trainer.model, tokenizer, reward_model, held_out_prompts, seed)
        history = [entry for entry in trainer.state.log_history if "reward" in entry]
        curves = {
            "reward_model_score": [entry["reward"] for entry in history],
            "true_preference": [entry["rewards/true_preference_reward/mean"] for entry in history],
            "kl": [entry.get("kl", 0.0) for entry in history],
        }
    plot_path = plot_curves(curves, os.path.join(output_dir, "rlhf.png"))
    return RLHFDemoResult(accuracy, before, after, curves, plot_path, time.perf_counter() - start)


def plot_curves(curves: dict[str, list[float]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "reward_model_score": "reward model score (mean)",
        "true_preference": "true preference (mean vowels)",
        "kl": "KL to the reference (per token)",
    }
    window = 10
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, (name, title) in zip(axes, titles.items(), strict=True):
        values = curves[name]
        steps = range(1, len(values) + 1)
        smoothed = [sum(values[max(0, i - window) : i]) / len(values[max(0, i - window) : i]) for i in steps]
        axis.plot(steps, values, alpha=0.35, label="per step (32 samples)")
        axis.plot(steps, smoothed, label=f"moving average ({window} steps)")
        axis.set(xlabel="PPO step", title=title)
    axes[0].legend(loc="lower right", fontsize="small")
    figure.suptitle("trl-plus demo --rlhf: PPO against a learned reward model")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> RLHFDemoResult:
    parser = argparse.ArgumentParser(
        prog="trl-plus demo --rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ppo-steps", type=int, default=60, help="PPO steps (default: 60)")
    parser.add_argument("--reward-steps", type=int, default=150, help="RewardTrainer steps (default: 150)")
    parser.add_argument("--ptx-coef", type=float, default=0.0, help="PPO-ptx on the supervised data (default: off)")
    parser.add_argument(
        "--beta", type=float, default=0.05, help="KL coefficient (default: 0.05; lower it to watch reward hacking)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="trl-plus-rlhf-demo", help="where the models and the PNG go")
    cli = parser.parse_args(argv)
    result = run_rlhf_demo(cli.ppo_steps, cli.reward_steps, cli.ptx_coef, cli.beta, cli.output_dir, cli.seed)
    print(f"Held-out ({NUM_HELD_OUT_PROMPTS} prompts never trained on, sampled completions):")
    print(f"  {'':28}{'before PPO':>12}{'after PPO':>12}")
    for label, name in [
        ("reward model score", "reward_model_score"),
        ("KL to the reference (nats)", "kl"),
        ("true preference (vowels)", "true_preference"),
    ]:
        print(f"  {label:28}{getattr(result.before, name):12.3f}{getattr(result.after, name):12.3f}")
    print(f"  samples before: {' '.join(result.before.samples)}")
    print(f"  samples after:  {' '.join(result.after.samples)}")
    improved = result.after.true_preference > result.before.true_preference
    print(
        "The true preference "
        + (
            "rose with the reward model's score: the policy improved."
            if improved
            else "did not rise: the policy exploited the reward model instead of improving."
        )
    )
    print(f"Curves: {result.plot_path}. Total time {result.seconds:.0f} s.")
    return result


if __name__ == "__main__":
    main()
