"""PF-PPO policy filtration (Zhang et al., arXiv 2409.06957 sec. 4): weigh completions by how reliable their reward is.

The paper trains on the completions whose rewards the reward model gets right most often, chosen by reward rank
within each prompt's N samples: best-of-N (BoN, the best only) and best-and-worst (BW, the best and the worst). verl's
`use_pf_ppo` (`compute_pf_ppo_reweight_data`, verl/trainer/ppo/core_algos.py) reweights instead: `pow` (|r|^k),
`max_min` (1 on the extreme rewards, else 0) and `max_random` (0.4 on the best, 0.1 on the others), then resamples
the whole batch with replacement in proportion to the weights. Here every selection is made within each prompt's
group (the paper ranks a prompt's own samples; verl's `max_min` / `max_random` take the batch's extremes) and the
weights are returned instead of resampling, so the trainer can apply their expectation without sampling noise.

Every registered filter takes `rewards` `(N,)` (N = num_groups * group_size, the completions of a group contiguous,
NaN where no reward function scored a completion), `group_size` and its keyword hyperparameters, and returns weights
`(N,)` >= 0: 0 means the completion is filtered out. An unscored completion gets weight 0. Ties are kept together
(every completion with the group's best reward is "the best"), so the weights do not depend on the order of rows.
"""

import torch

from .registry import Registry

POLICY_FILTERS = Registry("policy filter")


def _group_extremes(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row max and min of the scored rewards of its group, each `(N,)` (NaN for a group with none scored)."""
    grouped = rewards.view(-1, group_size)
    scored = ~torch.isnan(grouped)
    best = torch.where(scored, grouped, -torch.inf).amax(dim=1, keepdim=True)
    worst = torch.where(scored, grouped, torch.inf).amin(dim=1, keepdim=True)
    none_scored = ~scored.any(dim=1, keepdim=True)
    best, worst = best.masked_fill(none_scored, torch.nan), worst.masked_fill(none_scored, torch.nan)
    return best.expand_as(grouped).reshape(-1), worst.expand_as(grouped).reshape(-1)


@POLICY_FILTERS.register("best_of_n")
def best_of_n_weights(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """PF-PPO's BoN (arXiv 2409.06957 sec. 4): weight 1 on the completions with their group's best reward, else 0.

    >>> best_of_n_weights(torch.tensor([0.2, 0.9, 0.9, 0.1, 1.0, 1.0]), 3)
    tensor([0., 1., 1., 0., 1., 1.])
    """
    best, _ = _group_extremes(rewards, group_size)
    return (rewards == best).to(rewards.dtype)


@POLICY_FILTERS.register("max_min")
def max_min_weights(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """PF-PPO's BW (best and worst, arXiv 2409.06957 sec. 4), verl's `max_min`: weight 1 on the completions with
    their group's best or worst reward, else 0. A group whose rewards are all equal keeps every completion.

    >>> max_min_weights(torch.tensor([0.2, 0.9, 0.5, 0.1, 1.0, 1.0]), 3)
    tensor([1., 1., 0., 1., 1., 1.])
    """
    best, worst = _group_extremes(rewards, group_size)
    return ((rewards == best) | (rewards == worst)).to(rewards.dtype)


@POLICY_FILTERS.register("max_random")
def max_random_weights(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """verl's `max_random`, the reweighting form of PF-PPO's best-random (BR, arXiv 2409.06957 sec. 4): weight 0.4 on
    the completions with their group's best reward, 0.1 on the others (the best counts 4 times as much).

    >>> max_random_weights(torch.tensor([0.2, 0.9, 0.5]), 3)
    tensor([0.1000, 0.4000, 0.1000])
    """
    best, _ = _group_extremes(rewards, group_size)
    weights = torch.where(rewards == best, 0.4, 0.1).to(rewards.dtype)
    return weights.masked_fill(torch.isnan(rewards), 0.0)


@POLICY_FILTERS.register("pow")
def pow_weights(rewards: torch.Tensor, group_size: int, *, weight_pow: float = 2.0) -> torch.Tensor:
    """verl's `pow`: weight |r|^k (`weight_pow`, verl's default 2.0), so completions with large rewards in magnitude
    count more and a reward of 0 is filtered out. `group_size` is unused (the weight is the completion's own).

    >>> pow_weights(torch.tensor([0.5, -1.0, 0.0, 2.0]), 2, weight_pow=2.0)
    tensor([0.2500, 1.0000, 0.0000, 4.0000])
    """
    return torch.nan_to_num(rewards.abs().pow(weight_pow), nan=0.0)


def normalize_filter_weights(weights: torch.Tensor, total_weight: float, num_kept: float) -> torch.Tensor:
    """Weights `(B,)` divided by the mean non-zero weight of the global batch (`total_weight / num_kept`, sums over
    every process), so the kept completions' weights average 1. A batch where every weight is 0 keeps every
    completion with weight 1 (verl adds 1e-8 to every weight, which then resamples uniformly).

    >>> normalize_filter_weights(torch.tensor([0.0, 1.0, 3.0]), total_weight=4.0, num_kept=2.0)
    tensor([0.0000, 0.5000, 1.5000])
    >>> normalize_filter_weights(torch.zeros(2), total_weight=0.0, num_kept=0.0)
    tensor([1., 1.])
    """
    if num_kept == 0:
        return torch.ones_like(weights)
    return weights * (num_kept / total_weight)
