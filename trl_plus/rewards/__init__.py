"""Picklable reward functions for TRL trainers: DAPO overlong shaping, TTRL majority vote, process rewards, and
AI-feedback (judge) rewards."""

from .judge import JudgeReward
from .majority_vote import (
    GroupVote,
    MajorityVoteReward,
    extract_answer,
    fallback_extract_answer,
    majority_vote_labels,
    majority_vote_reward,
    math_equal,
    normalize_answer,
    normalized_equal,
    vote_groups,
)
from .overlong import OverlongPenalty, overlong_penalty
from .process import ProcessReward

__all__ = [
    "GroupVote",
    "JudgeReward",
    "MajorityVoteReward",
    "OverlongPenalty",
    "ProcessReward",
    "extract_answer",
    "fallback_extract_answer",
    "majority_vote_labels",
    "majority_vote_reward",
    "math_equal",
    "normalize_answer",
    "normalized_equal",
    "overlong_penalty",
    "vote_groups",
]
