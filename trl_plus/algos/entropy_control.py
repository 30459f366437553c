"""AEPO, Arbitrary Entropy Policy Optimization (Wang et al., arXiv 2510.08141): entropy held at a target by a
REINFORCE regularizer on temperature-adjusted samples instead of an entropy bonus.

The gradient is (the paper's AEPO objective, as its authors' README states it)

    grad J_AEPO = grad J_GRPO + alpha * E_{o ~ pi_theta^T}[grad log pi_theta(o | q) * R(q, o)],

with pi_theta^T the policy sampled at temperature T, and T switched on the entropy of the last update:
T = T_high if H(pi_theta_old) <= H_target else T_low. Reinforcing good samples of a flatter distribution (T > 1)
raises the policy's entropy, of a sharper one (T < 1) lowers it, while the regularizer's samples are still rewarded
ones, so entropy is steered without a bonus that pulls against the reward.

These functions follow the authors' code, https://github.com/597358816/AEPO, `verl/trainer/ray_trainer.py`:
`RayPPOTrainer.fit`, branch `alg == "AEPO"` (the temperature switch, starting from entropy 0, the sample count) and
`_select_by_advantage(..., threshold=0.05, absolute=False)` (the rewarded samples: advantage > 0.05, whose advantage
is then set to 1, so R(q, o) = 1 and alpha is the share of the batch they take).
"""

import torch


def aepo_temperature(entropy: float, target: float, temperature_high: float, temperature_low: float) -> float:
    """The sampling temperature of the regularizer's samples: `temperature_high` when the policy's entropy (nats, the
    mean token entropy of the last update) is at or below `target`, else `temperature_low` (the authors' 1.2 / 0.8).

    >>> [aepo_temperature(entropy, 0.5, 1.2, 0.8) for entropy in (0.3, 0.5, 0.7)]
    [1.2, 1.2, 0.8]
    """
    return temperature_high if entropy <= target else temperature_low


def aepo_num_regularizer_samples(entropy: float, target: float, num_samples: int, num_selected: int) -> int:
    """How many rows of the batch the regularizer's samples replace: `min(num_samples, num_selected)` when entropy is
    at or below the target (raising it), half of that (rounded down) above it (the authors' `reinforce_sample_num`).

    >>> aepo_num_regularizer_samples(0.3, 0.5, 60, 100), aepo_num_regularizer_samples(0.3, 0.5, 60, 25)
    (60, 25)
    >>> aepo_num_regularizer_samples(0.7, 0.5, 60, 100), aepo_num_regularizer_samples(0.7, 0.5, 60, 25)
    (30, 12)
    """
    count = min(num_samples, num_selected)
    return count if entropy <= target else count // 2


def aepo_rewarded(advantages: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Which regularizer samples are rewarded, `(N,)` bool: advantage above `threshold` (of sequence advantages `(N,)`;
    of token advantages `(N, T)`, the first token's, as the authors' `advantages[:, 0]`).

    >>> aepo_rewarded(torch.tensor([0.5, 0.05, -1.0, 0.06]))
    tensor([ True, False, False,  True])
    """
    sequence_advantages = advantages[:, 0] if advantages.dim() == 2 else advantages
    return sequence_advantages > threshold
