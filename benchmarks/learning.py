"""Learning benchmark: held-out accuracy of every algorithm on the demo's toy task, at equal generated samples.

Run from the repository root (CPU; about 20 minutes on 2 cores, 11 with `--workers 2`):

    /work/venv/bin/python benchmarks/learning.py

Options: `--seeds 0 1 2 --budget 51200 --eval-every 1280 --target 0.8 --algos trl_grpo dapo ... --workers 1`.

The task is `trl-plus demo`'s (`trl_plus.demo`): reverse three letters (`abc:` -> `cba`), exact-match reward, 256
held-out prompts never trained on, a tiny Qwen2 with a character tokenizer. Per seed, the supervised warm start
(`trl_plus.demo.warm_start`, stopped at 25% held-out accuracy) runs once and is saved; every algorithm then starts
from that checkpoint with the same seed and the demo's RL settings (64 completions per step: 8 prompts x 8 samples,
completions of at most 6 tokens, learning rate 1e-3 constant). Each algorithm keeps its own defaults otherwise:

- `trl_grpo`, `trl_rloo`: TRL's own `GRPOTrainer` / `RLOOTrainer` (TRL 1.16 defaults; `RLOOConfig` has beta 0.05,
  which loads a reference model) with the same batch: `per_device_train_batch_size` counts completions in both.
- `grpo`, `dapo`, `gspo`, `aspo`, `rloo`, `remax`, `reinforce_pp`: the trl_plus trainers with their preset
  configs. `dapo` has dynamic sampling on; `aspo` makes 2 optimizer steps per generation (`steps_per_generation=2`,
  as its config recommends: ASPO reweights off-policy tokens); `remax` decodes 1 greedy baseline per group of 8.
- `ppo`, `vapo`: a full critic initialized from the policy's checkpoint (no PEFT); their configs keep their own
  `num_generations` (PPO 1, VAPO 4), so they see more prompts for the same samples.
- `ttrl`: TTRL (arXiv 2504.16084), GRPO trained without labels: a completion is rewarded when it is the majority
  answer of 16 completions of its prompt (`ttrl_num_votes=16`), 8 of which are trained on, and a tie gives no label
  (`MajorityVoteReward(ties="none")`). The 8 vote-only completions per prompt count in the budget, so it makes half
  the optimizer steps. `ttrl_vote8` (outside the default set): the vote over the 8 trained completions only, a tie
  to the first answer, as TTRL ran before the vote/train split.

Budget. Runs are compared at the same number of generated completions, not steps: a callback counts every
completion the trainer generates (its `_generate` calls: DAPO's extra dynamic-sampling rounds, its dropped groups
and its surplus-buffer groups, and ReMax's greedy rows all count) and stops training when the budget is reached.
Dynamic sampling gets at most as many rounds as the remaining budget pays for (`max_num_gen_batches` is lowered
before the last steps; a batch the rounds do not fill has its missing groups masked out of the loss, as when
`max_num_gen_batches` runs out), so no run generates more than the budget. Held-out accuracy (greedy,
`trl_plus.demo.accuracy`) is measured every `--eval-every` generated samples, at the end of a generation cycle, which
gives the learning curves and the samples needed to reach `--target` accuracy. Time per step and per 1k samples
exclude these evaluations. The default budget, 51,200 completions (800 demo steps), is where the curves have
flattened: final accuracy then compares where the runs end up, and samples-to-target compares how fast they get
there (at half that budget most runs are still climbing, and the final column would measure speed twice).

Writes `benchmarks/results/learning.md` (the table) and `benchmarks/results/learning.png` (mean accuracy vs generated
samples per algorithm, with a +-1 std band over seeds) and `runs.json` (every run's measurements and curves), and puts
the table between the results markers of `benchmarks/README.md` and of the project's README. `--setting entropy` also
writes `entropy.png` (token entropy vs generated samples).
"""

import argparse
import datetime
import itertools
import json
import logging
import multiprocessing
import operator
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Before torch is imported: one OpenMP thread per run (tiny matrices; a busy machine makes waiting threads costly).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH_SIZE = 64  # completions per optimizer step, as in `trl-plus demo`
NUM_GENERATIONS = 8
README_START, README_END = "<!-- learning.py results: start -->", "<!-- learning.py results: end -->"
KEEP_DEFAULT = object()  # an override that removes a common setting, so the config's own default applies
AEPO_TARGET_ENTROPY = 0.5  # nats: the entropy setting's AEPO target, the authors' `entropy_base` (see ENTROPY)


@dataclass(frozen=True)
class Spec:
    """One algorithm: where its trainer and config come from and the settings that differ from the common ones."""

    name: str
    module: str  # "trl" or "trl_plus"
    trainer: str
    config: str
    overrides: dict = field(default_factory=dict)
    # TTRL (arXiv 2504.16084): train without labels on the majority vote, with this tie rule ("first" or "none");
    # None: the demo's exact-match reward.
    ttrl_ties: str | None = None

    @property
    def label(self) -> str:
        return f"{self.module}.{self.trainer}"


