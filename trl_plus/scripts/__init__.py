"""Command-line training: the algorithm table, the reward functions by name and the shared trl-style script."""

from .algorithms import ALGORITHMS, Algorithm

__all__ = ["ALGORITHMS", "Algorithm"]
