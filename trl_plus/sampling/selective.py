"""GRESO selective rollout (arXiv 2506.02177, sec. 4 and Algorithm 1): skip, before generation, the prompts whose
recent groups carried no reward signal.

A group is zero-variance when its rewards are all equal (every advantage is 0). GRESO observes that a prompt whose
group was zero-variance in one epoch tends to stay so in the next, and skips it with probability `1 - p^z`, `z` the
number of consecutive zero-variance groups of the prompt (its streak) and `p` an exploration probability. The keep
probability never drops below a floor, so no prompt is skipped forever. There are two exploration probabilities, one
for *solved* prompts (the group's common reward is high) and one for *unsolved* ones (low), each nudged by a fixed step
after every training step whose prompts all had a history (GRESO: from the second epoch on; see `Sampler`) to hold
its share of zero-variance groups among the generated ones at a target: down (skip more) when the share is at or
above the target, up (skip less) when below.

The constants follow the authors' code (Infini-AI-Lab/GRESO, `verl/trainer/ttis/presampling_selector.py` and
`verl/trainer/ppo/ray_trainer.py`): keep floor 0.01, step 0.01, `p` clipped to [0.05, 0.95], the target share `alpha`
split into `alpha / 3` for solved and `2 alpha / 3` for unsolved prompts (unsolved prompts are explored more: they are
the ones the rising reward turns informative).

Solved or unsolved, for any reward scale: the group's common reward against the middle of the range of every reward
observed so far, strictly above is solved. For 0/1 rewards, all-1 groups are solved and all-0 groups unsolved once
both values have been seen (before that, every zero-variance group counts as unsolved).
"""

import math

import torch

SIGNAL, SOLVED, UNSOLVED = 0, 1, 2  # a group's outcome; a streak counts consecutive outcomes of one kind
KEEP_FLOOR = 0.01
EXPLORATION_STEP = 0.01
EXPLORATION_BOUNDS = (0.05, 0.95)
SOLVED_SHARE_OF_TARGET = 1 / 3  # of the target zero-variance share; unsolved prompts get the other 2/3


def keep_probability(streak: int, exploration: float, floor: float = KEEP_FLOOR) -> float:
    """Probability that a prompt with `streak` consecutive zero-variance groups is generated: `max(p^z, floor)`.

    >>> keep_probability(0, 0.5), keep_probability(3, 0.5), keep_probability(7, 0.5)
    (1.0, 0.125, 0.01)
    """
    return 1.0 if streak == 0 else max(exploration**streak, floor)


def adapted_exploration(
    exploration: float,
    observed_share: float,
    target_share: float,
    step: float = EXPLORATION_STEP,
    bounds: tuple[float, float] = EXPLORATION_BOUNDS,
) -> float:
    """The exploration probability after a step whose generated groups had `observed_share` zero-variance groups of
    this kind: one `step` down when at or above `target_share` (skip more), one up otherwise, within `bounds`.

    >>> adapted_exploration(0.5, 0.30, 0.25), adapted_exploration(0.5, 0.10, 0.25)
    (0.49, 0.51)
    >>> adapted_exploration(0.05, 1.0, 0.25)  # at the lower bound already
    0.05
    """
    low, high = bounds
    if observed_share >= target_share:
        return max(exploration - step, low)
    return min(exploration + step, high)


class SelectiveRollout:
    """Per-prompt history of zero-variance outcomes and the two exploration probabilities; decides which prompts to
    skip before generation.

    Prompts are named by a stable key (e.g. `trl_plus.rewards.majority_vote.prompt_key`). Decisions draw from a
    generator of its own, seeded by `seed`, so every process that calls it with the same keys decides the same, and
    the global RNG (and so TRL's sampling) is left untouched. `state_dict` / `load_state_dict` put it in checkpoints.
    """

    def __init__(self, target_zero_variance: float = 0.25, exploration: float = 0.5, seed: int = 0):
        self.targets = {
            SOLVED: target_zero_variance * SOLVED_SHARE_OF_TARGET,
            UNSOLVED: target_zero_variance * (1 - SOLVED_SHARE_OF_TARGET),
        }
        self.exploration = {SOLVED: exploration, UNSOLVED: exploration}
        self.history: dict[str, list[int]] = {}  # key -> [outcome of its last group, streak of that outcome]
        self.reward_range = [math.inf, -math.inf]  # lowest and highest finite reward observed
        self._generator = torch.Generator().manual_seed(seed)

    def keep_probability(self, key: str) -> float:
        outcome, streak = self.history.get(key, (SIGNAL, 0))
        return keep_probability(streak, self.exploration[outcome]) if outcome != SIGNAL else 1.0

    def has_history(self, key: str) -> bool:
        return key in self.history

    def choose_skipped(self, keys: list[str]) -> list[bool]:
        """For each prompt, whether to skip it (one uniform draw per prompt, also for prompts that are kept)."""
        draws = torch.rand(len(keys), generator=self._generator).tolist()
        return [draw >= self.keep_probability(key) for key, draw in zip(keys, draws, strict=True)]

    def record(self, keys: list[str], rewards: torch.Tensor) -> list[int]:
        """Add the outcome of each generated group (`rewards` `(num_groups, G)`, NaN where unscored) to its prompt's
        history; returns the outcomes. A group with no scored completion is unsolved (it cannot teach either)."""
        finite = rewards[torch.isfinite(rewards)]
        if finite.numel():
            low, high = self.reward_range
            self.reward_range = [min(low, finite.min().item()), max(high, finite.max().item())]
        low, high = self.reward_range
        middle = (low + high) / 2 if low <= high else math.inf  # no reward seen yet: nothing is solved
        outcomes = []
        for key, group in zip(keys, rewards, strict=True):
            scored = group[~torch.isnan(group)]
            if scored.numel() and scored.max() > scored.min():
                outcome = SIGNAL
            else:
                outcome = SOLVED if scored.numel() and scored.max().item() > middle else UNSOLVED
            previous, streak = self.history.get(key, (SIGNAL, 0))
            self.history[key] = [outcome, 0 if outcome == SIGNAL else (streak + 1 if previous == outcome else 1)]
            outcomes.append(outcome)
        return outcomes

    def adapt(self, outcomes: list[int]) -> None:
        """Nudge each exploration probability toward its target share, from the outcomes of a step's groups."""
        for kind, target in self.targets.items():
            share = sum(outcome == kind for outcome in outcomes) / max(len(outcomes), 1)
            self.exploration[kind] = adapted_exploration(self.exploration[kind], share, target)

    def state_dict(self) -> dict:
        return {
            "exploration": [self.exploration[SOLVED], self.exploration[UNSOLVED]],
            "history": {key: list(entry) for key, entry in self.history.items()},
            "reward_range": list(self.reward_range),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"exploration", "history", "reward_range", "generator"}
        if not isinstance(state, dict) or set(state) != expected:
            saved = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"SelectiveRollout state must have the keys {sorted(expected)}, got {saved}.")
        self.exploration = {SOLVED: float(state["exploration"][0]), UNSOLVED: float(state["exploration"][1])}
        self.history = {key: [int(outcome), int(streak)] for key, (outcome, streak) in state["history"].items()}
        self.reward_range = [float(value) for value in state["reward_range"]]
        self._generator.set_state(state["generator"])
