"""What is generated and kept: DAPO dynamic sampling (group filter, row bookkeeping, surplus buffer, extra-prompt
stream) and ReMax's greedy rows."""

from .dynamic import PromptBatchStream, SurplusBuffer, groups_with_signal, split_rows, stack_rows
from .remax import (
    GreedyRowsLogitsProcessor,
    append_greedy_completions,
    greedy_last_in_vllm_server,
    greedy_row_mask,
    greedy_rows_in_generate,
    greedy_rows_in_vllm_colocate,
)

__all__ = [
    "GreedyRowsLogitsProcessor",
    "PromptBatchStream",
    "append_greedy_completions",
    "greedy_last_in_vllm_server",
    "greedy_rows_in_vllm_colocate",
    "SurplusBuffer",
    "greedy_row_mask",
    "greedy_rows_in_generate",
    "groups_with_signal",
    "split_rows",
    "stack_rows",
]
