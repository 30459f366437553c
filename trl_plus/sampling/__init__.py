"""What is generated and kept: DAPO dynamic sampling (group filter, row bookkeeping, surplus buffer) and ReMax's
greedy rows."""

from .dynamic import SurplusBuffer, groups_with_signal, split_rows, stack_rows
from .remax import GreedyRowsLogitsProcessor, greedy_row_mask, greedy_rows_in_generate

__all__ = [
    "GreedyRowsLogitsProcessor",
    "SurplusBuffer",
    "greedy_row_mask",
    "greedy_rows_in_generate",
    "groups_with_signal",
    "split_rows",
    "stack_rows",
]
