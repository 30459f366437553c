"""DAPO dynamic sampling: the group filter, row bookkeeping and the surplus buffer (no trl imports)."""

from .dynamic import SurplusBuffer, groups_with_signal, split_rows, stack_rows

__all__ = ["SurplusBuffer", "groups_with_signal", "split_rows", "stack_rows"]
