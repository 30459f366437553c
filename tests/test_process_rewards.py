"""Process-supervision advantages (GRPO with a PRM, arXiv 2402.03300 sec. 4.1.3): golden values derived by hand."""

import math

import pytest
import torch

from trl_plus.algos.advantages import grpo_advantages
from trl_plus.algos.process_rewards import process_advantages


def test_two_completions_two_steps_golden():
    # Group of G = 2, T = 5.
    #   completion 0: step rewards [2, 0] ending at tokens 1 and 3
    #   completion 1: step rewards [0, 0] ending at tokens 0 and 2
    # The group's 4 step rewards {2, 0, 0, 0}: mean = 0.5, deviations [1.5, -0.5, -0.5, -0.5],
    # sum of squares = 2.25 + 3 * 0.25 = 3, Bessel: var = 3 / (4 - 1) = 1, std = 1.
    # Normalized (eps = 0): completion 0 -> [1.5, -0.5], completion 1 -> [-0.5, -0.5].
    # A_{i,t} = sum of normalized rewards of the steps ending at or after t:
    #   completion 0: t=0: 1.5 - 0.5 = 1.0, t=1: 1.0, t=2: -0.5, t=3: -0.5, t=4 (after the last step): 0
    #   completion 1: t=0: -0.5 - 0.5 = -1.0, t=1: -0.5, t=2: -0.5, t=3: 0, t=4: 0
    advantages = process_advantages([[2.0, 0.0], [0.0, 0.0]], [[1, 3], [0, 2]], 2, 5, eps=0.0)
    expected = torch.tensor([[1.0, 1.0, -0.5, -0.5, 0.0], [-1.0, -0.5, -0.5, 0.0, 0.0]])
    assert advantages.shape == (2, 5)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected)


def test_default_eps_divides_by_std_plus_eps():
    # Same example with the default eps = 1e-4: every normalized reward is (r - mean) / (1 + 1e-4).
    advantages = process_advantages([[2.0, 0.0], [0.0, 0.0]], [[1, 3], [0, 2]], 2, 5)
    expected = torch.tensor([[1.0, 1.0, -0.5, -0.5, 0.0], [-1.0, -0.5, -0.5, 0.0, 0.0]]) / (1 + 1e-4)
    torch.testing.assert_close(advantages, expected)


def test_single_final_step_equals_grpo_outcome_normalization():
    # One step per completion, ending at its last token T_i - 1: the group's steps are exactly its outcome rewards,
    # so A_{i,t} = (r_i - mean_g r) / (std_g r + eps) on every token t < T_i and 0 after: GRPO (sec. 4.1.2).
    rewards = [1.0, 0.0, 0.5, 3.0, 2.0, 2.0, 2.0, -1.0]
    lengths = [4, 1, 6, 3, 6, 2, 5, 4]
    advantages = process_advantages([[r] for r in rewards], [[n - 1] for n in lengths], 4, 6)
    outcome = grpo_advantages(torch.tensor(rewards), 4)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    torch.testing.assert_close(advantages, outcome.unsqueeze(1) * mask)
    # A hand check of the first group {1, 0, 0.5, 3}: mean 1.125, sum of squared deviations
    # 0.015625 + 1.265625 + 0.390625 + 3.515625 = 5.1875, var = 5.1875 / 3, std = 1.31498...
    std = math.sqrt(5.1875 / 3)
    assert advantages[0, 0].item() == pytest.approx((1.0 - 1.125) / (std + 1e-4), abs=1e-6)
    assert advantages[3, 2].item() == pytest.approx((3.0 - 1.125) / (std + 1e-4), abs=1e-6)


def test_groups_are_normalized_separately_and_scale_free():
    # Group 0 (one completion): steps [0, 1, 2]: mean 1, var ((-1)^2 + 0 + 1^2) / 2 = 1 -> normalized [-1, 0, 1].
    # Group 1 (one completion): steps [10, 20, 30]: mean 20, var (100 + 0 + 100) / 2 = 100, std 10 -> [-1, 0, 1].
    # Steps end at tokens 0, 1, 2: A = [-1 + 0 + 1, 0 + 1, 1] = [0, 1, 1], then 0 at t = 3.
    advantages = process_advantages([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]], [[0, 1, 2], [0, 1, 2]], 1, 4, eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))


def test_nan_step_is_unscored_and_steps_at_one_token_add_up():
    # Completion 0: steps [2, 0]; completion 1: steps [NaN, 1]. The NaN is unscored, so the group's statistics are
    # over {2, 0, 1}: mean 1, deviations [1, -1, 0], Bessel var = 2 / 2 = 1, std 1 (with the NaN read as 0 they
    # would be mean 0.75, std 0.957). Normalized: completion 0 -> [1, -1], completion 1 -> [0 (NaN), 0].
    # Steps of completion 0 both ending at token 1 add up there: 1 - 1 = 0, so its row is [0, 0, 0].
    advantages = process_advantages([[2.0, 0.0], [float("nan"), 1.0]], [[1, 1], [0, 2]], 2, 3, eps=0.0)
    torch.testing.assert_close(advantages, torch.zeros(2, 3))
    # Moving completion 0's second step to token 2: A_0 = [1 - 1, 1 - 1, -1] = [0, 0, -1].
    advantages = process_advantages([[2.0, 0.0], [float("nan"), 1.0]], [[1, 2], [0, 2]], 2, 3, eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))


def test_degenerate_groups_give_zero():
    # A group with a single step: r - mean = 0. A group with equal steps: std 0, (r - mean) = 0.
    # A completion with no steps: all zeros.
    advantages = process_advantages([[5.0], [], [3.0, 3.0], [3.0]], [[2], [], [0, 1], [2]], 2, 3)
    torch.testing.assert_close(advantages, torch.zeros(4, 3))
    assert process_advantages([[], []], [[], []], 2, 4).shape == (2, 4)


@pytest.mark.parametrize(
    ("step_rewards", "step_end_indices", "group_size", "length", "match"),
    [
        ([[1.0], [0.0]], [[0]], 2, 3, "one list per completion"),
        ([[1.0], [0.0], [1.0]], [[0], [0], [0]], 2, 3, "multiple of group_size"),
        ([[1.0, 2.0], [0.0]], [[0], [0]], 2, 3, "2 step rewards but 1 step end"),
        ([[1.0], [0.0]], [[3], [0]], 2, 3, "outside"),
        ([[1.0], [0.0]], [[-1], [0]], 2, 3, "outside"),
    ],
)
def test_invalid_inputs_raise(step_rewards, step_end_indices, group_size, length, match):
    with pytest.raises(ValueError, match=match):
        process_advantages(step_rewards, step_end_indices, group_size, length)
