"""Picklable reward functions for TRL trainers: DAPO overlong shaping and TTRL majority vote."""

from .majority_vote import (
    MajorityVoteReward,
    extract_answer,
    majority_vote_labels,
    majority_vote_reward,
    math_equal,
    normalize_answer,
    normalized_equal,
)
from .overlong import OverlongPenalty, overlong_penalty

__all__ = [
    "MajorityVoteReward",
    "OverlongPenalty",
    "extract_answer",
    "majority_vote_labels",
    "majority_vote_reward",
    "math_equal",
    "normalize_answer",
    "normalized_equal",
    "overlong_penalty",
]
