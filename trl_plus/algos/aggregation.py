"""How a `(B, T)` per-token loss becomes one scalar.

Each function returns this micro-batch's share of the loss. `token_mean` takes the token count of the whole
accumulated global batch (`num_tokens`), so that summing the shares of all processes and accumulation steps gives the
global mean whichever way the batch was split.
"""

import torch

from .registry import Registry

AGGREGATIONS = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, *, num_tokens: torch.Tensor | None = None):
    """Sum of the loss over valid tokens / `num_tokens` (DAPO, arXiv 2503.14476 eq. 8; TRL `loss_type="dapo"`).

    `num_tokens` defaults to this batch's own count of valid tokens (at least 1).

    >>> token_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.)
    """
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    else:  # a share of the global count can be < 1, so only 0 (no valid token anywhere) is guarded
        num_tokens = torch.as_tensor(num_tokens, dtype=per_token_loss.dtype).clamp(
            min=torch.finfo(per_token_loss.dtype).tiny
        )
    return (per_token_loss * mask).sum() / num_tokens


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor):
    """Mean over each sequence's valid tokens, then mean over sequences (GRPO, arXiv 2402.03300; TRL `grpo`).

    >>> seq_mean_token_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.5000)
    """
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_length: int):
    """Sum over valid tokens / (B * max_length), a constant (Dr. GRPO, arXiv 2503.20783; TRL `dr_grpo`).

    >>> seq_mean_token_sum_norm(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [1, 0]]), max_length=4)
    tensor(1.1250)
    """
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_length)
