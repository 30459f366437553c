"""What is generated and kept: the sampler (DAPO dynamic sampling, surplus buffer, extra-prompt stream, GRESO
selective rollout), generation accounting, ReMax's greedy rows and TTRL's vote-only completions."""

from .accounting import GenerationCounter
from .dynamic import PromptBatchStream, SurplusBuffer, groups_with_signal, split_rows, stack_rows
from .remax import (
    GreedyRowsLogitsProcessor,
    append_greedy_completions,
    greedy_last_in_vllm_server,
    greedy_row_mask,
    greedy_rows_in_generate,
    greedy_rows_in_vllm_colocate,
)
from .sampler import Sampler
from .selective import SelectiveRollout, adapted_exploration, keep_probability
from .votes import ExtraVotes, check_num_votes

__all__ = [
    "ExtraVotes",
    "GenerationCounter",
    "GreedyRowsLogitsProcessor",
    "PromptBatchStream",
    "Sampler",
    "SelectiveRollout",
    "SurplusBuffer",
    "adapted_exploration",
    "append_greedy_completions",
    "check_num_votes",
    "greedy_last_in_vllm_server",
    "greedy_row_mask",
    "greedy_rows_in_generate",
    "greedy_rows_in_vllm_colocate",
    "groups_with_signal",
    "keep_probability",
    "split_rows",
    "stack_rows",
]
