"""Token-level advantage transforms applied in the loss, after any estimator: `(B, 1)` or `(B, T)` -> `(B, T)`.

Every registered transform takes `advantages` `(B, 1)` or `(B, T)`, `entropies` `(B, T)` (the current policy's token
entropies, in nats), `mask` `(B, T)` and its keyword hyperparameters, and returns `(B, T)` advantages.
"""

import torch

from .registry import Registry

ADVANTAGE_SHAPERS = Registry("advantage transform")


@ADVANTAGE_SHAPERS.register("entropy")
def entropy_shaped_advantages(
    advantages: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor, *, alpha: float, kappa: float
) -> torch.Tensor:
    """Entropy-based advantage shaping (Cheng et al., arXiv 2506.14758 sec. 3):
    A'_t = A_t + psi(H_t), psi(H_t) = min(alpha * sg(H_t), |A_t| / kappa).

    The bonus carries no gradient (H_t is detached: the policy gradient is reweighted, entropy itself is not
    maximized), is >= 0, and is at most |A_t| / kappa: with kappa > 1 a negative advantage stays negative.
    Padding tokens get 0.

    >>> entropy_shaped_advantages(
    ...     torch.tensor([[1.0], [-1.0]]), torch.tensor([[0.5, 2.0], [0.5, 2.0]]), torch.ones(2, 2),
    ...     alpha=0.4, kappa=2.0)
    tensor([[ 1.2000,  1.5000],
            [-0.8000, -0.5000]])
    """
    advantages = advantages.expand_as(entropies)
    bonus = torch.minimum(alpha * entropies.detach(), advantages.abs() / kappa)
    return (advantages + bonus) * mask
