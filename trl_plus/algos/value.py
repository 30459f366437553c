"""Critic-side math for PPO and VAPO: GAE, KL-shaped token rewards, the clipped value loss, KL controllers.

All tensors are `(B, T)` over completion tokens, right-padded, with `mask` 1 (or True) on real completion tokens.
`values[:, t]` is the critic's V(s_t) for completion token t; the state after the last valid token is terminal, so its
value is 0. Sources: GAE (arXiv 1506.02438), InstructGPT-style RLHF (arXiv 2203.02155), VAPO (arXiv 2504.05118) and
the adaptive KL controller (arXiv 1909.08593). The math is in ALGORITHMS.md.
"""

from typing import Any

import torch

from .aggregation import token_mean


def _as_lambda(lam: float | torch.Tensor, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """`lam` as a `(B,)` or 0-dim tensor on `like`'s device and dtype; a tensor must be 0-dim or `(B,)`."""
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam.dim() > 1 or (lam.dim() == 1 and lam.numel() != batch_size):
        raise ValueError(f"lam must be a float or a (B,) = ({batch_size},) tensor, got shape {tuple(lam.shape)}.")
    return lam


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (arXiv 1506.02438 eq. 16) over `(B, T)` completion tokens.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last valid token (terminal);
    A_t = delta_t + gamma lam A_{t+1} = sum_l (gamma lam)^l delta_{t+l}; returns R_t = A_t + V_t.
    lam = 0 gives the one-step TD error; lam = 1 gives the discounted return-to-go minus V_t.

    `token_rewards`, `values` and `mask` are `(B, T)`; `lam` is a float or a `(B,)` tensor (one lambda per sequence,
    as VAPO's `length_adaptive_lambda`). Returns `(advantages, returns)`, each `(B, T)` and 0 on padding, in at least
    float32 (bf16 values are promoted: the recursion accumulates over T). They are targets: no gradient flows.
    Whatever padding holds (even NaN) is ignored. A masked token between valid ones (a hole) is skipped: the
    recursion carries V and A across it, as if it were not in the sequence.

    >>> advantages, returns = gae(
    ...     torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 9.0]]), torch.tensor([[1, 1, 0]]), 1.0, 0.5
    ... )
    >>> advantages  # delta = [0 + 0.5 - 0.5, 1 + 0 - 0.5] = [0, 0.5]; A_0 = 0 + 0.5 * 0.5
    tensor([[0.2500, 0.5000, 0.0000]])
    >>> returns
    tensor([[0.7500, 1.0000, 0.0000]])
    """
    if not token_rewards.shape == values.shape == mask.shape or token_rewards.dim() != 2:
        raise ValueError(
            "token_rewards, values and mask must all be (B, T); got "
            f"{tuple(token_rewards.shape)}, {tuple(values.shape)} and {tuple(mask.shape)}."
        )
    dtype = torch.promote_types(torch.promote_types(token_rewards.dtype, values.dtype), torch.float32)
    rewards, values = token_rewards.to(dtype), values.to(dtype)
    valid = mask.bool()
    batch_size, seq_len = values.shape
    discount = gamma * _as_lambda(lam, batch_size, values)  # gamma * lambda, 0-dim or (B,)

    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(batch_size)  # V(s_{t+1}); 0 after the last valid token (terminal state)
    last_advantage = values.new_zeros(batch_size)  # A_{t+1}
    for t in reversed(range(seq_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + discount * last_advantage
        # On a masked token carry the running values unchanged: trailing padding keeps the terminal zeros.
        last_advantage = torch.where(valid[:, t], advantage, last_advantage)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float = 0.05, min_lambda: float = 0.0) -> torch.Tensor:
    """VAPO's length-adaptive GAE lambda (arXiv 2504.05118, "Length-Adaptive GAE"): 1 - 1 / (alpha * l), floored.

    Chosen so that the total weight of the TD errors, sum_t lambda^t = 1 / (1 - lambda), equals alpha * l: long
    sequences bootstrap less (lambda near 1), short ones more. `lengths` `(B,)` are the valid completion lengths
    (`mask.sum(-1)`); returns `(B,)` floats, max(1 - 1 / (alpha * l), min_lambda) clamped into [0, 1].

    Short completions. For l <= 1 / alpha (20 tokens at the paper's alpha = 0.05) the formula is <= 0: a horizon of
    alpha * l < 1 token cannot be had (lambda = 0, one-step TD, is the shortest), and a negative lambda would flip the
    sign of every other TD error. The paper does not meet this case: it sets alpha for long chain-of-thought answers
    (AIME with Qwen2.5-32B, hundreds to thousands of tokens), and the formula's stated purpose is to raise lambda for
    long sequences, where VC-PPO's fixed 0.95 (arXiv 2503.01491, "Decoupled-GAE") decays the end-of-sequence reward
    before it reaches the early tokens. Clamping short completions to 0 makes their policy gradient rest entirely on
    the critic's one-step TD errors, which collapsed VAPO on short-answer tasks (benchmarks/README.md). `min_lambda`
    floors the result instead: the trainers pass the policy lambda `lam` (VC-PPO's 0.95), so length adaptation only
    ever raises lambda above 0.95 (for l > 1 / (alpha * 0.05) = 400 tokens at alpha = 0.05), which is the regime the
    paper's results come from; `min_lambda = 0` gives the bare formula, clamped at 0 (l = 0 also gives the floor).

    >>> length_adaptive_lambda(torch.tensor([4, 100, 400, 1000]))  # 1 - 1/0.2 = -4 -> 0; 1 - 1/5; 1 - 1/20; 1 - 1/50
    tensor([0.0000, 0.8000, 0.9500, 0.9800])
    >>> length_adaptive_lambda(torch.tensor([4, 100, 400, 1000]), min_lambda=0.95)  # only 1000 tokens beat the floor
    tensor([0.9500, 0.9500, 0.9500, 0.9800])
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    if not 0.0 <= min_lambda <= 1.0:
        raise ValueError(f"min_lambda must be in [0, 1], got {min_lambda}.")
    lengths = torch.as_tensor(lengths)
    lengths = lengths.to(torch.promote_types(lengths.dtype, torch.get_default_dtype()))
    return (1.0 - 1.0 / (alpha * lengths)).clamp(min=min_lambda, max=1.0)


def decoupled_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lambda_critic: float | torch.Tensor,
    lambda_policy: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAPO decoupled GAE (arXiv 2504.05118, "Decoupled-GAE"): one lambda for the critic, another for the policy.

    Value targets are the GAE returns with `lambda_critic` (VAPO: 1.0, so with gamma = 1 they are the Monte-Carlo
    reward-to-go, unbiased by the critic's own errors); policy advantages are the GAE advantages with `lambda_policy`
    (VAPO: 0.95, or `length_adaptive_lambda(mask.sum(-1))`). Either lambda is a float or a `(B,)` tensor. Returns
    `(policy_advantages, value_returns)`, each `(B, T)` and 0 on padding; see `gae`.

    >>> policy_advantages, value_returns = decoupled_gae(
    ...     torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]), 1.0, 1.0, 0.0
    ... )
    >>> policy_advantages  # one-step TD errors: [0 + 0.5 - 0.5, 1 + 0 - 0.5]
    tensor([[0.0000, 0.5000]])
    >>> value_returns  # reward-to-go
    tensor([[1., 1.]])
    """
    _, value_returns = gae(token_rewards, values, mask, gamma, lambda_critic)
    policy_advantages, _ = gae(token_rewards, values, mask, gamma, lambda_policy)
    return policy_advantages, value_returns


def kl_shaped_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """InstructGPT-style token rewards (arXiv 2203.02155 eq. 2): r_t = -beta * KL_t, plus the score on the last token.

    `scores` `(B,)` are the sequence rewards; `kl` `(B, T)` is the per-token KL estimate, usually k1 = logp_old -
    logp_ref (log space, no gradient); `mask` `(B, T)`. Returns `(B, T)`: -beta * kl on every valid token, the score
    added on the last valid token, 0 on padding. A row with no valid token gets all zeros (its score is dropped).

    >>> kl_shaped_token_rewards(torch.tensor([1.0]), torch.tensor([[0.5, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]), 0.1)
    tensor([[-0.0500,  0.8000,  0.0000]])
    """
    valid = mask.bool()
    seq_len = valid.size(-1)
    # Index of the last valid token: the first valid one of the reversed row.
    last = seq_len - 1 - valid.flip(-1).int().argmax(-1)
    positions = torch.arange(seq_len, device=valid.device)
    is_last = (positions == last.unsqueeze(-1)) & valid.any(-1, keepdim=True)
    rewards = torch.where(valid, -beta * kl, 0.0)
    return rewards + torch.where(is_last, scores.unsqueeze(-1).to(rewards.dtype), 0.0)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None,
    *,
    num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO value loss with clipping (arXiv 2203.02155; ALGORITHMS.md "PPO components"), minimized.

    vf_loss1 = (V - R)^2, vf_loss2 = (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2 and the per-token loss is
    0.5 * max(vf_loss1, vf_loss2); `cliprange_value=None` gives 0.5 * (V - R)^2. `values` (with gradient),
    `old_values` (the critic at rollout time) and `returns` are `(B, T)`. Returns `(loss, clipfrac)`, both 0-dim:
    the token mean of the per-token loss (`token_mean`: summed over valid tokens, divided by `num_tokens`, default
    this batch's count of valid tokens) and the fraction of valid tokens where the clipped term is strictly larger
    (`value_clipfrac`; 0 without clipping).

    >>> loss, clipfrac = clipped_value_loss(
    ...     torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), 0.2
    ... )
    >>> loss  # V_clipped = 0.7: 0.5 * (max(1.0, 1.69) + max(1.0, 0.49)) / 2
    tensor(0.6725)
    >>> clipfrac
    tensor(0.5000)
    """
    vf_loss1 = (values - returns) ** 2
    if cliprange_value is None:
        per_token_loss = 0.5 * vf_loss1
        is_clipped = torch.zeros_like(vf_loss1, dtype=torch.bool)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        vf_loss2 = (values_clipped - returns) ** 2
        per_token_loss = 0.5 * torch.maximum(vf_loss1, vf_loss2)
        # Counted on clamp(V, V_old - eps, V_old + eps), which is V itself inside the range (TRL's old PPOTrainer,
        # verl): V_old + (V - V_old) can round away from V and count an unclipped token as clipped.
        values_in_range = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
        is_clipped = (values_in_range - returns) ** 2 > vf_loss1
    valid = mask.bool()
    per_token_loss = torch.where(valid, per_token_loss, 0.0)  # padding may hold anything, even NaN
    loss = token_mean(per_token_loss, valid.to(per_token_loss.dtype), num_tokens=num_tokens)
    clipfrac = token_mean((is_clipped & valid).float(), valid.float())
    return loss, clipfrac.detach()


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the valid tokens of `(B, T)` tensors (population variances): a critic metric.

    1 for a perfect critic, 0 for one that predicts the mean return, negative for one worse than that. Returns a 0-dim
    float tensor (at least float32). When the returns do not vary (Var(R) <= float eps * mean(R^2 + V^2), which
    covers constant returns up to rounding) or no token is valid, the ratio is undefined and the result is 0, never
    NaN. Finite inputs give a finite result: when float32 squares overflow (|x| > ~1e19), it is computed in float64.

    >>> explained_variance(torch.tensor([[1.5, 2.0, 2.5]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 1]]))
    tensor(0.7500)
    """
    dtype = torch.promote_types(torch.promote_types(values.dtype, returns.dtype), torch.float32)
    return _explained_variance(values, returns, mask, dtype)


def _explained_variance(values, returns, mask, dtype: torch.dtype) -> torch.Tensor:
    valid = mask.bool()
    weights = valid.to(dtype)
    returns = torch.where(valid, returns.to(dtype), 0.0)
    residuals = torch.where(valid, returns - values.to(dtype), 0.0)

    def masked_var(x: torch.Tensor) -> torch.Tensor:
        return token_mean(torch.where(valid, x - token_mean(x, weights), 0.0) ** 2, weights)

    var_returns = masked_var(returns)
    # Scaled by the values too: returns that are 0 up to rounding (e.g. from GAE on all-zero rewards) are degenerate.
    scale = token_mean(returns**2 + torch.where(valid, values.to(dtype), 0.0) ** 2, weights)
    if not torch.isfinite(scale) and dtype != torch.float64:  # the squares overflowed: the same in float64
        return _explained_variance(values, returns, mask, torch.float64).to(dtype)
    degenerate = var_returns <= torch.finfo(dtype).eps * scale
    ratio = masked_var(residuals) / torch.where(degenerate, 1.0, var_returns)
    return torch.where(degenerate, 0.0, 1.0 - ratio)


class ValuePretraining:
    """When value pretraining ends: as soon as the critic is ready, at the latest after `max_steps` optimizer steps.

    VAPO (arXiv 2504.05118, "Value-Pretraining") trains the value model on Monte-Carlo returns of the fixed initial
    policy until its value loss and explained variance reach good values, and VC-PPO (arXiv 2503.01491, value
    pretraining ablation) finds that pretraining longer than needed does not help. Ready: the mean explained variance
    of the last `window` rollouts is >= `threshold` (each measured on a fresh rollout with the critic that produced
    its values, before the critic trains on it: a held-out score). `threshold=None` keeps a fixed count of
    `max_steps` steps. Call `record` once per training rollout while `active`, and `reach_cap` before each
    optimizer step; both return True once, when pretraining ends. The state (`state_dict`) goes into checkpoints.

    >>> schedule = ValuePretraining(max_steps=10, threshold=0.5, window=2)
    >>> [schedule.record(ev, step) for step, ev in enumerate([0.1, 0.6, 0.7])]  # means: -, 0.35, 0.65 >= 0.5
    [False, False, True]
    >>> schedule.end_step, schedule.ready, schedule.active(3)  # the policy trains from optimizer step 3 on
    (2, True, False)
    """

    def __init__(self, max_steps: int, threshold: float | None, window: int):
        if not max_steps >= 0 or not window >= 1:
            raise ValueError(f"max_steps must be >= 0 and window >= 1, got {max_steps} and {window}.")
        self.max_steps, self.threshold, self.window = int(max_steps), threshold, int(window)
        self.explained_variances: list[float] = []  # the last `window` rollouts' explained variances
        self.end_step: int | None = None  # optimizer steps the critic trained alone; None while pretraining
        self.ready: bool | None = None  # at the end: whether the readiness criterion was met
        self.end_explained_variance: float | None = None  # the window's mean at the end

    @property
    def finished(self) -> bool:
        return self.end_step is not None or self.max_steps == 0

    def active(self, global_step: int) -> bool:
        """Whether optimizer step `global_step + 1` trains the critic alone."""
        return not self.finished and global_step < self.max_steps

    def window_mean(self) -> float | None:
        values = self.explained_variances
        return sum(values) / len(values) if values else None

    def record(self, explained_variance: float, global_step: int) -> bool:
        """Add a rollout's explained variance; True when the critic is now ready (the last critic-only step is
        `global_step`, the policy trains from the next one)."""
        self.explained_variances = [*self.explained_variances, float(explained_variance)][-self.window :]
        full = len(self.explained_variances) == self.window
        if self.threshold is not None and full and self.window_mean() >= self.threshold:
            self._finish(global_step, ready=True)
            return True
        return False

    def reach_cap(self, global_step: int) -> bool:
        """True (once) when `global_step` optimizer steps reached the cap with pretraining still on."""
        if self.finished or global_step < self.max_steps:
            return False
        self._finish(self.max_steps, ready=self.threshold is None)
        return True

    def _finish(self, end_step: int, ready: bool) -> None:
        self.end_step, self.ready, self.end_explained_variance = end_step, ready, self.window_mean()

    def state_dict(self) -> dict[str, Any]:
        return {
            "explained_variances": list(self.explained_variances),
            "end_step": self.end_step,
            "ready": self.ready,
            "end_explained_variance": self.end_explained_variance,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_keys(self, state_dict, {"explained_variances", "end_step", "ready", "end_explained_variance"})
        self.explained_variances = [float(value) for value in state_dict["explained_variances"]][-self.window :]
        self.end_step = None if state_dict["end_step"] is None else int(state_dict["end_step"])
        self.ready = state_dict["ready"]
        end_explained_variance = state_dict["end_explained_variance"]
        self.end_explained_variance = None if end_explained_variance is None else float(end_explained_variance)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_steps={self.max_steps}, threshold={self.threshold}, window={self.window}, "
            f"end_step={self.end_step}, ready={self.ready})"
        )


def _check_coef(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return value


class FixedKLController:
    """A constant KL coefficient beta, with the interface of `AdaptiveKLController`.

    >>> controller = FixedKLController(0.05)
    >>> controller.update(current_kl=100.0, n_steps=64)
    0.05
    """

    def __init__(self, kl_coef: float):
        self.value = _check_coef("kl_coef", kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Does nothing; returns beta."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_keys(self, state_dict, {"value"})
        self.value = _check_coef("value", state_dict["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., arXiv 1909.08593 sec. 2.2), a proportional controller on log beta.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon). `current_kl` is the KL per
    sequence measured on the last batch (sum over tokens of logp_old - logp_ref, averaged over sequences) and `n_steps`
    the number of sequences in that batch. Keep n_steps / horizon < 5: beyond it the factor can turn negative.

    >>> controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    >>> round(controller.update(current_kl=9.0, n_steps=256), 6)  # e = clip(0.5) = 0.2; 0.1 * (1 + 0.2 * 0.0256)
    0.100512
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _check_coef("init_kl_coef", init_kl_coef)
        self.target = _check_positive("target", target)
        self.horizon = _check_positive("horizon", horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """One controller step; returns the new beta."""
        current_kl = float(current_kl)
        if current_kl != current_kl or abs(current_kl) == float("inf"):
            raise ValueError(f"current_kl must be finite, got {current_kl}.")
        if not n_steps >= 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}.")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_keys(self, state_dict, {"value", "target", "horizon"})
        value = _check_coef("value", state_dict["value"])  # validate everything before changing anything
        target = _check_positive("target", state_dict["target"])
        horizon = _check_positive("horizon", state_dict["horizon"])
        self.value, self.target, self.horizon = value, target, horizon

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value}, target={self.target}, horizon={self.horizon})"


def _check_keys(controller: object, state_dict: dict[str, Any], expected: set[str]) -> None:
    if set(state_dict) != expected:
        raise ValueError(
            f"{type(controller).__name__}.load_state_dict expects the keys {sorted(expected)}, "
            f"got {sorted(state_dict)}."
        )
