"""TRL 1.16's entropy bonus (`entropy_coef`, `use_adaptive_entropy`) for losses computed outside TRL's `_compute_loss`.

TRL applies the bonus inside `_compute_loss` and exposes no function for it, so the registry loss path applies it here
with TRL's meaning: loss -= coef * (mean entropy over the tokens the policy loss acts on) / accumulation steps, the
coefficient fixed for the optimizer step, and the adaptive controller stepping it by `entropy_coef_delta` toward
`entropy_target` at each optimizer-step boundary from the window-global mean entropy.

The controller's state stays in TRL's own trainer attributes (`entropy_coef`, `_last_world_entropy`,
`_entropy_window_stats`), so TRL's checkpoint file `entropy_ctrl_state.json` saves and restores it unchanged;
tests/test_trl_contract.py pins those names.
"""

import torch


def apply_entropy_bonus(trainer, loss, policy_loss, entropies, effective_mask, mode: str):
    """`loss` minus the entropy bonus; logs `policy_loss` and `entropy_coef` as TRL does. `entropies` and
    `effective_mask` are `(B, T)`; `policy_loss` is the detached loss before the bonus (unscaled for accumulation)."""
    if not trainer._entropy_bonus_enabled:
        return loss
    args, metrics = trainer.args, trainer._metrics[mode]
    accumulation_steps = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_steps
    # The coefficient (and, adaptively, its gate) of the previous optimizer step: every micro-batch of a step
    # applies the same bonus.
    if trainer.use_adaptive_entropy:
        coef = trainer.entropy_coef if trainer._last_world_entropy <= args.entropy_target else 0.0
    else:
        coef = trainer.entropy_coef
    loss = loss - coef * entropy_loss
    metrics["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    if trainer.use_adaptive_entropy and mode == "train":
        _step_controller(trainer, torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach())
    if mode == "train" and trainer.accelerator.sync_gradients:
        metrics["entropy_coef"].append(trainer.entropy_coef)
    return loss


def _step_controller(trainer, stats: torch.Tensor) -> None:
    """Accumulate (entropy sum, token count) over the accumulation window; at its end, move the coefficient one
    `entropy_coef_delta` up (entropy at or below target) or down, within [entropy_coef_min, entropy_coef_max]."""
    args = trainer.args
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None
