"""Checks on what reward functions give, so that a bad reward is named at its source and never reaches the weights.

- `checked_reward_func` wraps a callable reward function (the trainer wraps each one it is given): its output must be
  a sequence with one real number or None per completion; anything else raises an error that names the function.
- `unscore_non_finite` marks a +-inf reward in the gathered `(N, F)` rewards as NaN: to TRL (and every trl_plus
  estimator) NaN means "this function did not score this completion", the same as a None returned by the function.
"""

import numbers

import torch
from trl.trainer.utils import is_async_callable


def check_reward_output(output, func_name: str, num_completions: int) -> list:
    """`output` as a list after checking it holds one real number or None per completion; raises naming the function.

    >>> check_reward_output([1.0, None, True], "exact_match", 3)
    [1.0, None, True]
    >>> check_reward_output(["1.0"], "exact_match", 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: Reward function 'exact_match' returned a str ('1.0') for completion 0; each reward must be a real ...
    """
    if isinstance(output, torch.Tensor):
        output = output.tolist() if output.dim() == 1 else output
    if isinstance(output, str | bytes | dict) or not hasattr(output, "__len__") or not hasattr(output, "__iter__"):
        raise TypeError(
            f"Reward function {func_name!r} returned a {type(output).__name__}; it must return a list with one "
            f"reward per completion ({num_completions} here)."
        )
    rewards = list(output)
    if len(rewards) != num_completions:
        raise ValueError(
            f"Reward function {func_name!r} returned {len(rewards)} rewards for {num_completions} completions; it "
            "must return exactly one per completion (None for one it does not score)."
        )
    for index, reward in enumerate(rewards):
        is_number = isinstance(reward, numbers.Real) or (isinstance(reward, torch.Tensor) and reward.numel() == 1)
        if reward is not None and not is_number:
            raise TypeError(
                f"Reward function {func_name!r} returned a {type(reward).__name__} ({reward!r:.40}) for completion "
                f"{index}; each reward must be a real number, or None for a completion it does not score."
            )
    return rewards


class CheckedRewardFunc:
    """A reward function whose output is checked by `check_reward_output`; TRL still sees the function's name."""

    def __init__(self, func, name: str):
        self.func = func
        self.__name__ = name

    def __call__(self, *args, completions, **kwargs):
        return check_reward_output(
            self.func(*args, completions=completions, **kwargs), self.__name__, len(completions)
        )


class AsyncCheckedRewardFunc(CheckedRewardFunc):
    """`CheckedRewardFunc` for an async reward function (TRL awaits it alongside the other async ones)."""

    async def __call__(self, *args, completions, **kwargs):
        output = await self.func(*args, completions=completions, **kwargs)
        return check_reward_output(output, self.__name__, len(completions))


def checked_reward_func(func, name: str):
    """`func` wrapped in the checking class that matches how TRL calls it (sync or async)."""
    return (AsyncCheckedRewardFunc if is_async_callable(func) else CheckedRewardFunc)(func, name)


def unscore_non_finite(rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards `(N, F)` (one column per reward function) with +-inf replaced by NaN, and the `(F,)` count replaced.

    >>> rewards, counts = unscore_non_finite(torch.tensor([[1.0, float("inf")], [float("nan"), -float("inf")]]))
    >>> rewards
    tensor([[1., nan],
            [nan, nan]])
    >>> counts
    tensor([0, 2])
    """
    is_infinite = torch.isinf(rewards_per_func)
    return rewards_per_func.masked_fill(is_infinite, torch.nan), is_infinite.sum(dim=0)