SPECS = [
    Spec("trl_grpo", "trl", "GRPOTrainer", "GRPOConfig"),
    Spec("trl_rloo", "trl", "RLOOTrainer", "RLOOConfig"),
    Spec("grpo", "trl_plus", "GRPOTrainer", "GRPOConfig"),
    Spec("dapo", "trl_plus", "DAPOTrainer", "DAPOConfig"),
    Spec("gspo", "trl_plus", "GSPOTrainer", "GSPOConfig"),
    Spec("aspo", "trl_plus", "ASPOTrainer", "ASPOConfig", {"steps_per_generation": 2}),
    Spec("rloo", "trl_plus", "RLOOTrainer", "RLOOConfig"),
    Spec("remax", "trl_plus", "ReMaxTrainer", "ReMaxConfig"),
    Spec("reinforce_pp", "trl_plus", "ReinforcePPTrainer", "ReinforcePPConfig"),
    Spec("ppo", "trl_plus", "PPOTrainer", "PPOConfig", {"num_generations": KEEP_DEFAULT}),
    Spec("vapo", "trl_plus", "VAPOTrainer", "VAPOConfig", {"num_generations": KEEP_DEFAULT}),
    # TTRL as its paper runs it: 16 votes per prompt, 8 of them trained on; a tie gives no label (no reward).
    Spec("ttrl", "trl_plus", "GRPOTrainer", "GRPOConfig", {"ttrl_num_votes": 2 * NUM_GENERATIONS}, ttrl_ties="none"),
]
DEFAULT_ALGOS = [spec.name for spec in SPECS]
SPECS += [  # GRESO selective rollout (arXiv 2506.02177), measured in the multi-epoch setting
    Spec("dapo_sr", "trl_plus", "DAPOTrainer", "DAPOConfig", {"selective_rollout": True}),
    Spec("grpo_sr", "trl_plus", "GRPOTrainer", "GRPOConfig", {"selective_rollout": True}),
    # TTRL before the vote/train split: the vote is over the 8 trained completions, a tie goes to the first answer.
    Spec("ttrl_vote8", "trl_plus", "GRPOTrainer", "GRPOConfig", ttrl_ties="first"),
]
SPECS += [  # entropy-collapse remedies (issue 13), measured in the entropy setting
    Spec("clip_cov", "trl_plus", "GRPOTrainer", "GRPOConfig", {"loss_type": "clip_cov"}),
    Spec("pf_ppo", "trl_plus", "GRPOTrainer", "GRPOConfig", {"policy_filtration": "best_of_n"}),
    Spec("aepo", "trl_plus", "GRPOTrainer", "GRPOConfig", {"aepo_target_entropy": AEPO_TARGET_ENTROPY}),
    Spec("entropy_adv", "trl_plus", "GRPOTrainer", "GRPOConfig", {"entropy_advantage_alpha": 0.4}),
    Spec("gppo", "trl_plus", "GRPOTrainer", "GRPOConfig", {"loss_type": "gppo"}),
]
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}
# The multi-epoch setting: a pool of 512 training prompts, each visited about 5 times in the budget (2,560 groups of 8
# samples), so prompts that are always solved or never solved come back and selective rollout has a history to use.
# The issue asks for at least 4 visits per prompt; 512 is the largest power of two that gives them. A smaller pool is
# a memorization regime: with 128 prompts (20 visits) held-out accuracy plateaued at 35-56% and TRL GRPO collapsed to
# 0% on one seed of three (lr 1e-3), so "samples to TRL GRPO's final accuracy" measured that collapse, not learning.
# A quarter of the pool is out of reach (`unanswerable_pool`), as the problems of a math set that a model never solves:
# on the reverse task alone a zero-variance group is followed by another at the prompt's next visit only 41% (all
# solved) and 51% (all wrong) of the time (plain GRPO, seed 3, not a reported seed), since one rule solves every
# prompt; GRESO's premise is that zero-variance prompts stay so, and the issue asks for prompts that stay never-solved.
MULTI_EPOCH = {
    "pool": 512,
    "unanswerable": 0.25,
    "budget": 20480,
    "eval_every": 1024,
    "algos": ["trl_grpo", "dapo", "dapo_sr", "grpo_sr"],
    "output_dir": os.path.join(RESULTS_DIR, "multi_epoch"),
}

# The entropy setting: the demo's learning rate and half its budget, over which plain GRPO's token entropy falls from
# ~2 nats at the warm start toward 0 while its groups become all-equal (at 2e-3 and 3e-3 GRPO diverges instead: 0%
# accuracy, entropy rising). TRL's GRPO and the remedies of issue 13 at their papers' defaults (PF-PPO: best-of-N;
# AEPO: the authors' target 0.5 nats and 1.2 / 0.8, 60 samples, a quarter of the prompts; entropy-shaped advantages:
# alpha 0.4, kappa 2; Clip-Cov and GPPO: their registered defaults), with the entropy curve of every run.
ENTROPY = {
    "budget": 25600,
    "eval_every": 1280,
    "learning_rate": 1e-3,
    "algos": ["trl_grpo", "clip_cov", "pf_ppo", "aepo", "entropy_adv", "gppo"],
    "output_dir": os.path.join(RESULTS_DIR, "entropy"),
}


def resolve(spec: Spec) -> tuple[type, type]:
    """(trainer class, config class)."""
    import importlib

    module = importlib.import_module(spec.module)
    return getattr(module, spec.trainer), getattr(module, spec.config)


# ---------------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------------


