"""ReMax's greedy baseline decoded in the same `generate` call as the sampled completions (arXiv 2310.10505)."""

import functools
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def greedy_row_mask(num_rows: int, row_offset: int, group_size: int) -> torch.Tensor:
    """`(num_rows,)` bool: the rows that are the last of their group (global index `row_offset + i`).

    >>> greedy_row_mask(4, 2, 3)
    tensor([ True, False, False,  True])
    """
    return (row_offset + torch.arange(num_rows)) % group_size == group_size - 1


class GreedyRowsLogitsProcessor(LogitsProcessor):
    """Turns sampling into greedy decoding for the chosen rows: every logit but the row's argmax becomes -inf.

    Placed after the other processors, the argmax is that of the processed scores, as `do_sample=False` would pick.
    """

    def __init__(self, greedy_rows: torch.Tensor):
        self.greedy_rows = greedy_rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy_scores = torch.full_like(scores, -torch.inf)
        greedy_scores.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
        rows = self.greedy_rows.to(scores.device).unsqueeze(1)
        return torch.where(rows, greedy_scores, scores)


@contextmanager
def greedy_rows_in_generate(model, greedy_rows: torch.Tensor):
    """Within the block, `model.generate` decodes `greedy_rows` greedily and samples the other rows."""
    processors = LogitsProcessorList([GreedyRowsLogitsProcessor(greedy_rows)])
    model.generate = functools.partial(model.generate, logits_processor=processors)
    try:
        yield
    finally:
        del model.generate  # the instance attribute; the class's method is visible again
