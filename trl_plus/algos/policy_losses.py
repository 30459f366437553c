"""Per-token policy losses (minimized).

Every registered loss takes `log_prob` and `old_log_prob` `(B, T)` (log space), `advantages` `(B, 1)` or `(B, T)` and
`mask` `(B, T)`, plus its own keyword hyperparameters, and returns `(per_token_loss, metrics)`: the `(B, T)` loss
before aggregation and a dict of `(B, T)` float indicators that the trainer averages over valid tokens and logs.
"""

import torch

from .registry import Registry

POLICY_LOSSES = Registry("policy loss")

# Bounds exp() of the log-ratio, so a clipped (zero-gradient) token can never backpropagate 0 * inf = NaN.
MAX_LOG_RATIO = 20.0


def _ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """exp(logp - old_logp) in at least float32: float16 overflows past e^11, and ASPO squares the ratio."""
    log_ratio = log_prob - old_log_prob
    log_ratio = log_ratio.to(torch.promote_types(log_ratio.dtype, torch.float32))
    return torch.exp(torch.clamp(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))


def _clip_metrics(is_low_clipped: torch.Tensor, is_high_clipped: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token clip indicators, named as TRL's metrics."""
    return {
        "clip_ratio/low_mean": is_low_clipped.float(),
        "clip_ratio/high_mean": is_high_clipped.float(),
        "clip_ratio/region_mean": (is_low_clipped | is_high_clipped).float(),
    }


def _dual_clip(per_token_loss: torch.Tensor, advantages: torch.Tensor, dual_clip_c: float, metrics: dict):
    """Dual clip (arXiv 1912.09729): for A < 0 the loss is at most -c A; records `clip_ratio/dual_mean`."""
    pg_loss3 = -advantages * dual_clip_c
    is_dual_clipped = (advantages < 0) & (per_token_loss > pg_loss3)
    metrics["clip_ratio/dual_mean"] = is_dual_clipped.float()
    return torch.where(is_dual_clipped, pg_loss3, per_token_loss)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
    delta: float | None = None,
):
    """PPO clip with decoupled bounds (Clip-Higher, DAPO arXiv 2503.14476 eq. 10) and optional dual-clip.

    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A). With `dual_clip_c` = c > 1 (arXiv 1912.09729 eq. 5), for
    A < 0 only, l = min(l, -c A): the loss is bounded by c |A| and its gradient is 0 once r > c. With `delta`
    (INTELLECT-2 two-sided clipping, arXiv 2505.07291; TRL's `delta`), the unclipped term uses min(r, delta).
    """
    ratio = _ratio(log_prob, old_log_prob)
    pg_loss1 = -advantages * (ratio if delta is None else torch.clamp(ratio, max=delta))
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = torch.maximum(pg_loss1, pg_loss2)
    is_low_clipped = (ratio < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (ratio > 1 + eps_high) & (advantages > 0)
    metrics = _clip_metrics(is_low_clipped, is_high_clipped)
    if dual_clip_c is not None:
        per_token_loss = _dual_clip(per_token_loss, advantages, dual_clip_c, metrics)
    return per_token_loss, metrics


@POLICY_LOSSES.register("aspo")
def aspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    aspo_neg_clip: float = 3.0,
    aspo_pos_clip: float = 3.0,
):
    """ASPO, asymmetric importance sampling (arXiv 2510.06062; Archer2.0 `compute_policy_loss_archer`).

    1. Hard mask: c_neg = max(r, 1 - eps_low) for A < 0, c_pos = min(r, 1 + eps_high) for A > 0; a clamped ratio is a
       constant, so those tokens get no gradient.
    2. Flipped weight for A > 0: l = -A c_pos / sg(c_pos)^2, value -A / c_pos, gradient -A (1/r) grad logp: good
       tokens the policy finds unlikely get MORE weight. A < 0 keeps l = -A c_neg.
    3. Soft dual clip (CISPO style, keeps the gradient): where c_neg > `aspo_neg_clip` use -A C_neg logp; where
       1 / c_pos > `aspo_pos_clip` use -A C_pos logp.
    """
    ratio = _ratio(log_prob, old_log_prob)
    is_positive = advantages > 0
    c_pos = torch.clamp(ratio, max=1 + eps_high)
    c_neg = torch.clamp(ratio, min=1 - eps_low)
    pos_loss = -advantages * c_pos / c_pos.detach() ** 2
    neg_loss = -advantages * c_neg
    is_pos_soft_clipped = is_positive & (1 / c_pos.detach() > aspo_pos_clip)
    is_neg_soft_clipped = ~is_positive & (c_neg.detach() > aspo_neg_clip)
    pos_loss = torch.where(is_pos_soft_clipped, -advantages * aspo_pos_clip * log_prob, pos_loss)
    neg_loss = torch.where(is_neg_soft_clipped, -advantages * aspo_neg_clip * log_prob, neg_loss)
    per_token_loss = torch.where(is_positive, pos_loss, neg_loss)
    is_low_clipped = (ratio < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (ratio > 1 + eps_high) & is_positive
    metrics = _clip_metrics(is_low_clipped, is_high_clipped)
    metrics["clip_ratio/soft_dual_mean"] = (is_pos_soft_clipped | is_neg_soft_clipped).float()
    return per_token_loss, metrics


def _gradient_preserving_clip_loss(
    log_prob, old_log_prob, advantages, *, eps_low, eps_high, beta_low, beta_high, dual_clip_c, delta
):
    ratio = _ratio(log_prob, old_log_prob)
    unit = ratio / ratio.detach()  # value 1, gradient grad logp: carries a bounded gradient through a clipped token
    is_low_clipped = (ratio < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (ratio > 1 + eps_high) & (advantages > 0)
    unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -advantages * unclipped_ratio
    per_token_loss = torch.where(is_low_clipped, -beta_low * (1 - eps_low) * unit * advantages, per_token_loss)
    per_token_loss = torch.where(is_high_clipped, -beta_high * (1 + eps_high) * unit * advantages, per_token_loss)
    metrics = _clip_metrics(is_low_clipped, is_high_clipped)
    if dual_clip_c is not None:
        per_token_loss = _dual_clip(per_token_loss, advantages, dual_clip_c, metrics)
    return per_token_loss, metrics


@POLICY_LOSSES.register("gppo")
def gppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
    delta: float | None = None,
):
    """GPPO, gradient-preserving clipping (Klear-Reasoner, arXiv 2508.07629, the GPPO objective of sec. 3).

    Where PPO clips (A < 0 and r < 1 - eps_low, or A > 0 and r > 1 + eps_high) the loss is
    -(1 -/+ eps) * (r / sg(r)) * A: its value is PPO's clipped value, but its gradient is -(1 -/+ eps) A grad logp
    instead of 0, so a clipped token keeps a gradient bounded by the clip bound. Elsewhere l = -r A, as PPO.
    `dual_clip_c` and `delta` act as in `ppo_clip_loss` (the authors' code applies dual-clip c = 3 to A < 0).
    """
    return _gradient_preserving_clip_loss(
        log_prob,
        old_log_prob,
        advantages,
        eps_low=eps_low,
        eps_high=eps_high,
        beta_low=1.0,
        beta_high=1.0,
        dual_clip_c=dual_clip_c,
        delta=delta,
    )


@POLICY_LOSSES.register("ce_gppo")
def ce_gppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    ce_gppo_beta_low: float = 0.75,
    ce_gppo_beta_high: float = 1.0,
    dual_clip_c: float | None = None,
    delta: float | None = None,
):
    """CE-GPPO (arXiv 2509.20712, its objective; the authors' `compute_gppo_loss_general_beta`, defaults beta1 = 0.75,
    beta2 = 1.0): GPPO with the clipped tokens' gradients scaled by beta1 (A < 0, r < 1 - eps_low: exploitation)
    and beta2 (A > 0, r > 1 + eps_high: exploration): l = -beta1 (1 - eps_low) (r / sg(r)) A, resp.
    -beta2 (1 + eps_high) (r / sg(r)) A. beta1 = beta2 = 1 is GPPO; beta1 < beta2 pushes entropy up.
    """
    return _gradient_preserving_clip_loss(
        log_prob,
        old_log_prob,
        advantages,
        eps_low=eps_low,
        eps_high=eps_high,
        beta_low=ce_gppo_beta_low,
        beta_high=ce_gppo_beta_high,
        dual_clip_c=dual_clip_c,
        delta=delta,
    )


