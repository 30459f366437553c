"""Pure torch implementations of the algorithms: no transformers, accelerate or trl imports."""

from .advantage_shaping import ADVANTAGE_SHAPERS, entropy_shaped_advantages
from .advantages import (
    ADVANTAGES,
    GLOBALLY_WHITENED,
    grpo_advantages,
    kl_penalty_to_go,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from .aggregation import AGGREGATIONS, seq_mean_token_mean, seq_mean_token_sum_norm, token_mean
from .kl import KL_ESTIMATORS, k1, k2, k3
from .policy_losses import (
    POLICY_LOSSES,
    aspo_loss,
    ce_gppo_loss,
    clip_cov_loss,
    gppo_loss,
    kl_cov_loss,
    ppo_clip_loss,
    token_covariance,
)
from .registry import Registry, call_with_supported
from .value import (
    AdaptiveKLController,
    FixedKLController,
    ValuePretraining,
    clipped_value_loss,
    decoupled_gae,
    explained_variance,
    gae,
    kl_shaped_token_rewards,
    length_adaptive_lambda,
)

__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_SHAPERS",
    "AdaptiveKLController",
    "FixedKLController",
    "AGGREGATIONS",
    "GLOBALLY_WHITENED",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Registry",
    "ValuePretraining",
    "aspo_loss",
    "call_with_supported",
    "ce_gppo_loss",
    "clip_cov_loss",
    "clipped_value_loss",
    "decoupled_gae",
    "entropy_shaped_advantages",
    "explained_variance",
    "gae",
    "gppo_loss",
    "grpo_advantages",
    "k1",
    "k2",
    "k3",
    "kl_cov_loss",
    "kl_penalty_to_go",
    "kl_shaped_token_rewards",
    "length_adaptive_lambda",
    "masked_whiten",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "token_covariance",
    "token_mean",
]
