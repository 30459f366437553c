"""DAPO dynamic sampling (arXiv 2503.14476 sec. 3.2): keep only groups whose rewards are not all equal.

A batch is handled as a list of rows, one dict of tensors per completion, so rows from several generation rounds (of
different padded widths) and from the surplus buffer can be mixed, then stacked back into one padded batch. The
surplus buffer and the stream of extra prompts have state that checkpoints hold (`state_dict` / `load_state_dict`).
"""

from collections.abc import Callable, Iterable

import torch

# Prompts are left-padded (generation continues from the right end); everything else is right-padded.
LEFT_PADDED_KEYS = frozenset({"prompt_ids", "prompt_mask"})


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(N // group_size,)` bool: the group's scored rewards are not all equal, so its advantages are not all 0.

    NaN marks an unscored completion and is ignored; a group with no scored completion has no signal.

    >>> groups_with_signal(torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, float("nan")]), 2)
    tensor([ True, False, False])
    """
    grouped = rewards.view(-1, group_size)
    scored = ~torch.isnan(grouped)
    highest = grouped.masked_fill(~scored, -torch.inf).max(dim=1).values
    lowest = grouped.masked_fill(~scored, torch.inf).min(dim=1).values
    return scored.any(dim=1) & (highest > lowest)


def split_rows(batch: dict, num_rows: int) -> list[dict]:
    """Cut a batch into one dict per row, keeping only the per-row tensors (first dimension `num_rows`)."""
    keys = [key for key, value in batch.items() if isinstance(value, torch.Tensor) and value.dim() > 0]
    keys = [key for key in keys if batch[key].size(0) == num_rows]
    return [{key: batch[key][index] for key in keys} for index in range(num_rows)]


def stack_rows(rows: list[dict], pad_values: dict[str, float]) -> dict:
    """Stack rows into a batch, padding each key to its longest row (left for prompts) with `pad_values[key]`.

    >>> rows = [{"prompt_ids": torch.tensor([5]), "advantages": torch.tensor(1.0)},
    ...         {"prompt_ids": torch.tensor([6, 7]), "advantages": torch.tensor(2.0)}]
    >>> stack_rows(rows, {"prompt_ids": 0})["prompt_ids"]
    tensor([[0, 5],
            [6, 7]])
    """
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        width = max(value.size(0) for value in values)
        padded = []
        for value in values:
            padding = value.new_full((width - value.size(0), *value.shape[1:]), pad_values.get(key, 0))
            padded.append(torch.cat([padding, value] if key in LEFT_PADDED_KEYS else [value, padding]))
        batch[key] = torch.stack(padded)
    return batch


class SurplusBuffer:
    """Valid groups generated beyond what a step needed, kept (in order, whole groups) for the next step.

    Holds at most `capacity_groups` groups; `state_dict` / `load_state_dict` put it in checkpoints.
    """

    def __init__(self, group_size: int, capacity_groups: int):
        self.group_size = group_size
        self.capacity_groups = capacity_groups
        self.rows: list[dict] = []

    @property
    def num_groups(self) -> int:
        return len(self.rows) // self.group_size

    def take_all(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def put(self, rows: list[dict]) -> int:
        """Keep whole groups up to the capacity; returns how many groups did not fit."""
        room = self.capacity_groups * self.group_size - len(self.rows)
        kept = rows[: max(room, 0)]
        self.rows.extend(kept)
        return (len(rows) - len(kept)) // self.group_size

    def state_dict(self) -> dict:
        return {"rows": [{key: value.cpu() for key, value in row.items()} for row in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        _check_keys(self, state, {"rows"})
        if len(state["rows"]) % self.group_size:
            raise ValueError(f"{len(state['rows'])} buffered rows are not whole groups of {self.group_size}.")
        self.rows = list(state["rows"])


class PromptBatchStream:
    """Endless batches of prompts: the batches of `make_batches(0)`, then of `make_batches(1)`, ... (one iterable per
    epoch, e.g. a DataLoader whose sampler is seeded by the epoch). Its state is its position: the epoch and the
    number of batches taken from it, restored by skipping that many, so `make_batches(epoch)` must give the same
    batches every time it is called with the same epoch.

    >>> stream = PromptBatchStream(lambda epoch: [[epoch, 0], [epoch, 1]])
    >>> [next(stream) for _ in range(3)], stream.state_dict()
    ([[0, 0], [0, 1], [1, 0]], {'epoch': 1, 'batches_taken': 1})
    >>> resumed = PromptBatchStream(lambda epoch: [[epoch, 0], [epoch, 1]])
    >>> resumed.load_state_dict(stream.state_dict())
    >>> next(resumed)
    [1, 1]
    """

    def __init__(self, make_batches: Callable[[int], Iterable]):
        self._make_batches = make_batches
        self.epoch = 0
        self.batches_taken = 0  # from this epoch's iterable
        self._batches = None  # this epoch's iterator, started by the first batch taken from it

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._batches is None:
                self._batches = self._resume_epoch() if self.batches_taken else iter(self._make_batches(self.epoch))
            batch = next(self._batches, _END)
            if batch is not _END:
                self.batches_taken += 1
                return batch
            self.epoch, self.batches_taken, self._batches = self.epoch + 1, 0, None

    def _resume_epoch(self):
        """This epoch's iterator past the batches taken before a restored position."""
        # A DataLoader draws its workers' base seed from the global CPU RNG when its iteration starts. The run that
        # saved this position started this epoch before it saved its RNG states, which the Trainer restores; drawing
        # again here would shift every random number after the resume.
        with torch.random.fork_rng(devices=[]):
            batches = iter(self._make_batches(self.epoch))
            for _ in range(self.batches_taken):
                next(batches, None)
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        _check_keys(self, state, {"epoch", "batches_taken"})
        if not all(isinstance(state[key], int) and state[key] >= 0 for key in state):
            raise ValueError(f"{type(self).__name__} position must be integers >= 0, got {state}.")
        self.epoch, self.batches_taken, self._batches = state["epoch"], state["batches_taken"], None


_END = object()


def _check_keys(obj: object, state: dict, expected: set[str]) -> None:
    if not isinstance(state, dict) or set(state) != expected:
        saved = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{type(obj).__name__} state must have the keys {sorted(expected)}, got {saved}.")
