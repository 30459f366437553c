"""Generation accounting: how many completions and completion tokens a run has generated, over all processes.

Everything generated counts, whether it is trained on or not (groups dynamic sampling drops, ReMax's greedy rows), so
that two runs compare at equal generation cost. `state_dict` / `load_state_dict` put the counts in checkpoints, so a
resumed run continues them.
"""


class GenerationCounter:
    """Cumulative generated completions and tokens.

    >>> counter = GenerationCounter()
    >>> counter.add(num_completions=8, num_tokens=40)
    >>> counter.add(num_completions=8, num_tokens=24)
    >>> counter.state_dict()
    {'completions': 16, 'tokens': 64}
    """

    def __init__(self):
        self.completions = 0
        self.tokens = 0

    def add(self, num_completions: int, num_tokens: int) -> None:
        self.completions += num_completions
        self.tokens += num_tokens

    def state_dict(self) -> dict:
        return {"completions": self.completions, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"completions", "tokens"}:
            saved = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"GenerationCounter state must have the keys ['completions', 'tokens'], got {saved}.")
        if not all(isinstance(value, int) and value >= 0 for value in state.values()):
            raise ValueError(f"GenerationCounter counts must be integers >= 0, got {state}.")
        self.completions, self.tokens = state["completions"], state["tokens"]