def _masked_centered(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return values - (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_covariance(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cov_{i,t} = (logp - mean logp) (A - mean A), means over the valid tokens (arXiv 2505.22617 eq. 11), `(B, T)`."""
    advantages = advantages.expand_as(log_prob)
    return _masked_centered(log_prob.detach(), mask) * _masked_centered(advantages, mask)


@POLICY_LOSSES.register("clip_cov")
def clip_cov_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
    delta: float | None = None,
):
    """Clip-Cov (arXiv 2505.22617 sec. 4.2, verl `compute_policy_loss_clip_cov`).

    Among the valid tokens that PPO clipping left untouched and whose covariance lies in (lb, ub), pick at random
    max(1, int(ratio * #valid)) and zero their loss (and so their gradient); the rest get the clipped PPO loss
    (with `delta`, the unclipped term uses min(r, delta) as in `ppo_clip_loss`).
    """
    ratio = _ratio(log_prob, old_log_prob)
    pg_loss1 = -advantages * (ratio if delta is None else torch.clamp(ratio, max=delta))
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    valid = mask.bool()
    is_ppo_clipped = (pg_loss2 > pg_loss1) & valid
    cov = token_covariance(log_prob, advantages, mask)
    candidates = torch.nonzero((cov > clip_cov_lb) & (cov < clip_cov_ub) & valid & ~is_ppo_clipped)
    num_to_detach = max(int(clip_cov_ratio * valid.sum().item()), 1)
    chosen = candidates[torch.randperm(len(candidates), generator=generator, device="cpu")[:num_to_detach]]
    keep = torch.ones_like(ratio)
    keep[chosen[:, 0], chosen[:, 1]] = 0.0
    per_token_loss = torch.maximum(pg_loss1, pg_loss2) * keep
    return per_token_loss, {"clip_cov/detached_mean": 1.0 - keep, "clip_ratio/region_mean": is_ppo_clipped.float()}


@POLICY_LOSSES.register("kl_cov")
def kl_cov_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
):
    """KL-Cov (arXiv 2505.22617 sec. 4.2, verl `compute_policy_loss_kl_cov`).

    l = -r A (no clipping); the top max(1, int(ratio * #valid)) valid tokens by covariance also get
    + coef |logp - old_logp|.
    """
    ratio = _ratio(log_prob, old_log_prob)
    per_token_loss = -advantages * ratio
    penalty = kl_cov_coef * (log_prob - old_log_prob).abs()
    valid = mask.bool()
    cov = token_covariance(log_prob, advantages, mask).masked_fill(~valid, -torch.inf)
    num_valid = int(valid.sum().item())
    is_penalized = torch.zeros_like(valid)
    if num_valid > 0:
        top = torch.topk(cov.flatten(), max(int(kl_cov_ratio * num_valid), 1)).indices
        is_penalized.view(-1)[top] = True
    per_token_loss = torch.where(is_penalized, per_token_loss + penalty, per_token_loss)
    return per_token_loss, {"kl_cov/penalized_mean": is_penalized.float()}
