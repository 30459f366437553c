"""Advantage estimators for outcome rewards.

Every registered estimator maps the rewards of the global batch, `(N,)` with N = num_groups * group_size and the
completions of a group contiguous, to one advantage per completion, `(N,)`. A NaN reward marks a completion that no
reward function could score: it is left out of its group's baseline and gets advantage 0.

REINFORCE++ adds two token-level steps that the trainer applies on each process's `(B, T)` slice:
`kl_penalty_to_go` (KL folded into the token reward) and `masked_whiten` (normalization over the whole global batch).
"""

from collections.abc import Callable

import torch

from .registry import Registry

ADVANTAGES = Registry("advantage estimator")

# Estimators whose token advantages are z-scored over every valid token of the global batch (REINFORCE++).
GLOBALLY_WHITENED = frozenset({"reinforce_pp", "reinforce_pp_baseline"})


def _group_stats(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row group mean of the scored rewards and count of scored rewards, each `(N,)`."""
    grouped = rewards.view(-1, group_size)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    return mean.expand_as(grouped).reshape(-1), count.expand_as(grouped).reshape(-1)


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "group", eps: float = 1e-4):
    """GRPO (arXiv 2402.03300 sec. 4.1.2): A_i = (r_i - mean_g r) / (std_g r + eps), std with Bessel's correction.

    `scale_rewards` is TRL's: "group" (above), "batch" (std over the whole batch), "none" (Dr. GRPO, no std).

    >>> grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2, scale_rewards="none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"Unknown scale_rewards '{scale_rewards}'. Valid choices: ['batch', 'group', 'none'].")
    mean, count = _group_stats(rewards, group_size)
    advantages = rewards - mean
    if scale_rewards != "none":
        std = _reward_std(rewards, group_size, scale_rewards, count)
        if torch.isinf(std).any():  # squares of |r| > ~1e19 overflow float32: the same std in float64
            std = _reward_std(rewards.double(), group_size, scale_rewards, count).to(rewards.dtype)
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def _reward_std(rewards: torch.Tensor, group_size: int, scale_rewards: str, count: torch.Tensor) -> torch.Tensor:
    """GRPO's std, per row: of its group ("group") or of the whole batch ("batch"), with Bessel's correction as TRL."""
    if scale_rewards == "batch":
        return rewards[~torch.isnan(rewards)].std()
    grouped = rewards.view(-1, group_size)
    var = torch.nanmean((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) ** 2, dim=1, keepdim=True)
    return (var.expand_as(grouped).reshape(-1) * count / (count - 1)).sqrt()


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: torch.Tensor, group_size: int):
    """RLOO (arXiv 2402.14740): A_i = r_i - mean of the other rewards of the group = G/(G-1) (r_i - mean_g r).

    G counts the scored completions of the group; a group with fewer than 2 gets advantage 0.

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    mean, count = _group_stats(rewards, group_size)
    count = count.to(rewards.dtype)
    advantages = torch.where(count > 1, count / (count - 1).clamp(min=1.0) * (rewards - mean), 0.0)
    return torch.nan_to_num(advantages, nan=0.0)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int):
    """REINFORCE++ (arXiv 2501.03262): the raw outcome reward, no baseline; the global whitening is the baseline.

    >>> reinforce_pp_advantages(torch.tensor([1.0, float("nan")]), 2)
    tensor([1., 0.])
    """
    return torch.nan_to_num(rewards, nan=0.0)


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_size: int):
    """REINFORCE++-baseline (arXiv 2501.03262): r_i - mean_g r, then (in the trainer) whitened over the global batch.

    >>> reinforce_pp_baseline_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    mean, _ = _group_stats(rewards, group_size)
    return torch.nan_to_num(rewards - mean, nan=0.0)


@ADVANTAGES.register("remax")
def remax_advantages(rewards: torch.Tensor, group_size: int):
    """ReMax (arXiv 2310.10505 eq. 7): A_i = r_i - r(x, y_greedy), the greedy decode's reward as the baseline.

    The LAST completion of each group is the greedy decode: it is the baseline and gets advantage 0 (the trainer also
    keeps it out of the loss).

    >>> remax_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 1.0]), 3)
    tensor([ 0.5000, -0.5000,  0.0000,  1.0000,  1.0000,  0.0000])
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped[:, -1:]
    advantages[:, -1] = 0.0
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def kl_penalty_to_go(advantages: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Fold a per-token KL penalty into the reward with gamma = 1 (REINFORCE++, arXiv 2501.03262 eq. 3-4).

    The token reward is 1[t = T_i] * A_i - beta * KL_{i,t}; its return-to-go is A_{i,t} = A_i - beta * sum_{s >= t}
    KL_{i,s}. `advantages` is `(B,)`, `kl` and `mask` are `(B, T)`; returns `(B, T)`, zero on padding.

    >>> kl_penalty_to_go(torch.tensor([1.0]), torch.tensor([[0.5, 1.0, 9.0]]), torch.tensor([[1, 1, 0]]), 0.1)
    tensor([[0.8500, 0.9000, 0.0000]])
    """
    masked_kl = kl * mask
    kl_to_go = masked_kl.flip(-1).cumsum(-1).flip(-1)
    return (advantages.unsqueeze(-1) - beta * kl_to_go) * mask


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Z-score `(B, T)` values over their valid tokens: (x - mean) / sqrt(max(var, eps)), population variance.

    `all_reduce_sum` sums a tensor over processes; with it the mean and variance are those of the global batch, so the
    result does not depend on how the batch is split. Padding stays 0.

    >>> masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    tensor([[-1.,  1.,  0.]])
    """
    reduce = all_reduce_sum or (lambda tensor: tensor)
    mean, var = _masked_mean_var(values, mask, reduce)
    if not torch.isfinite(var):  # squares of |x| > ~1e19 overflow float32; the same statistics in float64
        mean, var = _masked_mean_var(values.double(), mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var.clamp(min=eps)) * mask.to(values.dtype)
    return whitened.to(values.dtype)


def _masked_mean_var(values: torch.Tensor, mask: torch.Tensor, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the valid entries of `values`, summed over processes by `reduce`.

    The squared deviations are selected with `where`, not multiplied by the mask: an overflowed (inf) square on
    padding would make inf * 0 = NaN. Same on every process (the sums are global), so fallbacks agree too.
    """
    mask = mask.to(values.dtype)
    totals = reduce(torch.stack([(values * mask).sum(), mask.sum()]))
    mean = totals[0] / totals[1].clamp(min=1.0)
    sum_sq_dev = reduce(torch.where(mask.bool(), (values - mean) ** 2, 0.0).sum().reshape(1))[0]
    return mean, sum_sq_dev / totals[1].clamp(min=1.0)
