"""The running reward statistics of PPO's reward normalization (`trl_plus.algos.running_stats`): golden values derived
by hand and the merge property (batch by batch equals all at once, whatever the split)."""

import math
import random

import pytest
import torch

from trl_plus.algos.running_stats import (
    RunningMoments,
    ScoreNormalizer,
    batch_moments,
    merge_moments,
    normalize_scores,
)


def test_batch_moments_golden_values_and_nan_rows_left_out():
    # [2, 4, 4, 4, 5, 5, 7, 9]: mean 40 / 8 = 5; squared deviations 9+1+1+1+0+0+4+16 = 32; population std 2.
    count, mean, m2 = batch_moments(torch.tensor([2.0, 4, 4, 4, 5, 5, 7, 9, float("nan")]))
    assert (count, mean, m2) == (8, 5.0, 32.0)
    assert batch_moments(torch.tensor([float("nan")])) == (0, 0.0, 0.0)


def test_merge_moments_golden_values():
    # a = [1, 3]: n 2, mean 2, M2 (1 + 1) = 2.  b = [5]: n 1, mean 5, M2 0.
    # delta = 5 - 2 = 3; n = 3; mean = 2 + 3 * 1/3 = 3; M2 = 2 + 0 + 9 * 2 * 1 / 3 = 8
    # (directly: [1, 3, 5] has squared deviations 4 + 0 + 4 = 8).
    assert merge_moments((2, 2.0, 2.0), (1, 5.0, 0.0)) == (3, 3.0, 8.0)
    assert merge_moments((0, 0.0, 0.0), (2, 2.0, 2.0)) == (2, 2.0, 2.0)
    assert merge_moments((0, 0.0, 0.0), (0, 0.0, 0.0)) == (0, 0.0, 0.0)


def test_running_moments_golden_values():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 3.0]))
    moments.update(torch.tensor([5.0]))
    # [1, 3, 5]: mean 3, M2 8, population std sqrt(8 / 3) = 1.63299...
    assert (moments.count, moments.mean, moments.m2) == (3, 3.0, 8.0)
    assert moments.std == pytest.approx(math.sqrt(8 / 3), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_running_moments_over_any_split_equal_the_moments_of_all_the_data(seed):
    """Property: merging batch by batch (any sizes, including empty and single-value batches, shifted data whose
    naive sum of squares would lose precision) gives the mean and std of the whole data."""
    generator = random.Random(seed)
    data = torch.randn(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 1e4
    cuts = sorted(generator.sample(range(201), 12))
    moments = RunningMoments()
    for start, end in zip([0, *cuts], [*cuts, 200], strict=True):
        moments.update(data[start:end])
    assert moments.count == 200
    assert moments.mean == pytest.approx(data.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(data.std(correction=0).item(), rel=1e-9)


def test_normalize_scores_golden_values():
    # mean 1, std 2: (0 - 1) / 2 = -0.5, (4 - 1) / 2 = 1.5 clipped to 1.0, (-9 - 1) / 2 = -5 clipped to -1.
    scores = normalize_scores(torch.tensor([0.0, 4.0, -9.0, float("nan")]), 1.0, 2.0, clip=1.0, eps=0.0)
    assert scores[:3].tolist() == [-0.5, 1.0, -1.0] and math.isnan(scores[3])


def test_score_normalizer_uses_the_moments_of_every_batch_so_far_and_eval_does_not_update():
    normalizer = ScoreNormalizer(normalize=True, clip=None)
    first = normalizer(torch.tensor([1.0, 3.0]), update=True)  # mean 2, std 1
    assert first.tolist() == pytest.approx([-1.0, 1.0])
    second = normalizer(torch.tensor([5.0]), update=True)  # [1, 3, 5]: mean 3, std sqrt(8/3)
    assert second.item() == pytest.approx(2 / math.sqrt(8 / 3))
    evaluated = normalizer(torch.tensor([3.0, 100.0]), update=False)
    assert evaluated[0].item() == pytest.approx(0.0) and normalizer.moments.count == 3


def test_score_normalizer_clip_only_and_state_round_trip():
    clip_only = ScoreNormalizer(normalize=False, clip=0.5)
    assert clip_only(torch.tensor([-2.0, 0.25, 2.0]), update=True).tolist() == [-0.5, 0.25, 0.5]
    assert clip_only.moments.count == 0
    normalizer = ScoreNormalizer(normalize=True, clip=2.0)
    normalizer(torch.tensor([1.0, 2.0, 6.0]), update=True)
    restored = ScoreNormalizer(normalize=True, clip=2.0)
    restored.load_state_dict(normalizer.state_dict())
    assert restored.moments.state_dict() == normalizer.moments.state_dict()
    with pytest.raises(ValueError, match="expects the keys"):
        restored.load_state_dict({"count": 1})
    with pytest.raises(ValueError, match="not a valid"):
        restored.load_state_dict({"count": -1, "mean": 0.0, "m2": 0.0})
