"""DAPO soft overlong punishment as a picklable reward function (arXiv 2503.14476, sec. 3.4, eq. 13).

With L_max = `max_completion_length`, L_cache = `overlong_buffer_len` and factor = `overlong_penalty_factor`, a
completion of |y| tokens gets

    R_len(y) = 0                                          if |y| <= L_max - L_cache
    R_len(y) = factor * ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
    R_len(y) = -factor                                    if L_max < |y|

which is added to the task reward (pass it as one more entry of `reward_funcs`). The paper uses L_max = 20480,
L_cache = 4096 and factor 1.
"""

from trl.rewards import get_soft_overlong_punishment


class OverlongPenalty:
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13), scaled by `overlong_penalty_factor`.

    The shape is TRL's `trl.rewards.get_soft_overlong_punishment(L_max, L_cache)`, which this class calls and
    multiplies by the factor: with `overlong_penalty_factor=1.0` the rewards are exactly TRL's. What this class adds is
    the factor, argument validation and a state made only of plain numbers, so that pickling an instance never
    depends on how TRL implements its reward object (older TRL releases returned an unpicklable closure).

    Follows TRL's reward-function protocol: called as `func(prompts=..., completions=..., completion_ids=..., **kw)`,
    it reads only `completion_ids` (a list of N token-id lists) and returns N floats; `__name__` names its metric
    (`rewards/overlong_penalty/mean`).

    >>> penalty = OverlongPenalty(max_completion_length=20, overlong_buffer_len=5)
    >>> penalty(completion_ids=[[0] * 15, [0] * 17, [0] * 20, [0] * 21])
    [0.0, -0.4, -1.0, -1.0]
    >>> OverlongPenalty(20, 5, overlong_penalty_factor=0.5)(completion_ids=[[0] * 17])
    [-0.2]
    """

    __name__ = "overlong_penalty"

    def __init__(self, max_completion_length: int, overlong_buffer_len: int, overlong_penalty_factor: float = 1.0):
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise ValueError(f"max_completion_length must be an int, got {max_completion_length!r}.")
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}.")
        if isinstance(overlong_buffer_len, bool) or not isinstance(overlong_buffer_len, int):
            raise ValueError(f"overlong_buffer_len must be an int, got {overlong_buffer_len!r}.")
        if not 0 < overlong_buffer_len <= max_completion_length:
            raise ValueError(
                f"overlong_buffer_len must be > 0 and <= max_completion_length ({max_completion_length}), "
                f"got {overlong_buffer_len}."
            )
        if not overlong_penalty_factor >= 0:  # also rejects NaN
            raise ValueError(f"overlong_penalty_factor must be >= 0, got {overlong_penalty_factor}.")
        self.max_completion_length = max_completion_length
        self.overlong_buffer_len = overlong_buffer_len
        self.overlong_penalty_factor = float(overlong_penalty_factor)

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        base = get_soft_overlong_punishment(self.max_completion_length, self.overlong_buffer_len)
        # `+ 0.0` turns the -0.0 of a zero factor into 0.0.
        return [self.overlong_penalty_factor * reward + 0.0 for reward in base(completion_ids)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_completion_length={self.max_completion_length}, "
            f"overlong_buffer_len={self.overlong_buffer_len}, overlong_penalty_factor={self.overlong_penalty_factor})"
        )


def overlong_penalty(
    max_completion_length: int, overlong_buffer_len: int, overlong_penalty_factor: float = 1.0
) -> OverlongPenalty:
    """Build the DAPO overlong reward function: `OverlongPenalty(max_completion_length, overlong_buffer_len, factor)`.

    >>> overlong_penalty(max_completion_length=20, overlong_buffer_len=5)(completion_ids=[[0] * 18])
    [-0.6]
    """
    return OverlongPenalty(max_completion_length, overlong_buffer_len, overlong_penalty_factor)
