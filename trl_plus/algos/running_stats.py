"""Running mean and standard deviation of reward scores, for PPO's reward normalization (pure torch).

InstructGPT (arXiv 2203.02155 appendix C.3) normalizes its reward model so that its scores have mean 0; OpenRLHF's
`normalize_reward` and the PPO implementation details of Huang et al. (arXiv 2403.17031 sec. 4) keep a running mean
and std of the scores seen so far and use (r - mean) / std, optionally clipped. The running moments are merged batch
by batch with the parallel form of Welford's algorithm (Chan, Golub and LeVeque, "Updating formulae and a pairwise
algorithm for computing sample variances", 1979): with counts n_a, n_b, means m_a, m_b and sums of squared deviations
M2_a, M2_b,

    n = n_a + n_b,   delta = m_b - m_a,   m = m_a + delta * n_b / n,   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,

which is exact (the moments of the concatenated data) and never subtracts two large sums.

>>> moments = RunningMoments()
>>> moments.update(torch.tensor([1.0, 3.0]))
>>> moments.update(torch.tensor([5.0]))
>>> moments.count, moments.mean, round(moments.std, 4)
(3, 3.0, 1.633)
"""

import math
from typing import Any

import torch


def batch_moments(values: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, M2) of the finite entries of `values` (any shape), M2 = sum of squared deviations from the mean.
    NaN entries (completions no reward function scored) are left out; an empty batch is (0, 0.0, 0.0)."""
    values = values.detach().double().flatten()
    values = values[~torch.isnan(values)]
    count = values.numel()
    if count == 0:
        return 0, 0.0, 0.0
    mean = values.mean()
    return count, mean.item(), ((values - mean) ** 2).sum().item()


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """The (count, mean, M2) of two data sets together, from those of each (the parallel Welford merge above)."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    if count == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    mean = mean_a + delta * count_b / count
    m2 = m2_a + m2_b + delta * delta * count_a * count_b / count
    return count, mean, m2


class RunningMoments:
    """Count, mean and population std of every score seen so far; `state_dict` / `load_state_dict` for checkpoints.

    The trainer updates it with the scores of the whole global batch (gathered from every process), so every process
    holds the same moments without a collective of its own.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        self.count, self.mean, self.m2 = merge_moments((self.count, self.mean, self.m2), batch_moments(values))

    @property
    def std(self) -> float:
        """Population std (M2 / count) of the scores seen so far; 0.0 before any."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"count", "mean", "m2"}:
            raise ValueError(
                f"RunningMoments.load_state_dict expects the keys ['count', 'm2', 'mean'], got {sorted(state_dict)}."
            )
        count, mean, m2 = int(state_dict["count"]), float(state_dict["mean"]), float(state_dict["m2"])
        if count < 0 or m2 < 0 or not (math.isfinite(mean) and math.isfinite(m2)):
            raise ValueError(f"RunningMoments state is not a valid count / mean / M2: {state_dict}.")
        self.count, self.mean, self.m2 = count, mean, m2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count}, mean={self.mean:.4g}, std={self.std:.4g})"


def normalize_scores(
    scores: torch.Tensor, mean: float, std: float, clip: float | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(scores - mean) / (std + eps), then clipped to [-clip, clip] when `clip` is given; NaN stays NaN.

    >>> normalize_scores(torch.tensor([0.0, 4.0, float("nan")]), mean=1.0, std=2.0, clip=1.0, eps=0.0)
    tensor([-0.5000,  1.0000,     nan])
    """
    normalized = (scores - mean) / (std + eps)
    if clip is not None:
        normalized = normalized.clamp(-clip, clip)
    return normalized


class ScoreNormalizer:
    """PPO's reward normalization and clipping of the sequence scores, with its state for checkpoints.

    `normalize`: every training batch first updates the running moments, then its scores become (r - mean) / std with
    the moments of every score seen so far, this batch included (OpenRLHF's order). `clip`: the scores (normalized or
    not) are clipped to [-clip, clip]. Evaluation batches are normalized with the current moments, not added to them.

    >>> normalizer = ScoreNormalizer(normalize=True, clip=None)
    >>> normalizer(torch.tensor([1.0, 3.0]), update=True)
    tensor([-1.,  1.])
    """

    def __init__(self, normalize: bool, clip: float | None) -> None:
        self.normalize, self.clip = normalize, clip
        self.moments = RunningMoments()

    @property
    def enabled(self) -> bool:
        return self.normalize or self.clip is not None

    def __call__(self, scores: torch.Tensor, update: bool) -> torch.Tensor:
        if self.normalize and update:
            self.moments.update(scores)
        mean, std = (self.moments.mean, self.moments.std) if self.normalize else (0.0, 1.0)
        return normalize_scores(scores, mean, std, self.clip, eps=1e-8 if self.normalize else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return self.moments.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.moments.load_state_dict(state_dict)
