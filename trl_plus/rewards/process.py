"""Process rewards: a reward function that scores each reasoning step, for GRPO's process supervision.

Wrap a function that returns, per completion, its step rewards and the completion-token index at which each step
ends; pass the wrapper in `reward_funcs`. `trl_plus.GRPOTrainer` then gives each token the sum of the group-normalized
rewards of the steps ending at or after it (arXiv 2402.03300 sec. 4.1.3, `trl_plus.algos.process_rewards`).
"""

from collections.abc import Callable


class ProcessReward:
    """A picklable wrapper marking `step_reward_fn` as a process reward function.

    `step_reward_fn(prompts=..., completions=..., completion_ids=..., **columns)` returns one `(step_rewards,
    step_end_indices)` pair per completion, indices counted in completion tokens from 0. Called by TRL, the wrapper
    keeps those steps for the trainer and returns the sum of each completion's step rewards, which TRL logs as
    `rewards/<name>/mean` (and dynamic sampling filters on).

    >>> def two_steps(completions, **kwargs):
    ...     return [([1.0, 0.5], [2, 5]) for _ in completions]
    >>> reward = ProcessReward(two_steps)
    >>> reward(completions=["a", "b"])
    [1.5, 1.5]
    >>> reward.last_steps[0]
    ([1.0, 0.5], [2, 5])
    """

    def __init__(self, step_reward_fn: Callable, name: str | None = None):
        self.step_reward_fn = step_reward_fn
        self.__name__ = name or getattr(step_reward_fn, "__name__", "process_reward")
        self.last_steps: list[tuple[list[float], list[int]]] | None = None

    def __call__(self, **kwargs) -> list[float | None]:
        self.last_steps = [(list(rewards), list(indices)) for rewards, indices in self.step_reward_fn(**kwargs)]
        return [float(sum(rewards)) if rewards else None for rewards, _ in self.last_steps]
