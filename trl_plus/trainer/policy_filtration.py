"""PF-PPO (arXiv 2409.06957) on a training batch: the weights of `trl_plus.algos.POLICY_FILTERS` applied to the rows.

What it does to the number of trained completions and to the loss normalization: a completion of weight 0 is not
trained on. Its completion mask is zeroed and `num_items_in_batch` recounted, so it leaves the loss and every
normalizer (the token count of `dapo` / `token_mean`, the sequence count of `grpo`, the KL and entropy terms, PPO's
value loss) exactly as if it had not been generated; with `best_of_n` / `max_min` the loss is the configured
aggregation over the kept completions only. The kept completions' advantages are multiplied by their weight divided
by the mean non-zero weight of the generation batch (over every process), so the kept weights average 1: 0/1
selections leave the kept advantages unchanged, and soft weights (`pow`, `max_random`) move gradient between the kept
completions without changing its overall scale. Every policy loss is positively homogeneous in the advantage
(min(r * wA, clip(r) * wA) = w * min(r * A, clip(r) * A) for w >= 0), so this scales each completion's policy-gradient
term by its weight. That is the expectation of verl's multinomial resampling of the batch by the same weights, whose
copies would each count in the normalizers instead, without its sampling noise.
"""

from collections.abc import Callable

import torch

from ..algos import normalize_filter_weights


def filter_batch(output: dict, weights: torch.Tensor, all_reduce_sum: Callable, gather: Callable) -> float:
    """Apply the raw filter weights `(B,)` of this process's rows to `output` in place (`all_reduce_sum` and `gather`
    are the trainer's collectives, run once each on every process); returns the share of the generation batch's
    completions kept."""
    weights = weights.to(output["advantages"].device, torch.float32)
    kept = weights > 0
    totals = all_reduce_sum(torch.stack([weights.sum(), kept.sum().float(), weights.new_tensor(float(len(weights)))]))
    total_weight, num_kept, num_rows = totals.tolist()
    weights = normalize_filter_weights(weights, total_weight, num_kept)
    kept = weights > 0
    advantages = output["advantages"]
    output["advantages"] = advantages * (weights if advantages.dim() == 1 else weights.unsqueeze(1))
    output["completion_mask"] = output["completion_mask"] * kept.unsqueeze(1).to(output["completion_mask"].dtype)
    loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
    output["num_items_in_batch"] = gather(loss_mask.sum()).sum()
    return (num_kept if num_kept else num_rows) / max(num_rows, 1.0)