def _quiet() -> None:
    """One torch thread; of transformers, TRL and trl_plus, errors only; no progress bars or deprecation notices."""
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for name in ("trl", "trl_plus"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class SampleBudget(TrainerCallback):
    """Counts generated completions, evaluates held-out accuracy on a sample grid and stops at the sample budget.

    Evaluations and the stop happen at the end of a generation cycle (`steps_per_generation * num_iterations`
    optimizer steps), so every generated completion has been trained on when accuracy is measured.
    """

    def __init__(self, trainer, tokenizer, held_out, budget: int, eval_every: int, first_accuracy: float):
        from trl_plus.demo import accuracy

        self.trainer, self.tokenizer, self.held_out, self._accuracy = trainer, tokenizer, held_out, accuracy
        self.budget, self.eval_every = budget, eval_every
        self.curve = [(0, first_accuracy)]  # (generated samples, held-out accuracy)
        self.next_eval = eval_every
        self.train_seconds = 0.0  # wall time of the optimizer steps, evaluations excluded
        self.steps = 0
        args = trainer.args
        self.cycle = max(1, args.steps_per_generation * args.num_iterations // args.gradient_accumulation_steps)
        self.generation_batch = args.generation_batch_size
        self.dynamic_sampling = getattr(args, "dynamic_sampling", False)
        self.max_rounds = getattr(args, "max_num_gen_batches", 1)
        self._counter = getattr(trainer, "_generation_counter", None)  # trl_plus: the trainer's own count
        if self._counter is None:  # TRL's GRPO and RLOO trainers: prompt_ids, completion_ids, ... = _generate()
            generate = trainer._generate

            def counting_generate(*generate_args, **generate_kwargs):
                output = generate(*generate_args, **generate_kwargs)
                if trainer.model.training:
                    self._own_count += len(output[1])
                return output

            self._own_count = 0
            trainer._generate = counting_generate

    @property
    def samples(self) -> int:
        """Generated completions so far: trl_plus's `generation/completions` metric, or this callback's count."""
        return self._counter.completions if self._counter is not None else self._own_count

    def _limit_rounds(self) -> None:
        """Dynamic sampling: no more rounds in the next step than the remaining budget pays for."""
        if self.dynamic_sampling:
            affordable = (self.budget - self.samples) // self.generation_batch
            self.trainer._sampler.max_num_gen_batches = max(1, min(self.max_rounds, affordable))  # read per step

    def on_train_begin(self, args, state, control, **kwargs):
        self._limit_rounds()

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._started
        self.steps += 1
        if state.global_step % self.cycle:
            return
        if self.samples >= self.next_eval or self.samples >= self.budget:
            self.curve.append((self.samples, self._accuracy(self.trainer.model, self.tokenizer, self.held_out)))
            while self.next_eval <= self.samples:
                self.next_eval += self.eval_every
        if self.samples >= self.budget:
            control.should_training_stop = True
        self._limit_rounds()


def run_one(job: dict) -> dict:
    """Train one algorithm from one seed's warm-started checkpoint until the sample budget; return its measurements."""
    _quiet()
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback

    from trl_plus.demo import ANSWER_LENGTH, exact_match_reward, reverse_task
    from trl_plus.rewards import MajorityVoteReward

    spec = SPECS_BY_NAME[job["algo"]]
    trainer_class, config_class = resolve(spec)
    train, held_out = reverse_task()
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    # The demo's RL settings (`trl_plus.demo.train_rl`), with a step cap the budget callback reaches first.
    settings = dict(
        output_dir=job["output_dir"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=BATCH_SIZE,
        num_generations=NUM_GENERATIONS,
        max_completion_length=ANSWER_LENGTH + 3,
        learning_rate=job.get("learning_rate") or 1e-3,
        lr_scheduler_type="constant",
        max_steps=10 * job["budget"] // BATCH_SIZE + 10,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=job["seed"],
        disable_tqdm=True,
    )
    for key, value in spec.overrides.items():
        if value is KEEP_DEFAULT:
            settings.pop(key)
        else:
            settings[key] = value
    args = config_class(**settings)
    train = train[: job["pool"]] if job.get("pool") else train
    train = unanswerable_pool(train, job.get("unanswerable", 0.0))
    dataset = Dataset.from_dict({"prompt": [prompt for prompt, _ in train], "answer": [answer for _, answer in train]})
    started = time.perf_counter()
    reward = outcomes = GroupOutcomes(exact_match_reward, NUM_GENERATIONS)
    if spec.ttrl_ties is not None:  # the `answer` column is read only by the ttrl/label_accuracy metric
        reward = MajorityVoteReward(extractor=_whole_completion, equivalent=operator.eq, ties=spec.ttrl_ties)
    trainer = trainer_class(
        model=job["model_path"],  # a path: algorithms with beta > 0 rebuild the reference model from it
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    budget = SampleBudget(trainer, tokenizer, held_out, job["budget"], job["eval_every"], job["warm_start_accuracy"])
    trainer.add_callback(budget)
    trainer.train()
    rounds = [
        entry["dynamic_sampling/rounds"] for entry in trainer.state.log_history if "dynamic_sampling/rounds" in entry
    ]
    skipped = [
        entry["selective_rollout/prompts_skipped"]
        for entry in trainer.state.log_history
        if "selective_rollout/prompts_skipped" in entry
    ]
    # PPO / VAPO: when value pretraining ended (optimizer steps of critic-only training) and the critic's explained
    # variance then (the readiness window's mean), logged once by the trainer.
    pretraining = {
        key: next((entry[metric] for entry in trainer.state.log_history if metric in entry), None)
        for key, metric in (
            ("steps", "value/pretraining_steps"),
            ("explained_variance", "value/pretraining_explained_variance"),
        )
    }
    return {
        "algo": spec.name,
        "seed": job["seed"],
        "zero_variance": zero_variance_share(trainer.state.log_history),
        "outcomes": outcomes.summary() if spec.ttrl_ties is None else None,
        "entropy_curve": entropy_curve(trainer.state.log_history),
        "curve": budget.curve,
        "samples": budget.samples,
        "steps": budget.steps,
        "train_seconds": budget.train_seconds,
        "seconds": time.perf_counter() - started,
        "rounds": statistics.fmean(rounds) if rounds else None,
        "prompts_skipped": sum(skipped) if skipped else None,
        "value_pretraining": pretraining if pretraining["steps"] is not None else None,
        "ttrl": {metric: _mean_logged(trainer.state.log_history, f"ttrl/{metric}") for metric in TTRL_METRICS}
        if spec.ttrl_ties is not None
        else None,
    }


TTRL_METRICS = ("label_accuracy", "tied_groups", "majority_ratio")


def _whole_completion(text: str) -> str | None:
    """TTRL's answer on the demo task: the whole completion, stripped (the reward compares it whole, too)."""
    return text.strip() or None


def _mean_logged(log_history: list[dict], metric: str) -> float:
    values = [entry[metric] for entry in log_history if metric in entry]
    return statistics.fmean(values) if values else float("nan")


class GroupOutcomes:
    """The reward function, wrapped to record every generated group's outcome per prompt, in generation order.

    Each call scores whole groups (TRL's sampler repeats a prompt `group_size` times in a row; one process here).
    From the sequence of a prompt's outcomes, `summary` splits the zero-variance groups by what the prompt's previous
    visit was: none (a first visit), a group with signal, or a zero-variance group. A pre-rollout filter that reads a
    prompt's history (GRESO) can only avoid the last kind: the others had no sign of being uninformative.
    """

    def __init__(self, reward, group_size: int):
        self.reward, self.group_size, self.__name__ = reward, group_size, reward.__name__  # TRL names metrics by it
        self.history: dict[str, list[bool]] = {}  # prompt -> zero-variance? per visit

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        rewards = self.reward(completions=completions, **kwargs)
        for start in range(0, len(rewards), self.group_size):
            group = rewards[start : start + self.group_size]
            self.history.setdefault(prompts[start], []).append(max(group) == min(group))
        return rewards

    def summary(self) -> dict:
        """Counts of groups, zero-variance groups split by the prompt's previous visit, and distinct prompts."""
        counts = {"groups": 0, "first_visit": 0, "after_signal": 0, "after_zero_variance": 0, "repeats": 0}
        for visits in self.history.values():
            counts["groups"] += len(visits)
            counts["first_visit"] += visits[0]
            for previous, current in itertools.pairwise(visits):
                counts["after_zero_variance" if previous else "after_signal"] += current
                counts["repeats"] += previous  # visits that followed a zero-variance group
        counts["prompts"] = len(self.history)
        return counts


def zero_variance_breakdown(results: list[dict], algos: list[str]) -> str:
    """Table: zero-variance groups per run, split by the prompt's previous visit, and how often one follows another."""
    lines = [
        "| algorithm | groups generated | zero-variance groups | first visit | after a group with signal | after a "
        "zero-variance group | P(zero-variance after zero-variance) | distinct prompts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for algo in algos:
        runs = [run["outcomes"] for run in results if run["algo"] == algo and run.get("outcomes")]
        if not runs:
            continue
        mean = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
        total = mean["first_visit"] + mean["after_signal"] + mean["after_zero_variance"]
        persistence = mean["after_zero_variance"] / max(mean["repeats"], 1)
        lines.append(
            f"| {algo} | {mean['groups']:,.0f} | {total:,.0f} | {mean['first_visit']:,.0f} | "
            f"{mean['after_signal']:,.0f} | {mean['after_zero_variance']:,.0f} | {persistence:.1%} | "
            f"{mean['prompts']:,.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Warm starts
# ---------------------------------------------------------------------------------------------------------------------


def unanswerable_pool(train: list[tuple[str, str]], share: float) -> list[tuple[str, str]]:
    """`train` with every prompt at a multiple of `1 / share` given an answer out of reach: the answer three times,
    longer than the completions' limit (`ANSWER_LENGTH + 3` tokens), so its groups are all wrong at every visit.

    >>> unanswerable_pool([("abc:", "cba"), ("abd:", "dba"), ("abe:", "eba"), ("abf:", "fba")], 0.5)
    [('abc:', 'cbacbacba'), ('abd:', 'dba'), ('abe:', 'ebaebaeba'), ('abf:', 'fba')]
    """
    if not share:
        return train
    every = round(1 / share)
    return [(prompt, answer * 3 if index % every == 0 else answer) for index, (prompt, answer) in enumerate(train)]


def zero_variance_share(log_history: list[dict]) -> float:
    """Share of the generated groups whose rewards were all equal (no signal), over the whole run."""
    entries = [entry for entry in log_history if "loss" in entry]
    if entries and "dynamic_sampling/groups_generated" in entries[0]:  # rounds per step vary: weigh by groups
        groups = [entry["dynamic_sampling/groups_generated"] for entry in entries]
        shares = [entry["sampling/zero_variance_fraction"] for entry in entries]
        return sum(g * f for g, f in zip(groups, shares, strict=True)) / max(sum(groups), 1)
    key = "sampling/zero_variance_fraction" if entries and "sampling/zero_variance_fraction" in entries[0] else None
    # A step without a generation (steps_per_generation > 1: ASPO) logs no reward statistics.
    shares = [entry[key or "frac_reward_zero_std"] for entry in entries if (key or "frac_reward_zero_std") in entry]
    return statistics.fmean(shares) if shares else float("nan")


def entropy_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(generated completions, mean token entropy of the step's update) per logged step. TRL's trainers log no
    completion count: their steps are numbered by `BATCH_SIZE` completions each."""
    entries = [entry for entry in log_history if "loss" in entry and "entropy" in entry]
    return [
        (entry.get("generation/completions", index * BATCH_SIZE), entry["entropy"])
        for index, entry in enumerate(entries, start=1)
    ]


def final_entropy(curve: list[tuple[int, float]], last: int = 10) -> float:
    """Mean entropy of the last `last` logged steps (one step's entropy is noisy)."""
    values = [value for _, value in curve[-last:]]
    return statistics.fmean(values) if values else float("nan")


def entropy_table(results: list[dict], algos: list[str]) -> str:
    """Final accuracy, final entropy and the share of all-equal groups per algorithm (mean ± std over seeds)."""
    lines = [
        "| algorithm | final accuracy (mean ± std) | final entropy, nats (mean of the last 10 steps; mean ± std) | "
        "all-equal groups, share of generated (mean ± std) | samples generated |",
        "|---|---:|---:|---:|---:|",
    ]
    for algo in algos:
        runs = [run for run in results if run["algo"] == algo]
        accuracy, accuracy_std = _mean_std([run["curve"][-1][1] for run in runs])
        entropy, entropy_std = _mean_std([final_entropy(run["entropy_curve"]) for run in runs])
        share, share_std = _mean_std([run["zero_variance"] for run in runs])
        samples = statistics.fmean(run["samples"] for run in runs)
        lines.append(
            f"| {algo} | {accuracy:.1%} ± {accuracy_std:.1%} | {entropy:.3f} ± {entropy_std:.3f} | "
            f"{share:.1%} ± {share_std:.1%} | {samples:,.0f} |"
        )
    return "\n".join(lines)


def entropy_at(curve: list[tuple[int, float]], x: float) -> float:
    """Entropy at `x` generated completions: linear between logged steps, the first step's before it (an AEPO step
    generates more than 64 completions, so its first point comes later than the others')."""
    return curve[0][1] if x < curve[0][0] else interpolate(curve, x)


def plot_entropy(results: list[dict], algos: list[str], budget: int, path: str) -> None:
    """Token entropy vs generated completions per algorithm: the mean over seeds, a band from the lowest to the
    highest seed, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(BATCH_SIZE, budget, 200)
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for algo in algos:
        runs = [run for run in results if run["algo"] == algo and run["entropy_curve"]]
        if not runs:
            continue
        curves = np.array([[entropy_at(run["entropy_curve"], x) for x in grid] for run in runs])
        # TRL's GRPO dashed and on top: GPPO on policy is exactly GRPO and would hide it.
        baseline = algo == "trl_grpo"
        style = dict(color="black", linestyle="--", linewidth=2.2, zorder=3) if baseline else dict(linewidth=1.6)
        (line,) = axes.plot(grid, curves.mean(axis=0), label=f"{algo} (TRL)" if baseline else algo, **style)
        axes.fill_between(grid, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.1)
    if "aepo" in algos:
        axes.axhline(AEPO_TARGET_ENTROPY, color="gray", linestyle=":", linewidth=1, label="AEPO target")
    seeds = len({run["seed"] for run in results})
    axes.set(
        xlabel="generated completions",
        ylabel="mean token entropy of the update (nats, log scale)",
        yscale="log",
        xlim=(0, budget),
        title=f"Token entropy on the demo task (mean and range over {seeds} seed{'s' * (seeds > 1)})",
    )
    axes.legend(loc="lower left", ncol=2, fontsize=9)
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def multi_epoch_table(rows: list[dict], results: list[dict], reference: str = "trl_grpo") -> tuple[str, float]:
    """Final accuracy, samples to the reference's final accuracy, and zero-variance share of generated groups."""
    target = next(row["final"][0] for row in rows if row["algo"] == reference)
    lines = [
        f"| algorithm | final accuracy (mean ± std) | samples to {reference}'s final {target:.1%} (mean; runs that "
        "reached it) | zero-variance share of generated groups (mean ± std) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        runs = [run for run in results if run["algo"] == row["algo"]]
        reached = [s for s in (samples_to_target(run["curve"], target) for run in runs) if s is not None]
        to_target = f"{statistics.fmean(reached):,.0f} ({len(reached)}/{len(runs)})" if reached else "not reached"
        share, share_std = _mean_std([run["zero_variance"] for run in runs])
        mean, std = row["final"]
        lines.append(f"| {row['algo']} | {mean:.1%} ± {std:.1%} | {to_target} | {share:.1%} ± {share_std:.1%} |")
    return "\n".join(lines), target


def warm_start_checkpoint(seed: int, path: str) -> tuple[int, float]:
    """`trl-plus demo`'s warm start for `seed`, saved at `path` with its tokenizer; (steps, held-out accuracy)."""
    from trl_plus.demo import reverse_task, warm_start
    from trl_plus.tiny import build_char_tokenizer, build_tiny_model

    train, held_out = reverse_task()
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    steps, held_out_accuracy = warm_start(model, tokenizer, train, held_out, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return steps, held_out_accuracy


# ---------------------------------------------------------------------------------------------------------------------
# Summary: table and plot
# ---------------------------------------------------------------------------------------------------------------------


def interpolate(curve: list[tuple[int, float]], x: float) -> float:
    """Accuracy at `x` generated samples, linear between evaluations (the last one beyond the curve's end)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def samples_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """Generated samples at the first evaluation that reached `target`, or None."""
    return next((samples for samples, value in curve if value >= target), None)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], algos: list[str], target: float) -> list[dict]:
    rows = []
    for algo in algos:
        runs = [run for run in results if run["algo"] == algo]
        finals = [run["curve"][-1][1] for run in runs]
        reached = [s for s in (samples_to_target(run["curve"], target) for run in runs) if s is not None]
        steps = sum(run["steps"] for run in runs)
        samples = sum(run["samples"] for run in runs)
        train_seconds = sum(run["train_seconds"] for run in runs)
        rounds = [run["rounds"] for run in runs if run["rounds"] is not None]
        rows.append(
            {
                "algo": algo,
                "final": _mean_std(finals),
                "gain": statistics.fmean(run["curve"][-1][1] - run["curve"][0][1] for run in runs),
                "reached": reached,
                "num_runs": len(runs),
                "samples": samples / len(runs),
                "steps": steps / len(runs),
                "seconds_per_step": train_seconds / steps,
                "seconds_per_1k": 1000 * train_seconds / samples,
                "rounds": statistics.fmean(rounds) if rounds else None,
            }
        )
    return rows


def markdown_table(rows: list[dict], target: float) -> str:
    lines = [
        f"| algorithm | trainer | final accuracy (mean ± std) | gain over warm start | samples to {target:.0%} "
        "(mean; runs that reached it) | samples generated | optimizer steps | s / step | s / 1k samples |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean, std = row["final"]
        reached = row["reached"]
        to_target = f"{statistics.fmean(reached):,.0f} ({len(reached)}/{row['num_runs']})" if reached else "—"
        to_target = to_target if reached else f"— (0/{row['num_runs']})"
        trainer = SPECS_BY_NAME[row["algo"]].label
        lines.append(
            f"| {row['algo']} | `{trainer}` | {mean:.1%} ± {std:.1%} | {100 * row['gain']:+.1f} pts | {to_target} | "
            f"{row['samples']:,.0f} | {row['steps']:.0f} | {row['seconds_per_step']:.3f} | "
            f"{row['seconds_per_1k']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], algos: list[str], budget: int, eval_every: int, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.arange(0, budget + 1, eval_every / 2)
    figure, axes = plt.subplots(figsize=(9, 5.5))
    # Grays are kept for TRL's baselines.
    colors = iter([c for c in plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors if len(set(c)) > 1])
    for algo in algos:
        runs = [run for run in results if run["algo"] == algo]
        curves = np.array([[interpolate(run["curve"], x) for x in grid] for run in runs])
        mean, std = curves.mean(axis=0), curves.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(grid))
        baseline = SPECS_BY_NAME[algo].module == "trl"
        # TRL's baselines dashed and on top: trl_plus's grpo reproduces trl_grpo exactly and would hide it.
        style = dict(linestyle="--", linewidth=2.2, zorder=3) if baseline else dict(linewidth=1.6, zorder=2)
        color = "black" if algo == "trl_grpo" else "dimgray" if algo == "trl_rloo" else next(colors)
        label = f"{algo} (TRL)" if baseline else algo
        axes.plot(grid, mean, color=color, label=label, **style)
        axes.fill_between(grid, mean - std, mean + std, color=color, alpha=0.12)
    axes.axhline(target, color="gray", linestyle=":", linewidth=1)
    seeds = len({run["seed"] for run in results})
    seeds = f"{seeds} seed{'s' if seeds > 1 else ''}"
    axes.set(
        xlabel="generated completions",
        ylabel="held-out accuracy (greedy, 256 prompts)",
        ylim=(0, 1),
        xlim=(0, budget),
        title=f"Reverse three letters: accuracy vs generated samples (mean ± std over {seeds})",
    )
    axes.legend(loc="lower right", ncol=2, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="warm-start and RL seeds")
    parser.add_argument(
        "--budget", type=int, default=51200, help="generated completions per run (default 51200: 800 demo steps)"
    )
    parser.add_argument("--eval-every", type=int, default=1280, help="generated completions between evaluations")
    parser.add_argument("--target", type=float, default=0.8, help="held-out accuracy for 'samples to target'")
    parser.add_argument("--algos", nargs="+", choices=list(SPECS_BY_NAME), default=None, metavar="ALGO")
    parser.add_argument(
        "--setting",
        choices=["default", "multi_epoch", "entropy"],
        default="default",
        help="multi_epoch: a pool of 512 prompts (a quarter out of reach) seen ~5 times each, TRL GRPO, DAPO, DAPO "
        "and GRPO with selective rollout; results in results/multi_epoch/. entropy: 25,600 completions per run, TRL "
        "GRPO and the entropy-collapse remedies (Clip-Cov, PF-PPO, AEPO, entropy-shaped advantages, GPPO), with final "
        "entropy and entropy curves (entropy.png); results in results/entropy/. Either way the READMEs' tables are "
        "left as they are.",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="RL learning rate (default 1e-3, the demo's)"
    )
    parser.add_argument("--pool", type=int, default=0, help="training prompts used (0: all)")
    parser.add_argument(
        "--unanswerable",
        type=float,
        default=0.0,
        help="share of the training prompts whose answer is out of reach (multi_epoch: 0.25)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="runs in parallel (1 by default: cleaner timings on a shared machine)"
    )
    parser.add_argument("--output-dir", default=None, help="where learning.md and learning.png go")
    args = parser.parse_args(argv)
    presets = {"multi_epoch": MULTI_EPOCH, "entropy": ENTROPY}
    preset = presets.get(args.setting, {"algos": DEFAULT_ALGOS, "output_dir": RESULTS_DIR})
    presettable = ("budget", "eval_every", "pool", "unanswerable")
    given = {key for key in presettable if getattr(args, key) != parser.get_default(key)}
    for key, value in preset.items():
        if getattr(args, key) is None or (key not in given and key in presettable):
            setattr(args, key, value)
    args.learning_rate = args.learning_rate or 1e-3
    cycle = 2 * BATCH_SIZE  # ASPO's generation cycle; every budget and grid point should end one
    if args.budget % cycle or args.eval_every % cycle:
        parser.error(f"--budget and --eval-every must be multiples of {cycle} completions")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    _quiet()
    import trl

    import trl_plus

    algos = args.algos
    command = "python benchmarks/learning.py" + (f" {' '.join(sys.argv[1:])}" if argv is None and sys.argv[1:] else "")
    header = (
        f"trl {trl.__version__}, trl_plus {trl_plus.__version__}, torch {torch.__version__}, "
        f"{cpu_model()} ({os.cpu_count()} CPUs), 1 torch thread per run, "
        f"{args.workers} run(s) at a time"
    )
    print(
        f"# learning benchmark: {len(algos)} algorithms x {len(args.seeds)} seeds, {args.budget:,} generated "
        f"completions per run, held-out accuracy every {args.eval_every:,}; {header}",
        flush=True,
    )

    work_dir = tempfile.TemporaryDirectory(prefix="trl-plus-learning-")
    jobs, warm_starts = [], {}
    for seed in args.seeds:
        path = os.path.join(work_dir.name, f"seed{seed}", "warm_start")
        steps, held_out_accuracy = warm_start_checkpoint(seed, path)
        warm_starts[seed] = held_out_accuracy
        print(
            f"# seed {seed}: warm start {steps} supervised steps, held-out accuracy {held_out_accuracy:.1%}",
            flush=True,
        )
        for algo in algos:
            jobs.append(
                {
                    "algo": algo,
                    "seed": seed,
                    "model_path": path,
                    "output_dir": os.path.join(work_dir.name, f"seed{seed}", algo),
                    "budget": args.budget,
                    "eval_every": args.eval_every,
                    "warm_start_accuracy": held_out_accuracy,
                    "pool": args.pool,
                    "unanswerable": args.unanswerable,
                    "learning_rate": args.learning_rate,
                }
            )

    results = []
    if args.workers > 1:
        executor = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        executor = _InProcess()
    with executor:
        for index, result in enumerate(executor.map(run_one, jobs), start=1):
            results.append(result)
            every = max(1, len(result["curve"]) // 10)
            curve = " ".join(f"{value:.0%}" for _, value in result["curve"][::every])
            pretraining = result.get("value_pretraining")
            pretraining = f", value pretraining {_pretraining_text(pretraining)}" if pretraining else ""
            print(
                f"#   [{index}/{len(jobs)}] seed {result['seed']} {result['algo']}: {result['curve'][0][1]:.1%} -> "
                f"{result['curve'][-1][1]:.1%}, {result['samples']:,} samples, {result['steps']} steps, entropy "
                f"{result['entropy_curve'][0][1] if result['entropy_curve'] else float('nan'):.3f} -> "
                f"{final_entropy(result['entropy_curve']):.3f}, "
                f"{result['seconds']:.0f} s{pretraining}  [{curve}]",
                flush=True,
            )
    work_dir.cleanup()

    rows = summarize(results, algos, args.target)
    table = markdown_table(rows, args.target)
    if args.setting == "multi_epoch":
        extra, reference_final = multi_epoch_table(rows, results)
        table += f"\n\nAt trl_grpo's final accuracy ({reference_final:.1%}):\n\n{extra}"
        table += (
            "\n\nZero-variance groups per run (mean over seeds), by the prompt's previous visit; a filter that reads "
            f"a prompt's history can avoid only the last kind:\n\n{zero_variance_breakdown(results, algos)}"
        )
    if args.setting == "entropy":
        table += f"\n\nEntropy at learning rate {args.learning_rate:g}:\n\n{entropy_table(results, algos)}"
    elapsed = time.perf_counter() - started
    notes = [
        f"Seeds {', '.join(map(str, args.seeds))}; warm-start held-out accuracy per seed: "
        + ", ".join(f"{warm_starts[seed]:.1%}" for seed in args.seeds)
        + ". Final accuracy: greedy, 256 held-out prompts, after the sample budget; std over seeds.",
        f"Samples to {args.target:.0%}: first evaluation (every {args.eval_every:,} generated completions) at or "
        "above it, averaged over the runs that reached it. s / step and s / 1k samples: wall time of the optimizer "
        "steps (generation included, evaluations excluded).",
    ]
    for row in rows:
        if row["rounds"] is not None:
            notes.append(f"{row['algo']}: dynamic sampling made {row['rounds']:.2f} generation rounds per step.")
    for algo in algos:
        skipped = [run["prompts_skipped"] for run in results if run["algo"] == algo and run.get("prompts_skipped")]
        if skipped:
            notes.append(f"{algo}: selective rollout skipped {statistics.fmean(skipped):,.0f} prompts per run (mean).")
    for algo in algos:
        runs = sorted((run for run in results if run["algo"] == algo and run.get("value_pretraining")), key=_seed)
        if runs:
            notes.append(
                f"{algo}: value pretraining ended (steps of critic-only training; the critic's explained variance "
                "then, mean of the readiness window) per seed: "
                + ", ".join(f"seed {run['seed']} {_pretraining_text(run['value_pretraining'])}" for run in runs)
                + "."
            )
    for algo in algos:
        runs = [run for run in results if run["algo"] == algo and run.get("ttrl")]
        if runs:
            means = {metric: statistics.fmean(run["ttrl"][metric] for run in runs) for metric in TTRL_METRICS}
            notes.append(
                f"{algo}: the majority label was the right answer for {means['label_accuracy']:.1%} of the groups "
                f"(a group without a label counts as wrong), the top answers tied in {means['tied_groups']:.1%}, and "
                f"the label held {means['majority_ratio']:.1%} of a group's votes (means over steps and seeds)."
            )
    dapo_outcomes = [run["outcomes"] for run in results if run["algo"] == "dapo" and run.get("outcomes")]
    if args.setting == "multi_epoch" and dapo_outcomes:
        zero_variance = statistics.fmean(
            r["first_visit"] + r["after_signal"] + r["after_zero_variance"] for r in dapo_outcomes
        )
        avoidable = statistics.fmean(r["after_zero_variance"] for r in dapo_outcomes)
        notes.append(
            f"dapo: of its {zero_variance:,.0f} zero-variance groups per run, {avoidable:,.0f} "
            f"({avoidable / zero_variance:.0%}) followed a zero-variance group of the same prompt: a filter that "
            "reads a prompt's history could at most avoid these (the others came at a first visit or after a "
            "group with signal)."
        )
    for row in rows:
        if row["gain"] < 0:
            notes.append(f"{row['algo']} ends below its warm start ({100 * row['gain']:+.1f} points on average).")
    verdict = dapo_verdict(rows, results)
    if verdict:
        notes.append(verdict)
    notes.append(f"Total wall time {elapsed / 60:.1f} min.")
    print()
    print(table)
    print()
    for note in notes:
        print(note)

    os.makedirs(args.output_dir, exist_ok=True)
    plot_path = os.path.join(args.output_dir, "learning.png")
    plot(results, algos, args.budget, args.eval_every, args.target, plot_path)
    if args.setting == "entropy":
        plot_entropy(results, algos, args.budget, os.path.join(args.output_dir, "entropy.png"))
    today = datetime.date.today().isoformat()

    def report(image: str) -> str:
        return (
            f"`{command}`, run on {today}: {header}. {args.budget:,} generated completions per run, "
            f"{len(args.seeds)} seeds.\n\n{table}\n\n"
            + "".join(f"- {note}\n" for note in notes)
            + f"\n![held-out accuracy vs generated samples]({image})\n"
            + ("\n![entropy vs generated samples](entropy.png)\n" if args.setting == "entropy" else "")
        )

    with open(os.path.join(args.output_dir, "runs.json"), "w") as runs_file:  # every curve, to re-plot from
        json.dump(results, runs_file)
    markdown_path = os.path.join(args.output_dir, "learning.md")
    with open(markdown_path, "w") as markdown:
        markdown.write("<!-- written by benchmarks/learning.py -->\n\n" + report("learning.png"))
    print(f"Wrote {markdown_path} and {plot_path}.")
    if os.path.abspath(args.output_dir) == RESULTS_DIR:  # the READMEs show the results of the default location
        benchmarks_dir = os.path.dirname(RESULTS_DIR)
        for readme, image in (
            (os.path.join(benchmarks_dir, "README.md"), "results/learning.png"),
            (os.path.join(os.path.dirname(benchmarks_dir), "README.md"), "benchmarks/results/learning.png"),
        ):
            if update_readme(readme, report(image)):
                print(f"Updated {readme}.")


def _seed(run: dict) -> int:
    return run["seed"]


def _pretraining_text(pretraining: dict) -> str:
    explained_variance = pretraining["explained_variance"]
    explained_variance = "n/a" if explained_variance is None else f"{explained_variance:.2f}"
    return f"after {pretraining['steps']:.0f} steps (explained variance {explained_variance})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def update_readme(path: str, block: str) -> bool:
    """Replace the text between the README's learning-table markers with `block`; False when there are none."""
    if not os.path.exists(path):
        return False
    with open(path) as readme:
        text = readme.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    with open(path, "w") as readme:
        readme.write(text[: start + len(README_START)] + "\n" + block + "\n" + text[end:])
    return True


def dapo_verdict(rows: list[dict], results: list[dict]) -> str | None:
    """The issue's target, reported, not asserted: DAPO's mean final accuracy above TRL GRPO's."""
    by_algo = {row["algo"]: row for row in rows}
    if "dapo" not in by_algo or "trl_grpo" not in by_algo:
        return None
    (dapo, dapo_std), (grpo, grpo_std) = by_algo["dapo"]["final"], by_algo["trl_grpo"]["final"]
    outcome = "higher than" if dapo > grpo else "not higher than"
    spread = max(dapo_std, grpo_std)
    within_noise = f", smaller than the seed-to-seed std ({spread:.1%})" if abs(dapo - grpo) < spread else ""
    finals = {(run["algo"], run["seed"]): run["curve"][-1][1] for run in results}
    seeds = sorted({seed for algo, seed in finals if algo == "dapo" and ("trl_grpo", seed) in finals})
    per_seed = ", ".join(f"{100 * (finals['dapo', seed] - finals['trl_grpo', seed]):+.1f}" for seed in seeds)
    return (
        f"Target (DAPO with dynamic sampling above TRL's GRPOTrainer at equal generated samples): DAPO {dapo:.1%} is "
        f"{outcome} TRL GRPO {grpo:.1%} ({100 * (dapo - grpo):+.1f} points, mean over seeds{within_noise}; per "
        f"seed {', '.join(map(str, seeds))}: {per_seed} points)."
    )


class _InProcess:
    """`executor.map` run in this process, lazily, so progress prints as each run finishes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    @staticmethod
    def map(function, iterable):
        return map(function, iterable)


if __name__ == "__main__":
    main()
