"""Per-token KL estimators between the policy and the reference model (Schulman, "Approximating KL divergence").

All take `(B, T)` log-probabilities (log space) and return a `(B, T)` estimate of KL(pi || pi_ref) per token.
"""

import torch

from .registry import Registry

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k1 = logp - logp_ref: unbiased, can be negative. The InstructGPT / REINFORCE++ reward penalty."""
    return log_prob - ref_log_prob


@KL_ESTIMATORS.register("k2")
def k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (logp - logp_ref)^2: biased, always >= 0, low variance."""
    return 0.5 * (log_prob - ref_log_prob) ** 2


@KL_ESTIMATORS.register("k3")
def k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1: unbiased and >= 0; what GRPO (arXiv 2402.03300) and TRL use.

    >>> k3(torch.tensor([0.0]), torch.tensor([0.0]))
    tensor([0.])
    """
    log_ratio = ref_log_prob - log_prob
    return torch.exp(log_ratio) - log_ratio - 1
