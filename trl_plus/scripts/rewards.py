r"""Reward functions by name, for `--reward_funcs` of `trl-plus <algorithm>` and the example scripts.

`REWARD_FUNCS` maps a name to a factory that takes the training config and returns a TRL reward function:

- TRL's: `accuracy_reward` and `reasoning_accuracy_reward` (math answers against the `solution` column; they need
  `pip install math-verify`), `think_format_reward` (`<think>...</think>` format) and `get_soft_overlong_punishment`
  (DAPO's length penalty with L_max = `max_completion_length` and L_cache = L_max / 5, TRL's script's ratio).
- trl_plus's: `answer_match_reward` (the final answer, by math-verify when installed, else the last `\boxed{}` or
  number, against the `solution` or `answer` column, GSM8K's `#### 42` included; works without math-verify) and
  `majority_vote_reward` (TTRL: the group's majority answer is the label, no ground truth read). DAPO's overlong
  shaping is a config field instead: `--overlong_buffer_len` (and `--overlong_penalty_factor`).

Any other name with a dot is imported: `--reward_funcs my_lib.rewards.my_reward`.
"""

import importlib
import os
import sys
from collections.abc import Callable

from accelerate.utils import gather_object
from trl.rewards import accuracy_reward, get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward

from ..rewards import MajorityVoteReward, extract_answer, math_equal

ANSWER_COLUMNS = ("solution", "answer")


class AnswerMatchReward:
    r"""1.0 when a completion's final answer equals the reference answer, else 0.0.

    The final answer of a text is `trl_plus.rewards.extract_answer`'s (math-verify's extraction when it is installed,
    else the last `\boxed{}` content or the last number; both read GSM8K's `#### 42`); a text without one is compared
    whole, stripped. The
    reference is the `solution` column, else `answer`. Answers are compared with `trl_plus.rewards.math_equal`.

    >>> answer_match_reward(completions=["so it is \\boxed{12}", "13", "cba"], solution=["#### 12", "12", "cba"])
    [1.0, 0.0, 1.0]
    """

    __name__ = "answer_match_reward"

    def __call__(self, completions: list, **kwargs) -> list[float]:
        column = next((name for name in ANSWER_COLUMNS if kwargs.get(name) is not None), None)
        if column is None:
            raise ValueError(f"answer_match_reward needs a reference answer column, one of {list(ANSWER_COLUMNS)}.")
        rewards = []
        for completion, reference in zip(completions, kwargs[column], strict=True):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            answer, label = _final_answer(text), _final_answer(str(reference))
            rewards.append(float(answer is not None and label is not None and math_equal(label, answer)))
        return rewards


def _final_answer(text: str) -> str | None:
    return extract_answer(text) or text.strip() or None


answer_match_reward = AnswerMatchReward()


def _soft_overlong_punishment(args) -> Callable:
    if getattr(args, "overlong_buffer_len", None) is not None:
        raise ValueError(
            "`--overlong_buffer_len` already adds DAPO's overlong penalty to the rewards; drop "
            "`get_soft_overlong_punishment` from `--reward_funcs`, or unset `--overlong_buffer_len`."
        )
    return get_soft_overlong_punishment(args.max_completion_length, max(1, args.max_completion_length // 5))


REWARD_FUNCS: dict[str, Callable[..., Callable]] = {
    "accuracy_reward": lambda args: accuracy_reward,
    "reasoning_accuracy_reward": lambda args: reasoning_accuracy_reward,
    "think_format_reward": lambda args: think_format_reward,
    "get_soft_overlong_punishment": _soft_overlong_punishment,
    "answer_match_reward": lambda args: answer_match_reward,
    # Groups can straddle processes: the vote gathers every process's completions first.
    "majority_vote_reward": lambda args: MajorityVoteReward(gather_fn=gather_object),
}


def get_reward_funcs(names: list[str], args) -> list[Callable]:
    """The reward functions named in `names` (keys of `REWARD_FUNCS` or dotted import paths), built for `args`."""
    reward_funcs = []
    for name in names:
        if name in REWARD_FUNCS:
            reward_funcs.append(REWARD_FUNCS[name](args))
        elif "." in name:
            module_path, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())  # as TRL's script: a module next to the command is found
            reward_funcs.append(getattr(importlib.import_module(module_path), attribute))
        else:
            raise ValueError(
                f"Unknown reward function {name!r}: expected one of {list(REWARD_FUNCS)} or a dotted import path "
                "(e.g. my_lib.rewards.my_reward)."
            )
    return reward_funcs
