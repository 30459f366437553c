"""Reading trl_plus's own files in a checkpoint: a resume restores them all, or it stops with an error naming the file.

transformers' Trainer restores what it saved itself (weights, optimizer, scheduler, RNG states, trainer state). Each
trl_plus mechanism with state (the critic, the KL controller, dynamic sampling) saves files of its own, and the
checkpoint hook that loads one reads it through these helpers, so that a missing, truncated or mismatched file raises
before training continues instead of silently re-initializing that state.
"""

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import safetensors
import torch

T = TypeVar("T")


class CheckpointError(Exception):
    """A checkpoint cannot be resumed exactly: a file trl_plus saved in it is missing or unreadable."""


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A file (or folder) trl_plus saved in the checkpoint is not there."""


class UnreadableCheckpointFileError(CheckpointError, ValueError):
    """A file trl_plus saved in the checkpoint cannot be read, or does not hold what this trainer needs."""


def require_file(checkpoint: str, name: str, holds: str) -> str:
    """The path of `name` (a file or folder, relative to `checkpoint`); raises if it does not exist."""
    path = os.path.join(checkpoint, name)
    if not os.path.exists(path):
        raise MissingCheckpointFileError(
            f"Cannot resume from {checkpoint}: `{name}` ({holds}) is missing; without it the run would not continue "
            "as it was saved. Resume from a complete checkpoint."
        )
    return path


@contextmanager
def reading(checkpoint: str, name: str, holds: str) -> Iterator[None]:
    """Any error raised inside (a truncated file, a mismatched state) becomes an `UnreadableCheckpointFileError`."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        raise UnreadableCheckpointFileError(
            f"Cannot resume from {checkpoint}: `{name}` ({holds}) cannot be used ({type(error).__name__}: {error}). "
            "Resume from a complete checkpoint."
        ) from error


def read_file(checkpoint: str, name: str, holds: str, read: Callable[[str], T]) -> T:
    """`read(path)` of a file that must exist and be readable."""
    path = require_file(checkpoint, name, holds)
    with reading(checkpoint, name, holds):
        return read(path)


def read_json(path: str) -> Any:
    with open(path) as file:
        return json.load(file)


def read_torch(path: str) -> Any:
    return torch.load(path, weights_only=True)


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a safetensors file, from its header (a truncated file raises)."""
    with safetensors.safe_open(path, framework="pt") as file:
        return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}


def check_shapes(
    saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], allow_extra: bool = False
) -> None:
    """Raise `ValueError` unless `saved` has every tensor of `expected` with its shape (and no other unless
    `allow_extra`)."""
    missing = sorted(set(expected) - set(saved))
    mismatched = sorted(name for name in set(expected) & set(saved) if tuple(saved[name]) != tuple(expected[name]))
    extra = [] if allow_extra else sorted(set(saved) - set(expected))
    problems = [("it lacks the tensors", missing), ("other shapes for", mismatched), ("extra tensors", extra)]
    if missing or mismatched or extra:
        raise ValueError("; ".join(f"{problem} {names}" for problem, names in problems if names))


def read_sections(checkpoint: str, name: str, holds: str, read: Callable[[str], Any], sections: Mapping) -> None:
    """Restore a file saved as `{section: obj.state_dict()}` into `sections` (`{section: obj}`, objects with
    `load_state_dict`); the file must hold exactly those sections."""
    state = read_file(checkpoint, name, holds, read)
    with reading(checkpoint, name, holds):
        if not isinstance(state, dict) or set(state) != set(sections):
            saved = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"it holds the sections {saved}, expected {sorted(sections)}")
        for section, obj in sections.items():
            obj.load_state_dict(state[section])


def section_states(sections: Mapping) -> dict[str, Any]:
    """`{section: obj.state_dict()}`, what `read_sections` restores."""
    return {section: obj.state_dict() for section, obj in sections.items()}
