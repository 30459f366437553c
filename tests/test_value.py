"""Tests of `trl_plus.algos.value`: GAE, VAPO's decoupled and length-adaptive GAE, KL-shaped rewards, the clipped value
loss, explained variance and the KL controllers.

Golden numbers are derived by hand in the comments next to them. Sources: GAE (arXiv 1506.02438), InstructGPT
(arXiv 2203.02155), VAPO (arXiv 2504.05118), REINFORCE++ (arXiv 2501.03262) and the adaptive KL controller
(arXiv 1909.08593).
"""

import math

import pytest
import torch
from torch.testing import assert_close

from trl_plus.algos.advantages import kl_penalty_to_go
from trl_plus.algos.value import (
    AdaptiveKLController,
    FixedKLController,
    ValuePretraining,
    clipped_value_loss,
    decoupled_gae,
    explained_variance,
    gae,
    kl_shaped_token_rewards,
    length_adaptive_lambda,
)

NAN = float("nan")

# Two sequences, the second right-padded with garbage in its padding.
#   row 0: r = [0, 0, 1],   V = [0.5, 0.4, 0.6], 3 valid tokens
#   row 1: r = [0.5, -1],   V = [0.2, 0.3],      2 valid tokens (padding: r = 7, V = 9)
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 7.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.6], [0.2, 0.3, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _random_batch(seed: int, batch_size: int = 4, seq_len: int = 7):
    """Random rewards and values with right padding of random lengths (at least one row full, one row empty)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch_size, seq_len, generator=generator, dtype=torch.float64)
    values = torch.randn(batch_size, seq_len, generator=generator, dtype=torch.float64)
    lengths = torch.randint(0, seq_len + 1, (batch_size,), generator=generator)
    lengths[0], lengths[-1] = seq_len, 0
    mask = torch.arange(seq_len) < lengths.unsqueeze(-1)
    return rewards, values, mask


def _reward_to_go(rewards, mask, gamma):
    """sum_{l >= 0} gamma^l r_{t+l} over valid tokens, by a direct double loop (no recursion)."""
    batch_size, seq_len = rewards.shape
    out = torch.zeros_like(rewards)
    for b in range(batch_size):
        for t in range(seq_len):
            if mask[b, t]:
                out[b, t] = sum(gamma ** (s - t) * rewards[b, s] for s in range(t, seq_len) if mask[b, s])
    return out


# ----------------------------------------------------------------------------------------------------
# GAE (arXiv 1506.02438)


def test_gae_golden_values_two_padded_sequences():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72; the value after the last valid token is 0.
    # row 0: delta_2 = 1 + 0.9 * 0   - 0.6 =  0.4
    #        delta_1 = 0 + 0.9 * 0.6 - 0.4 =  0.14
    #        delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    #        A_2 = 0.4; A_1 = 0.14 + 0.72 * 0.4 = 0.428; A_0 = -0.14 + 0.72 * 0.428 = -0.14 + 0.30816 = 0.16816
    #        R = A + V = [0.66816, 0.828, 1.0]
    # row 1: delta_1 = -1 + 0.9 * 0 - 0.3 = -1.3 (the padding's V = 9 is not the next value)
    #        delta_0 = 0.5 + 0.9 * 0.3 - 0.2 = 0.57
    #        A_1 = -1.3; A_0 = 0.57 + 0.72 * (-1.3) = 0.57 - 0.936 = -0.366
    #        R = [-0.366 + 0.2, -1.3 + 0.3, 0] = [-0.166, -1.0, 0]
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[0.16816, 0.428, 0.4], [-0.366, -1.3, 0.0]]))
    assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [-0.166, -1.0, 0.0]]))


def test_gae_per_sequence_lambda_golden_values():
    # row 0 keeps lam = 0.8 (as above); row 1 gets lam = 0.5, gamma * lam = 0.45:
    #   A_1 = -1.3; A_0 = 0.57 + 0.45 * (-1.3) = 0.57 - 0.585 = -0.015; R_0 = -0.015 + 0.2 = 0.185
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=torch.tensor([0.8, 0.5]))
    assert_close(advantages, torch.tensor([[0.16816, 0.428, 0.4], [-0.015, -1.3, 0.0]]))
    assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [0.185, -1.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_per_sequence_lambda_equals_each_row_with_its_own_scalar(seed):
    rewards, values, mask = _random_batch(seed)
    lambdas = torch.tensor([0.0, 0.3, 0.95, 1.0], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, 0.97, lambdas)
    for b, lam in enumerate(lambdas.tolist()):
        row_advantages, row_returns = gae(rewards[b : b + 1], values[b : b + 1], mask[b : b + 1], 0.97, lam)
        assert_close(advantages[b : b + 1], row_advantages)
        assert_close(returns[b : b + 1], row_returns)


def test_gae_rows_are_independent_of_their_batch():
    # Row 1 alone gives the same numbers as inside the batch (A = [-0.366, -1.3, 0] from the golden test).
    advantages, _ = gae(REWARDS[1:], VALUES[1:], MASK[1:], gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[-0.366, -1.3, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_lambda_zero_gives_one_step_td_errors(seed):
    # A_t = delta_t = r_t + gamma V_{t+1} - V_t, with V_{t+1} = 0 past the last valid token.
    rewards, values, mask = _random_batch(seed)
    gamma = 0.9
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    td_errors = (rewards + gamma * next_values - values) * mask
    advantages, returns = gae(rewards, values, mask, gamma, 0.0)
    assert_close(advantages, td_errors)
    assert_close(returns, (rewards + gamma * next_values) * mask)  # R = A + V = the one-step target


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_one_gives_discounted_return_to_go_minus_value(gamma):
    # lam = 1: the V terms telescope, A_t = sum_l gamma^l r_{t+l} - V_t and R_t = the (discounted) return-to-go.
    rewards, values, mask = _random_batch(3)
    reward_to_go = _reward_to_go(rewards, mask, gamma)
    advantages, returns = gae(rewards, values, mask, gamma, 1.0)
    assert_close(advantages, (reward_to_go - values) * mask)
    assert_close(returns, reward_to_go)


def test_gae_lambda_one_gamma_one_golden_values():
    # row 0: reward-to-go = [1, 1, 1], A = [1 - 0.5, 1 - 0.4, 1 - 0.6] = [0.5, 0.6, 0.4]
    # row 1: reward-to-go = [0.5 - 1, -1] = [-0.5, -1], A = [-0.5 - 0.2, -1 - 0.3] = [-0.7, -1.3]
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    assert_close(advantages, torch.tensor([[0.5, 0.6, 0.4], [-0.7, -1.3, 0.0]]))
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [-0.5, -1.0, 0.0]]))


def test_gae_padding_yields_zeros_and_is_ignored_even_when_nan():
    rewards, values = REWARDS.clone(), VALUES.clone()
    rewards[1, 2], values[1, 2] = NAN, NAN
    empty_row = torch.tensor([[NAN, 5.0, -3.0]])
    rewards = torch.cat([rewards, empty_row])
    values = torch.cat([values, empty_row])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Same golden numbers as test_gae_golden_values_two_padded_sequences; the empty row is all 0.
    assert_close(advantages, torch.tensor([[0.16816, 0.428, 0.4], [-0.366, -1.3, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [-0.166, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_skips_a_masked_token_inside_the_sequence():
    # mask [1, 0, 1]: the middle token is skipped, so the result equals GAE on the 2-token row [r_0, r_2].
    # gamma = 0.9, lam = 0.8, r = [0, x, 1], V = [0.5, x, 0.6]:
    #   delta_2 = 1 - 0.6 = 0.4; delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04; A_0 = 0.04 + 0.72 * 0.4 = 0.328
    advantages, returns = gae(
        torch.tensor([[0.0, 50.0, 1.0]]), torch.tensor([[0.5, -50.0, 0.6]]), torch.tensor([[1, 0, 1]]), 0.9, 0.8
    )
    assert_close(advantages, torch.tensor([[0.328, 0.0, 0.4]]))
    assert_close(returns, torch.tensor([[0.828, 0.0, 1.0]]))


def test_gae_promotes_bfloat16_and_does_not_track_gradients():
    values = VALUES.to(torch.bfloat16).requires_grad_(True)
    advantages, returns = gae(REWARDS.to(torch.bfloat16), values, MASK, gamma=1.0, lam=1.0)
    assert advantages.dtype == returns.dtype == torch.float32
    assert not advantages.requires_grad and not returns.requires_grad
    # bf16(0.4) = 0.400390625, bf16(0.6) = 0.6015625: A_2 of row 0 = 1 - 0.6015625
    assert advantages[0, 2].item() == pytest.approx(1 - 0.6015625, abs=1e-7)


def test_gae_rejects_mismatched_shapes_and_lambda():
    with pytest.raises(ValueError, match="must all be"):
        gae(REWARDS, VALUES[:, :2], MASK, 1.0, 1.0)
    with pytest.raises(ValueError, match="lam must be"):
        gae(REWARDS, VALUES, MASK, 1.0, torch.tensor([0.9, 0.9, 0.9]))


# ----------------------------------------------------------------------------------------------------
# VAPO (arXiv 2504.05118): length-adaptive lambda and decoupled GAE


def test_length_adaptive_lambda_golden_values_and_clamp():
    # alpha = 0.05: lambda = 1 - 1 / (0.05 l) = 1 - 20 / l
    #   l = 100 -> 0.8; 200 -> 0.9; 1000 -> 0.98; 20 -> 0 (exactly); 40 -> 0.5
    #   l = 10 -> 1 - 2 = -1, clamped to 0; l = 1 -> -19 -> 0; l = 0 -> 1 - inf -> 0
    lambdas = length_adaptive_lambda(torch.tensor([100, 200, 1000, 20, 40, 10, 1, 0]))
    assert_close(lambdas, torch.tensor([0.8, 0.9, 0.98, 0.0, 0.5, 0.0, 0.0, 0.0]))
    assert lambdas.dtype == torch.float32
    # alpha = 0.1: 1 - 10 / l; l = 20 -> 0.5, l = 100 -> 0.9
    assert_close(length_adaptive_lambda(torch.tensor([20.0, 100.0]), alpha=0.1), torch.tensor([0.5, 0.9]))


def test_length_adaptive_lambda_floor_golden_values():
    # alpha = 0.05, floor 0.95 (VAPO's default: the floor is lam): lambda = max(1 - 20 / l, 0.95)
    #   l = 4 -> 1 - 5 = -4 -> 0.95; l = 100 -> 0.8 -> 0.95; l = 400 -> 0.95 (the formula meets the floor)
    #   l = 500 -> 0.96; l = 2000 -> 0.99; l = 0 -> 1 - inf -> 0.95
    lambdas = length_adaptive_lambda(torch.tensor([4, 100, 400, 500, 2000, 0]), min_lambda=0.95)
    assert_close(lambdas, torch.tensor([0.95, 0.95, 0.95, 0.96, 0.99, 0.95]))
    # floor 0.5 with alpha = 0.1: max(1 - 10 / l, 0.5); l = 5 -> -1 -> 0.5; 20 -> 0.5; 40 -> 0.75
    assert_close(length_adaptive_lambda(torch.tensor([5, 20, 40]), 0.1, 0.5), torch.tensor([0.5, 0.5, 0.75]))
    # floor 1: Monte-Carlo advantages whatever the length
    assert_close(length_adaptive_lambda(torch.tensor([4, 4000]), min_lambda=1.0), torch.tensor([1.0, 1.0]))
    for min_lambda in (-0.1, 1.1):
        with pytest.raises(ValueError, match="min_lambda"):
            length_adaptive_lambda(torch.tensor([100]), min_lambda=min_lambda)


@pytest.mark.parametrize("alpha", [0.0, -0.05])
def test_length_adaptive_lambda_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(torch.tensor([100]), alpha=alpha)


def test_decoupled_gae_golden_values():
    # gamma = 1, lambda_critic = 1: value targets = reward-to-go: row 0 [1, 1, 1], row 1 [-0.5, -1].
    # lambda_policy = 0.5 (gamma * lam = 0.5):
    #   row 0: delta = [0 + 0.4 - 0.5, 0 + 0.6 - 0.4, 1 - 0.6] = [-0.1, 0.2, 0.4]
    #          A_2 = 0.4; A_1 = 0.2 + 0.5 * 0.4 = 0.4; A_0 = -0.1 + 0.5 * 0.4 = 0.1
    #   row 1: delta = [0.5 + 0.3 - 0.2, -1 - 0.3] = [0.6, -1.3]; A_1 = -1.3; A_0 = 0.6 - 0.65 = -0.05
    policy_advantages, value_returns = decoupled_gae(
        REWARDS, VALUES, MASK, gamma=1.0, lambda_critic=1.0, lambda_policy=0.5
    )
    assert_close(value_returns, torch.tensor([[1.0, 1.0, 1.0], [-0.5, -1.0, 0.0]]))
    assert_close(policy_advantages, torch.tensor([[0.1, 0.4, 0.4], [-0.05, -1.3, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_decoupled_gae_critic_lambda_one_gives_exact_reward_to_go(seed):
    # Property: whatever the critic predicts, lambda_critic = 1 and gamma = 1 give the Monte-Carlo returns, and the
    # policy advantages are exactly those of GAE with lambda_policy.
    rewards, values, mask = _random_batch(seed)
    lambda_policy = length_adaptive_lambda(mask.sum(-1), alpha=0.5)  # 1 - 2 / l: spreads over [0, 1) for l <= 7
    policy_advantages, value_returns = decoupled_gae(rewards, values, mask, 1.0, 1.0, lambda_policy)
    assert_close(value_returns, _reward_to_go(rewards, mask, 1.0))
    expected_advantages, _ = gae(rewards, values, mask, 1.0, lambda_policy)
    assert_close(policy_advantages, expected_advantages)


def test_decoupled_gae_with_length_adaptive_lambda_matches_rows_run_alone():
    # Lengths 3 and 2 with alpha = 0.5: lambda = 1 - 2 / 3 = 1/3 and 1 - 2 / 2 = 0.
    # Row 1 with lambda 0: its advantages are its TD errors at gamma = 1: [0.5 + 0.3 - 0.2, -1 - 0.3] = [0.6, -1.3].
    lambda_policy = length_adaptive_lambda(MASK.sum(-1), alpha=0.5)
    assert_close(lambda_policy, torch.tensor([1 / 3, 0.0]))
    policy_advantages, _ = decoupled_gae(REWARDS, VALUES, MASK, 1.0, 1.0, lambda_policy)
    assert_close(policy_advantages[1], torch.tensor([0.6, -1.3, 0.0]))
    row_0, _ = gae(REWARDS[:1], VALUES[:1], MASK[:1], 1.0, 1 / 3)
    assert_close(policy_advantages[:1], row_0)


# ----------------------------------------------------------------------------------------------------
# KL-shaped token rewards (InstructGPT, arXiv 2203.02155)


def test_kl_shaped_token_rewards_golden_values():
    # beta = 0.1
    # row 0: kl = [0.5, 1.0, 2.0], all valid, score 1:  [-0.05, -0.1, -0.2 + 1] = [-0.05, -0.1, 0.8]
    # row 1: kl = [0.3, -0.4, 9], 2 valid, score -2:    [-0.03, 0.04 - 2, 0] = [-0.03, -1.96, 0]
    # row 2: kl = [1, 1, 1], a hole: mask [1, 0, 1], score 5: the last valid token is t = 2: [-0.1, 0, 4.9]
    # row 3: no valid token, score 3: dropped, all 0
    scores = torch.tensor([1.0, -2.0, 5.0, 3.0])
    kl = torch.tensor([[0.5, 1.0, 2.0], [0.3, -0.4, 9.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    rewards = kl_shaped_token_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor([[-0.05, -0.1, 0.8], [-0.03, -1.96, 0.0], [-0.1, 0.0, 4.9], [0.0, 0.0, 0.0]])
    assert_close(rewards, expected)


def test_kl_shaped_rewards_with_gae_at_lambda_one_equal_reinforce_pp_returns():
    # With gamma = lam = 1 and V = 0, GAE's advantage is the return-to-go of the shaped reward, which is
    # REINFORCE++'s score - beta * sum_{s >= t} KL_s (arXiv 2501.03262; `kl_penalty_to_go`).
    rewards, kl, mask = _random_batch(4)
    scores = rewards[:, 0]
    token_rewards = kl_shaped_token_rewards(scores, kl, mask, beta=0.05)
    advantages, _ = gae(token_rewards, torch.zeros_like(kl), mask, 1.0, 1.0)
    assert_close(advantages, kl_penalty_to_go(scores, kl, mask, 0.05))


# ----------------------------------------------------------------------------------------------------
# Clipped value loss (arXiv 2203.02155; ALGORITHMS.md "PPO components")

# eps_v = 0.2, tokens [[t0, t1], [t2, padding]]:
#   t0: V = 1.0, V_old = 0.5, R = 2.0: V - V_old = 0.5 -> clipped to 0.2, V_clip = 0.7
#       (V - R)^2 = 1.0, (V_clip - R)^2 = 1.69 -> max 1.69, the clipped term is larger
#   t1: V = 1.0, V_old = 0.5, R = 0.0: 1.0 vs 0.7^2 = 0.49 -> max 1.0, unclipped
#   t2: V = 0.1, V_old = 0.0, R = 1.0: inside the clip range, V_clip = V: 0.81 vs 0.81 -> 0.81, not strictly larger
#   padding: V = 100, R = -100 (would dominate if it leaked)
CVL_VALUES = torch.tensor([[1.0, 1.0], [0.1, 100.0]])
CVL_OLD_VALUES = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
CVL_RETURNS = torch.tensor([[2.0, 0.0], [1.0, -100.0]])
CVL_MASK = torch.tensor([[1, 1], [1, 0]])


def test_clipped_value_loss_golden_values_and_clipfrac():
    # loss = 0.5 * (1.69 + 1.0 + 0.81) / 3 = 0.5 * 3.5 / 3 = 0.583333...; clipfrac = 1 / 3 (t0 only)
    loss, clipfrac = clipped_value_loss(CVL_VALUES, CVL_OLD_VALUES, CVL_RETURNS, CVL_MASK, 0.2)
    assert_close(loss, torch.tensor(3.5 / 6))
    assert_close(clipfrac, torch.tensor(1 / 3))


def test_clipfrac_does_not_count_a_value_inside_the_clip_range():
    # V = 0.1, V_old = -0.05, R = 0, eps_v = 0.2: V - V_old = 0.15 is inside [-0.2, 0.2], so nothing is clipped. In
    # float32, V_old + (V - V_old) = 0.10000001 != V, and (0.10000001 - 0)^2 > 0.1^2 counted the token as clipped
    # (clipfrac 1.0). Counted on clamp(V, V_old - eps, V_old + eps) = V itself: 0.0. The loss is the unclipped
    # 0.5 * 0.1^2 = 0.005 either way.
    loss, clipfrac = clipped_value_loss(
        torch.tensor([[0.1]]), torch.tensor([[-0.05]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.2
    )
    assert clipfrac.item() == 0.0
    assert_close(loss, torch.tensor(0.005))


@pytest.mark.parametrize("seed", range(5))
def test_clipfrac_counts_exactly_the_values_outside_the_clip_range(seed):
    # Property: a token counts as clipped iff |V - V_old| > eps_v and the clipped term is the larger one.
    generator = torch.Generator().manual_seed(seed)
    values, old_values, returns = (torch.randn(16, 32, generator=generator) * 0.3 for _ in range(3))
    _, clipfrac = clipped_value_loss(values, old_values, returns, torch.ones(16, 32), 0.2)
    outside = (values - old_values).abs() > 0.2
    clipped = torch.clamp(values, old_values - 0.2, old_values + 0.2)
    expected = (outside & ((clipped - returns) ** 2 > (values - returns) ** 2)).float().mean()
    assert_close(clipfrac, expected)


def test_clipped_value_loss_gradient_is_zero_through_the_clipped_branch():
    # dloss/dV = (1/3) * (V - R) on tokens whose max is the unclipped term (or a tie with an unclipped V_clip):
    #   t0: the max is the clipped term and clip() is saturated -> 0
    #   t1: (1.0 - 0.0) / 3 = 1/3
    #   t2: tie, both branches have slope (V - R): (0.1 - 1.0) / 3 = -0.3
    #   padding: 0
    values = CVL_VALUES.clone().requires_grad_(True)
    loss, _ = clipped_value_loss(values, CVL_OLD_VALUES, CVL_RETURNS, CVL_MASK, 0.2)
    loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, 1 / 3], [-0.3, 0.0]]))


def test_clipped_value_loss_without_clipping():
    # 0.5 * (1.0 + 1.0 + 0.81) / 3 = 0.5 * 2.81 / 3 = 0.468333...; nothing is clipped
    loss, clipfrac = clipped_value_loss(CVL_VALUES, CVL_OLD_VALUES, CVL_RETURNS, CVL_MASK, None)
    assert_close(loss, torch.tensor(2.81 / 6))
    assert clipfrac.item() == 0.0


def test_clipped_value_loss_divides_by_the_given_global_token_count():
    # num_tokens = 6 (tokens of the whole accumulated batch): 0.5 * 3.5 / 6 = 0.291666...; clipfrac stays local
    loss, clipfrac = clipped_value_loss(
        CVL_VALUES, CVL_OLD_VALUES, CVL_RETURNS, CVL_MASK, 0.2, num_tokens=torch.tensor(6.0)
    )
    assert_close(loss, torch.tensor(3.5 / 12))
    assert_close(clipfrac, torch.tensor(1 / 3))


def test_clipped_value_loss_ignores_nan_padding_and_empty_masks_give_zero():
    values = CVL_VALUES.clone()
    values[1, 1] = NAN
    loss, _ = clipped_value_loss(values, CVL_OLD_VALUES, CVL_RETURNS, CVL_MASK, 0.2)
    assert_close(loss, torch.tensor(3.5 / 6))
    loss, clipfrac = clipped_value_loss(CVL_VALUES, CVL_OLD_VALUES, CVL_RETURNS, torch.zeros_like(CVL_MASK), 0.2)
    assert loss.item() == 0.0 and clipfrac.item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Explained variance


# Returns [1, 2, 3] on the valid tokens of [[1, 2], [3, padding]]: mean 2, Var(R) = (1 + 0 + 1) / 3 = 2/3.
EV_RETURNS = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
EV_MASK = torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # R - V = [-0.5, 0, 0.5]: Var = 0.5 / 3 = 1/6; 1 - (1/6) / (2/3) = 0.75
        ([[1.5, 2.0], [2.5, -7.0]], 0.75),
        # perfect critic: R - V = 0 -> 1
        ([[1.0, 2.0], [3.0, -7.0]], 1.0),
        # constant V = 2 (the mean return): R - V = [-1, 0, 1], Var = 2/3 -> 0
        ([[2.0, 2.0], [2.0, -7.0]], 0.0),
        # reversed: R - V = [-2, 0, 2], Var = 8/3; 1 - (8/3) / (2/3) = -3
        ([[3.0, 2.0], [1.0, -7.0]], -3.0),
        # R - V = R - 10 has the variance of R -> 0
        ([[10.0, 10.0], [10.0, -7.0]], 0.0),
    ],
)
def test_explained_variance_golden_values(values, expected):
    result = explained_variance(torch.tensor(values), EV_RETURNS, EV_MASK)
    assert result.dim() == 0
    assert result.item() == pytest.approx(expected, abs=1e-6)


def test_explained_variance_is_zero_not_nan_for_constant_returns_or_no_valid_token():
    # 0.1 is not exact in binary: the masked mean of [0.1, 0.1, 0.1] is off by rounding, Var(R) is ~1e-18, not 0.
    constant = torch.full((2, 2), 0.1)
    assert explained_variance(torch.tensor([[0.3, -1.0], [2.0, 0.0]]), constant, EV_MASK).item() == 0.0
    assert explained_variance(torch.zeros(2, 2), torch.zeros(2, 2), EV_MASK).item() == 0.0
    result = explained_variance(torch.zeros(2, 2), EV_RETURNS, torch.zeros_like(EV_MASK))
    assert result.item() == 0.0


def test_explained_variance_of_bfloat16_values_is_float32():
    result = explained_variance(torch.tensor([[1.5, 2.0], [2.5, 0.0]], dtype=torch.bfloat16), EV_RETURNS, EV_MASK)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(0.75, abs=1e-6)  # 1.5, 2.0, 2.5 are exact in bf16


# ----------------------------------------------------------------------------------------------------
# KL controllers (arXiv 1909.08593)


def test_adaptive_kl_controller_golden_steps_and_clipping():
    # beta = 0.1, target = 6, horizon = 10000
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL = 9: 9/6 - 1 = 0.5 -> clip to 0.2; n_steps = 256: beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512
    assert controller.update(current_kl=9.0, n_steps=256) == pytest.approx(0.100512, rel=1e-12)
    assert controller.value == pytest.approx(0.100512, rel=1e-12)
    # KL = 6.6: 1.1 - 1 = 0.1, inside the clip; n_steps = 1000: factor 1 + 0.1 * 0.1 = 1.01 -> 0.100512 * 1.01
    assert controller.update(torch.tensor(6.6), 1000) == pytest.approx(0.10151712, rel=1e-6)


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (9.0, 0.1 * 1.00512),  # +0.5 -> +0.2
        (600.0, 0.1 * 1.00512),  # +99 -> +0.2: the step is the same however far the KL is
        (3.0, 0.1 * 0.99488),  # -0.5 -> -0.2: 1 - 0.2 * 0.0256
        (0.0, 0.1 * 0.99488),  # -1 -> -0.2
        (6.0, 0.1),  # on target: unchanged
        (6.6, 0.1 * (1 + 0.1 * 0.0256)),  # +0.1, unclipped: 0.1 * 1.00256
    ],
)
def test_adaptive_kl_controller_clips_the_proportional_error_at_0_2(current_kl, expected):
    controller = AdaptiveKLController(0.1, 6.0, 10000)
    assert controller.update(current_kl, 256) == pytest.approx(expected, rel=1e-9)


def test_adaptive_kl_controller_state_dict_round_trip():
    controller = AdaptiveKLController(0.1, 6.0, 10000)
    controller.update(9.0, 256)  # 0.100512
    state = controller.state_dict()
    assert state == {"value": pytest.approx(0.100512), "target": 6.0, "horizon": 10000.0}
    restored = AdaptiveKLController(0.5, 1.0, 10)
    restored.load_state_dict(state)
    assert (restored.value, restored.target, restored.horizon) == (controller.value, 6.0, 10000.0)
    # Both continue identically: 0.100512 * 0.99488
    assert restored.update(3.0, 256) == controller.update(3.0, 256) == pytest.approx(0.100512 * 0.99488)


def test_fixed_kl_controller_never_changes_and_round_trips():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 256) == 0.05
    assert controller.update(0.0, 256) == 0.05
    assert controller.state_dict() == {"value": 0.05}
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 10000}, "target"),
        ({"init_kl_coef": 0.1, "target": -6.0, "horizon": 10000}, "target"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": -1}, "horizon"),
        ({"init_kl_coef": -0.1, "target": 6.0, "horizon": 10000}, "init_kl_coef"),
        ({"init_kl_coef": math.nan, "target": 6.0, "horizon": 10000}, "init_kl_coef"),
    ],
)
def test_adaptive_kl_controller_rejects_bad_arguments_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**kwargs)


def test_kl_controllers_reject_bad_updates_and_state_dicts():
    controller = AdaptiveKLController(0.1, 6.0, 10000)
    with pytest.raises(ValueError, match="current_kl"):
        controller.update(NAN, 256)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(9.0, -1)
    with pytest.raises(ValueError, match="horizon"):
        controller.load_state_dict({"value": 0.1})  # a FixedKLController's state: the expected keys are listed
    with pytest.raises(ValueError, match="target"):
        controller.load_state_dict({"value": 0.1, "target": 0.0, "horizon": 10000})
    assert controller.value == 0.1  # nothing changed
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


def test_explained_variance_is_zero_for_returns_that_are_zero_up_to_rounding():
    # GAE at gamma = lambda = 1 on all-zero rewards gives returns = A + V, which is 0 only up to float32 rounding
    # (about 1e-8 here); without a scale that includes V the ratio Var(R - V) / Var(R) explodes to ~1e15.
    values = torch.tensor([[0.3, -0.7, 0.11, 0.52]])
    _, returns = gae(torch.zeros(1, 4), values, torch.ones(1, 4), 1.0, 1.0)
    assert returns.abs().max() < 1e-6
    assert explained_variance(values, returns, torch.ones(1, 4)).item() == 0.0


# Value pretraining's readiness check (VAPO "Value-Pretraining", VC-PPO arXiv 2503.01491)


def test_value_pretraining_ends_at_the_first_full_window_at_or_above_the_threshold():
    schedule = ValuePretraining(max_steps=10, threshold=0.5, window=3)
    # Explained variances 0.9, 0.9: the window of 3 is not full yet, so not ready however good they are.
    assert [schedule.record(0.9, 0), schedule.record(0.9, 1)] == [False, False]
    # Window [0.9, 0.9, -0.4]: mean 1.4 / 3 = 0.4667 < 0.5.
    assert not schedule.record(-0.4, 2) and schedule.active(3)
    # Window [0.9, -0.4, 0.8]: mean 1.3 / 3 = 0.4333; then [-0.4, 0.8, 1.0]: mean 1.4 / 3 = 0.4667.
    assert not schedule.record(0.8, 3) and not schedule.record(1.0, 4)
    # Window [0.8, 1.0, 0.2]: mean 2.0 / 3 = 0.6667 >= 0.5: ready at global step 5, so 5 critic-only steps.
    assert schedule.record(0.2, 5)
    assert (schedule.end_step, schedule.ready) == (5, True)
    assert schedule.end_explained_variance == pytest.approx(2.0 / 3)
    assert not schedule.active(5) and not schedule.reach_cap(10)  # finished: no second event


def test_value_pretraining_threshold_is_inclusive():
    schedule = ValuePretraining(max_steps=10, threshold=0.5, window=2)
    assert not schedule.record(0.25, 0)
    assert schedule.record(0.75, 1)  # mean (0.25 + 0.75) / 2 = 0.5 exactly


def test_value_pretraining_cap_and_fixed_count():
    schedule = ValuePretraining(max_steps=2, threshold=0.5, window=2)
    assert not schedule.record(0.1, 0) and not schedule.record(0.3, 1)  # mean 0.2
    assert schedule.active(1) and not schedule.active(2)
    assert not schedule.reach_cap(1)
    assert schedule.reach_cap(2) and not schedule.reach_cap(3)  # once
    assert (schedule.end_step, schedule.ready) == (2, False)
    assert schedule.end_explained_variance == pytest.approx(0.2)
    fixed = ValuePretraining(max_steps=2, threshold=None, window=1)
    assert not fixed.record(0.99, 0) and fixed.active(1)  # no threshold: never ready early
    assert fixed.reach_cap(2) and (fixed.end_step, fixed.ready) == (2, True)
    none = ValuePretraining(max_steps=0, threshold=0.5, window=1)
    assert not none.active(0) and not none.reach_cap(0) and none.finished


def test_value_pretraining_state_dict_round_trip():
    schedule = ValuePretraining(max_steps=10, threshold=0.5, window=2)
    schedule.record(0.1, 0)
    restored = ValuePretraining(max_steps=10, threshold=0.5, window=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == {
        "explained_variances": [0.1],
        "end_step": None,
        "ready": None,
        "end_explained_variance": None,
    }
    assert restored.record(0.9, 1) and restored.end_step == 1  # the restored window continues: (0.1 + 0.9) / 2
    finished = ValuePretraining(max_steps=10, threshold=0.5, window=2)
    finished.load_state_dict(restored.state_dict())
    assert not finished.active(2) and (finished.end_step, finished.ready) == (1, True)
    with pytest.raises(ValueError, match="end_step"):
        finished.load_state_dict({"explained_variances": []})
