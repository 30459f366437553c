"""The training prompts' order of every epoch, reproducible after a resume.

TRL's `RepeatSampler` seeds its generator once, at construction, and draws one permutation per pass (epoch) from it.
transformers' Trainer builds a fresh sampler when it resumes and only skips batches inside the resumed epoch, so a run
resumed in epoch `e > 0` replays epoch 0's order where the uninterrupted run had epoch `e`'s: not exact, for TRL's own
`GRPOTrainer` too. `EpochOrder` wraps the sampler and gives it the `set_epoch` that transformers (and accelerate's
dataloader shards) call before each epoch: it puts the generator where an uninterrupted run has it at that epoch, the
seeded state advanced by `epoch` permutations. An uninterrupted run draws exactly TRL's permutations.
"""

import torch
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler


class EpochOrder(Sampler):
    """`sampler`, TRL's `RepeatSampler`, with `set_epoch(epoch)`: the next pass yields that epoch's order.

    >>> plain = RepeatSampler(range(4), mini_repeat_count=1, batch_size=2, seed=0)
    >>> first, second = list(plain), list(plain)
    >>> order = EpochOrder(RepeatSampler(range(4), mini_repeat_count=1, batch_size=2, seed=0))
    >>> order.set_epoch(1)  # a run resumed in its second epoch
    >>> list(order) == second
    True
    """

    def __init__(self, sampler: RepeatSampler):
        self.sampler = sampler
        self._seeded_state = sampler.generator.get_state() if sampler.shuffle else None

    def set_epoch(self, epoch: int) -> None:
        if self._seeded_state is None:
            return  # not shuffled: every epoch has the same order
        generator = self.sampler.generator
        generator.set_state(self._seeded_state)
        for _ in range(epoch):  # RepeatSampler.__iter__ draws one permutation per pass
            torch.randperm(self.sampler.num_samples, generator=generator)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
