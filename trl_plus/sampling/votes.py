"""TTRL's vote/train split (arXiv 2504.16084): completions generated only to vote on the pseudo-label.

The paper votes over N completions per prompt and trains on M < N of them (the authors' code: N = 64, M = 32, the
first M of each prompt, `select_top_k_per_prompt` in PRIME-RL/TTRL `verl/trainer/ppo/ttrl_utils.py`). Here the M
trained completions are TRL's usual `num_generations` per prompt, and N / M - 1 more generation calls on the same
prompts give the rest: each call has the shape of the usual one, so every generation backend (transformers, vLLM
colocate or server) and every split of groups across processes works unchanged, and row i of every call is a
completion of row i's prompt. `ExtraVotes` holds what those calls generated until the reward functions read it, as
the `ttrl_votes` column (one list of vote-only completions per trained row).
"""

from collections.abc import Sequence

from ..rewards.majority_vote import VOTES_COLUMN


def check_num_votes(num_votes: int, group_size: int) -> None:
    """Raise unless `num_votes` is a multiple of `group_size` (the trained completions per prompt) above it.

    >>> check_num_votes(64, 32)
    >>> check_num_votes(48, 32)
    Traceback (most recent call last):
    ...
    ValueError: `ttrl_num_votes` is 48; valid: a multiple of num_generations (32) greater than it, e.g. 64.
    """
    if (
        isinstance(num_votes, bool)
        or not isinstance(num_votes, int)
        or num_votes <= group_size
        or num_votes % group_size
    ):
        raise ValueError(
            f"`ttrl_num_votes` is {num_votes!r}; valid: a multiple of num_generations ({group_size}) greater than it, "
            f"e.g. {2 * group_size}."
        )


class ExtraVotes:
    """The vote-only completions of one generation round, from `extra_rounds` extra calls, until the rewards read them.

    >>> votes = ExtraVotes(num_votes=6, group_size=2)
    >>> votes.extra_rounds
    2
    >>> votes.collect([["a1", "b1"], ["a2", "b2"]])  # two extra calls over the rows of prompts a and b
    >>> votes.attach([{"prompt": "a"}, {"prompt": "b"}])
    [{'prompt': 'a', 'ttrl_votes': ['a1', 'a2']}, {'prompt': 'b', 'ttrl_votes': ['b1', 'b2']}]
    """

    def __init__(self, num_votes: int, group_size: int):
        check_num_votes(num_votes, group_size)
        self.num_votes = num_votes
        self.extra_rounds = num_votes // group_size - 1
        self._pending: list[list] | None = None

    def collect(self, rounds: Sequence[Sequence]) -> None:
        """Keep the completions of the extra calls: `rounds[r][i]` is call r's completion of row i."""
        if len(rounds) != self.extra_rounds or len({len(completions) for completions in rounds}) > 1:
            raise ValueError(f"Expected {self.extra_rounds} extra generation calls over the same rows.")
        self._pending = [list(row_votes) for row_votes in zip(*rounds, strict=True)]

    def attach(self, inputs: list[dict]) -> list[dict]:
        """The rows with their vote-only completions in the `ttrl_votes` column; the held votes are consumed."""
        if self._pending is None:
            raise RuntimeError("No vote-only completions were generated for these rows (ttrl_num_votes).")
        pending, self._pending = self._pending, None
        if len(pending) != len(inputs):
            raise RuntimeError(f"{len(pending)} rows of vote-only completions for {len(inputs)} rows to score.")
        return [{**row, VOTES_COLUMN: row_votes} for row, row_votes in zip(inputs, pending, strict=True)]
