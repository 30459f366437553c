"""Process rewards: a reward function that scores each reasoning step, for GRPO's process supervision.

Wrap a function that returns, per completion, its step rewards and the completion-token index at which each step
ends; pass the wrapper in `reward_funcs`. `trl_plus.GRPOTrainer` then gives each token the sum of the group-normalized
rewards of the steps ending at or after it (arXiv 2402.03300 sec. 4.1.3, `trl_plus.algos.process_rewards`).
"""

import operator
from collections.abc import Callable


class ProcessReward:
    """A picklable wrapper marking `step_reward_fn` as a process reward function.

    `step_reward_fn(prompts=..., completions=..., completion_ids=..., **columns)` returns one `(step_rewards,
    step_end_indices)` pair per completion, indices counted in completion tokens from 0: each must be an int below
    the completion's length in tokens (`len(completion_ids[i])`), or the call raises, naming it. Called by TRL, the
    wrapper keeps those steps for the trainer and returns the sum of each completion's step rewards, which TRL logs as
    `rewards/<name>/mean` (and dynamic sampling filters on).

    >>> def two_steps(completions, **kwargs):
    ...     return [([1.0, 0.5], [2, 5]) for _ in completions]
    >>> reward = ProcessReward(two_steps)
    >>> reward(completions=["a", "b"], completion_ids=[[7] * 6, [7] * 8])
    [1.5, 1.5]
    >>> reward.last_steps[0]
    ([1.0, 0.5], [2, 5])
    >>> reward(completions=["a"], completion_ids=[[7] * 5])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Step end index 5 of completion 0, from ... two_steps, is outside ... (5 tokens); valid: 0 to 4.
    """

    def __init__(self, step_reward_fn: Callable, name: str | None = None):
        self.step_reward_fn = step_reward_fn
        self.__name__ = name or getattr(step_reward_fn, "__name__", "process_reward")
        self.last_steps: list[tuple[list[float], list[int]]] | None = None

    def __call__(self, **kwargs) -> list[float | None]:
        completion_ids = kwargs.get("completion_ids")
        self.last_steps = [
            (list(rewards), [self._step_end(index, row, completion_ids) for index in indices])
            for row, (rewards, indices) in enumerate(self.step_reward_fn(**kwargs))
        ]
        return [float(sum(rewards)) if rewards else None for rewards, _ in self.last_steps]

    def _step_end(self, index, row: int, completion_ids: list[list[int]] | None) -> int:
        """`index` as an int, checked against the length of completion `row` (when TRL passed the token ids)."""
        where = f"Step end index {index!r} of completion {row}, from the step function {self._step_fn_name},"
        try:
            position = None if isinstance(index, bool) else operator.index(index)  # int(2.7) would give token 2
        except TypeError:
            position = None
        if position is None:
            raise TypeError(f"{where} is not an int; valid: a completion-token index (int) from 0.")
        length = None if completion_ids is None else len(completion_ids[row])
        if position < 0 or (length is not None and position >= length):
            size = "" if length is None else f" ({length} tokens)"
            valid = "0 or more" if length is None else f"0 to {length - 1}" if length else "none"
            raise ValueError(f"{where} is outside the completion{size}; valid: {valid}.")
        return position

    @property
    def _step_fn_name(self) -> str:
        return getattr(self.step_reward_fn, "__name__", type(self.step_reward_fn).__name__)
