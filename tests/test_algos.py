"""Tests of the pure-torch algorithms in `trl_plus.algos`: golden values derived by hand, plus property tests.

Every golden number has its derivation in a comment next to it. The math is in ALGORITHMS.md; the sources are
GRPO (arXiv 2402.03300), Dr. GRPO (arXiv 2503.20783), RLOO (arXiv 2402.14740), REINFORCE++ (arXiv 2501.03262),
DAPO / Clip-Higher (arXiv 2503.14476), dual-clip PPO (arXiv 1912.09729), ASPO (arXiv 2510.06062) and
Clip-Cov / KL-Cov (arXiv 2505.22617).
"""

import math
import threading

import pytest
import torch
from torch.testing import assert_close

from trl_plus.algos import (
    ADVANTAGE_SHAPERS,
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Registry,
    aspo_loss,
    call_with_supported,
    ce_gppo_loss,
    clip_cov_loss,
    entropy_shaped_advantages,
    gppo_loss,
    grpo_advantages,
    k1,
    k2,
    k3,
    kl_cov_loss,
    kl_penalty_to_go,
    masked_whiten,
    ppo_clip_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_covariance,
    token_mean,
)

NAN = float("nan")


def _consecutive(bounds):
    """[0, 2, 5] -> [(0, 2), (2, 5)]: the row ranges of a split of the batch."""
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _loss_and_grad(loss_fn, log_prob, *args, **kwargs):
    """Per-token loss, d(sum of the loss)/d(log_prob) and metrics. Each token's loss depends on its own log-prob only,
    so the gradient of the sum is the per-token gradient."""
    log_prob = log_prob.clone().requires_grad_(True)
    per_token_loss, metrics = loss_fn(log_prob, *args, **kwargs)
    (grad,) = torch.autograd.grad(per_token_loss.sum(), log_prob)
    return per_token_loss.detach(), grad, metrics


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "registry, expected",
    [
        (ADVANTAGES, {"grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"}),
        (POLICY_LOSSES, {"ppo_clip", "aspo", "clip_cov", "kl_cov", "gppo", "ce_gppo"}),
        (ADVANTAGE_SHAPERS, {"entropy"}),
        (AGGREGATIONS, {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}),
        (KL_ESTIMATORS, {"k1", "k2", "k3"}),
    ],
)
def test_registry_names(registry, expected):
    assert set(registry.names()) == expected
    assert registry.names() == sorted(expected)
    for name in expected:
        assert name in registry
    assert "not_a_name" not in registry


def test_registry_get_returns_the_registered_functions():
    assert ADVANTAGES.get("grpo") is grpo_advantages
    assert ADVANTAGES.get("rloo") is rloo_advantages
    assert ADVANTAGES.get("reinforce_pp") is reinforce_pp_advantages
    assert ADVANTAGES.get("reinforce_pp_baseline") is reinforce_pp_baseline_advantages
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss
    assert POLICY_LOSSES.get("aspo") is aspo_loss
    assert POLICY_LOSSES.get("clip_cov") is clip_cov_loss
    assert POLICY_LOSSES.get("kl_cov") is kl_cov_loss
    assert AGGREGATIONS.get("token_mean") is token_mean
    assert AGGREGATIONS.get("seq_mean_token_mean") is seq_mean_token_mean
    assert AGGREGATIONS.get("seq_mean_token_sum_norm") is seq_mean_token_sum_norm
    assert KL_ESTIMATORS.get("k1") is k1
    assert KL_ESTIMATORS.get("k2") is k2
    assert KL_ESTIMATORS.get("k3") is k3


def test_registry_duplicate_name_raises():
    registry = Registry("widget")

    @registry.register("a")
    def first():
        return 1

    with pytest.raises(ValueError, match="A widget named 'a' is already registered."):

        @registry.register("a")
        def second():
            return 2

    assert registry.get("a") is first
    # The real registries refuse too, and keep the original entry.
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("ppo_clip")(lambda *args, **kwargs: None)
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss


@pytest.mark.parametrize("registry", [ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS])
def test_registry_unknown_name_lists_valid_choices(registry):
    with pytest.raises(ValueError) as excinfo:
        registry.get("nope")
    message = str(excinfo.value)
    assert message == f"Unknown {registry.kind} 'nope'. Valid choices: {sorted(registry.names())}."
    for name in registry.names():
        assert f"'{name}'" in message


def test_call_with_supported_drops_unknown_hyperparameters():
    def scaled(x, *, scale):
        return x * scale

    # 2 * 3 = 6; `unused` is not in the signature so it is not passed.
    assert call_with_supported(scaled, 2, scale=3, unused=7) == 6
    # kl_cov takes neither eps_low nor generator: they are filtered out instead of raising TypeError.
    log_prob = torch.tensor([[-1.0, -2.0]])
    loss, _ = call_with_supported(
        kl_cov_loss, log_prob, log_prob, torch.tensor([[1.0]]), torch.ones(1, 2), eps_low=0.2, generator=None
    )
    # ratio = e^0 = 1, A = 1 -> loss = -1; |logp - old| = 0 so the KL-Cov penalty adds 0.
    assert_close(loss, torch.tensor([[-1.0, -1.0]]))


# ----------------------------------------------------------------------------------------------------
# Advantage estimators: golden values
# ----------------------------------------------------------------------------------------------------

# Two groups of G = 3: group 1 = [1, 0, 0], group 2 = [2, 2, 5].
REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])


def test_grpo_group_golden():
    """GRPO (arXiv 2402.03300 sec. 4.1.2): (r - group mean) / (group sample std + 1e-4)."""
    expected = torch.tensor(
        [
            # group 1: mean 1/3, deviations 2/3, -1/3, -1/3; sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3,
            # std = sqrt(1/3) = 0.577350 -> 0.666667 / 0.577450 = 1.154501 and -0.333333 / 0.577450 = -0.577250
            1.154501,
            -0.577250,
            -0.577250,
            # group 2: mean 3, deviations -1, -1, 2; sample var = (1 + 1 + 4) / 2 = 3, std = 1.732051
            # -> -1 / 1.732151 = -0.577317 and 2 / 1.732151 = 1.154634
            -0.577317,
            -0.577317,
            1.154634,
        ]
    )
    assert_close(grpo_advantages(REWARDS, 3), expected)
    assert_close(grpo_advantages(REWARDS, 3, scale_rewards="group"), expected)


def test_grpo_batch_golden():
    """scale_rewards="batch" (TRL): group mean removed, divided by the std of the whole batch."""
    # Batch mean 10/6 = 5/3; squared deviations 4/9, 25/9, 25/9, 1/9, 1/9, 100/9 sum to 156/9 = 17.3333;
    # sample var = 17.3333 / 5 = 3.466667, std = 1.861899; + 1e-4 -> 1.861999.
    # Group deviations (as in the group test): 2/3, -1/3, -1/3, -1, -1, 2.
    # 0.666667 / 1.861999 = 0.358038, -0.333333 / 1.861999 = -0.179019, -1 / 1.861999 = -0.537057, 2 / ... = 1.074115
    expected = torch.tensor([0.358038, -0.179019, -0.179019, -0.537057, -0.537057, 1.074115])
    assert_close(grpo_advantages(REWARDS, 3, scale_rewards="batch"), expected)


def test_grpo_none_golden():
    """scale_rewards="none" (Dr. GRPO, arXiv 2503.20783): r - group mean, no std."""
    # group 1 mean 1/3 -> 2/3, -1/3, -1/3; group 2 mean 3 -> -1, -1, 2
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0])
    assert_close(grpo_advantages(REWARDS, 3, scale_rewards="none"), expected)


def test_grpo_unknown_scale_rewards_raises():
    with pytest.raises(ValueError, match="Unknown scale_rewards 'groups'"):
        grpo_advantages(REWARDS, 3, scale_rewards="groups")


def test_grpo_nan_rows_golden():
    """A NaN reward (unscorable completion) is left out of its group's statistics and gets advantage 0."""
    rewards = torch.tensor([1.0, NAN, 0.0, 7.0, NAN, NAN])
    # group 1 scored = [1, 0]: mean 0.5, sample std = sqrt((0.25 + 0.25) / 1) = 0.707107, + 1e-4 = 0.707207
    # -> 0.5 / 0.707207 = 0.707007 and -0.707007; the NaN row -> 0.
    # group 2 has a single scored reward: its std is undefined (Bessel with n = 1) -> every advantage is 0.
    expected = torch.tensor([0.707007, 0.0, -0.707007, 0.0, 0.0, 0.0])
    assert_close(grpo_advantages(rewards, 3), expected)
    # Without std: 1 - 0.5, 0, 0 - 0.5; group 2: 7 - 7 = 0.
    assert_close(grpo_advantages(rewards, 3, scale_rewards="none"), torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0]))


def test_rloo_golden():
    """RLOO (arXiv 2402.14740): A_i = r_i - mean of the other rewards of the group."""
    expected = torch.tensor(
        [
            1.0,  # 1 - (0 + 0) / 2
            -0.5,  # 0 - (1 + 0) / 2
            -0.5,  # 0 - (1 + 0) / 2
            -1.5,  # 2 - (2 + 5) / 2
            -1.5,  # 2 - (2 + 5) / 2
            3.0,  # 5 - (2 + 2) / 2
        ]
    )
    assert_close(rloo_advantages(REWARDS, 3), expected)


def test_rloo_nan_rows_golden():
    rewards = torch.tensor([1.0, NAN, 3.0, 0.0, NAN, 4.0, NAN, NAN])
    expected = torch.tensor(
        [
            # group 1 (G = 4), scored {1, 3, 0}: the NaN row is not part of anyone's baseline.
            -0.5,  # 1 - (3 + 0) / 2
            0.0,  # NaN -> 0
            2.5,  # 3 - (1 + 0) / 2
            -2.0,  # 0 - (1 + 3) / 2
            # group 2 has a single scored reward (4): no leave-one-out baseline exists -> 0 everywhere.
            0.0,
            0.0,
            0.0,
            0.0,
        ]
    )
    assert_close(rloo_advantages(rewards, 4), expected)


def test_reinforce_pp_golden():
    """REINFORCE++ (arXiv 2501.03262): the raw reward (the global whitening is the baseline); NaN -> 0."""
    rewards = torch.tensor([1.0, NAN, -2.5, 0.0])
    assert_close(reinforce_pp_advantages(rewards, 2), torch.tensor([1.0, 0.0, -2.5, 0.0]))


def test_reinforce_pp_baseline_golden():
    """REINFORCE++-baseline (arXiv 2501.03262): r - group mean (no std); NaN rows excluded from the mean, get 0."""
    # group 1 mean 1/3 -> 2/3, -1/3, -1/3; group 2 mean 3 -> -1, -1, 2
    assert_close(reinforce_pp_baseline_advantages(REWARDS, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0]))
    # scored [1, 3]: mean 2 -> -1, 0 (NaN), 1
    assert_close(reinforce_pp_baseline_advantages(torch.tensor([1.0, NAN, 3.0]), 3), torch.tensor([-1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------------------------------
# Advantage estimators: properties
# ----------------------------------------------------------------------------------------------------


def _random_rewards_with_nans(num_groups, group_size, seed, binary=False):
    generator = torch.Generator().manual_seed(seed)
    if binary:
        rewards = torch.randint(0, 2, (num_groups * group_size,), generator=generator).float()
    else:
        rewards = torch.randn(num_groups * group_size, generator=generator)
    # Some unscorable rows; group 0 keeps a single scored reward, group 1 is entirely unscorable.
    rewards[1:group_size] = NAN
    rewards[group_size : 2 * group_size] = NAN
    drop = torch.rand(rewards.shape, generator=generator) < 0.15
    rewards[drop] = NAN
    return rewards


@pytest.mark.parametrize("group_size", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_closed_form_and_leave_one_out_loop(group_size, seed):
    """RLOO (arXiv 2402.14740): A_i = G/(G-1) (r_i - mean) = r_i - mean of the others, G = #scored in the group."""
    rewards = _random_rewards_with_nans(num_groups=6, group_size=group_size, seed=seed)
    advantages = rloo_advantages(rewards, group_size)

    closed_form = torch.zeros_like(rewards)
    loop = torch.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scored = ~torch.isnan(group)
        g = int(scored.sum())
        if g < 2:
            continue  # no leave-one-out baseline: advantage 0
        mean = group[scored].mean()
        for j in range(group_size):
            if not scored[j]:
                continue  # unscorable: advantage 0
            closed_form[start + j] = g / (g - 1) * (group[j] - mean)
            others = [group[k] for k in range(group_size) if k != j and scored[k]]
            loop[start + j] = group[j] - sum(others) / len(others)

    assert not torch.isnan(advantages).any()
    assert (advantages[torch.isnan(rewards)] == 0).all()
    assert_close(advantages, closed_form)
    assert_close(advantages, loop)
    assert advantages.abs().sum() > 0  # the test data really has groups with a baseline


def _trl_grpo_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16 `GRPOTrainer._generate_and_score_completions`, `sum_then_normalize` branch, verbatim modulo names."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4, 7])
@pytest.mark.parametrize("binary", [False, True])
def test_grpo_matches_trl(scale_rewards, group_size, binary):
    """grpo_advantages reproduces TRL's GRPO advantages, NaN (unscorable) rows and zero-std groups included."""
    rewards = _random_rewards_with_nans(num_groups=8, group_size=group_size, seed=group_size, binary=binary)
    expected = _trl_grpo_advantages(rewards, group_size, scale_rewards)
    actual = grpo_advantages(rewards, group_size, scale_rewards=scale_rewards)
    assert not torch.isnan(actual).any()
    assert_close(actual, expected)
    assert expected.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# REINFORCE++ token-level steps: KL-to-go and global whitening
# ----------------------------------------------------------------------------------------------------


def test_kl_penalty_to_go_golden():
    """REINFORCE++ (arXiv 2501.03262 eq. 3-4), gamma = 1: A_{i,t} = A_i - beta * sum_{s >= t} KL_{i,s} on valid s."""
    advantages = torch.tensor([1.0, -0.5])
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = torch.tensor(
        [
            # KL to go: 0.2 + 0.4 + 0.6 = 1.2, 0.4 + 0.6 = 1.0, 0.6 -> 1 - 0.12, 1 - 0.10, 1 - 0.06
            [0.88, 0.90, 0.94],
            # masked KL [1, -2, 0] (the 3.0 is padding): to go -1, -2, 0 -> -0.5 + 0.1, -0.5 + 0.2, padding 0
            [-0.4, -0.3, 0.0],
        ]
    )
    assert_close(kl_penalty_to_go(advantages, kl, mask, beta=0.1), expected)


def test_kl_penalty_to_go_beta_zero_is_broadcast_advantage():
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(4, generator=generator)
    kl = torch.randn(4, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    result = kl_penalty_to_go(advantages, kl, mask, beta=0.0)
    assert_close(result, advantages[:, None] * mask)
    assert result[0].unique().numel() == 1 and result[0, 0] == advantages[0]


def test_masked_whiten_golden():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # valid values 1, 2, 3, 4: mean 2.5, population var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std = 1.118034
    # -> -1.5 / 1.118034 = -1.341641, -0.5 / 1.118034 = -0.447214, 0.447214, 1.341641; padding stays 0
    expected = torch.tensor([[-1.341641, -0.447214, 0.447214], [1.341641, 0.0, 0.0]])
    assert_close(masked_whiten(values, mask), expected)


def test_masked_whiten_zero_mean_unit_variance():
    generator = torch.Generator().manual_seed(0)
    values = 3.0 + 5.0 * torch.randn(5, 9, generator=generator)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 7, 2])[:, None]).long()
    whitened = masked_whiten(values, mask)
    valid = whitened[mask.bool()]
    assert_close(valid.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close((valid**2).mean(), torch.tensor(1.0))  # population variance, mean is 0
    assert (whitened[~mask.bool()] == 0).all()


def test_masked_whiten_constant_and_all_masked_are_finite():
    # Zero variance: var is clamped to eps, x - mean = 0 -> all zeros (no 0/0).
    assert_close(masked_whiten(torch.full((2, 3), 4.0), torch.ones(2, 3)), torch.zeros(2, 3))
    # No valid token: zeros.
    assert_close(masked_whiten(torch.randn(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))


class _FakeWorld:
    """`world_size` ranks run in lockstep on threads; `all_reduce_sum(rank)` is a SUM all-reduce across them."""

    def __init__(self, world_size):
        self.slots = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=10)

    def all_reduce_sum(self, rank):
        def reduce(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()  # every rank has deposited its tensor
            total = torch.stack(self.slots).sum(0)  # same order on every rank, like a real all-reduce
            self.barrier.wait()  # every rank has read, before anyone deposits the next tensor
            return total

        return reduce


def _run_ranks(world_size, fn):
    world = _FakeWorld(world_size)
    results, errors = [None] * world_size, []

    def target(rank):
        try:
            results[rank] = fn(rank, world.all_reduce_sum(rank))
        except BaseException as error:  # noqa: B036 - report it in the main thread
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors, errors
    return results


@pytest.mark.parametrize("row_splits", [[0, 2, 5], [0, 1, 3, 5], [0, 4, 5]])
def test_masked_whiten_with_all_reduce_matches_full_batch(row_splits):
    """REINFORCE++ whitens over the GLOBAL batch: whitening each process's rows with a sum all-reduce equals
    whitening the concatenated batch (uneven lengths, and in [0, 4, 5] a rank whose only row is padding)."""
    generator = torch.Generator().manual_seed(1)
    values = 2.0 + 3.0 * torch.randn(5, 6, generator=generator)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 5, 1, 0])[:, None]).long()
    full = masked_whiten(values, mask)

    def rank_fn(rank, all_reduce_sum):
        rows = slice(row_splits[rank], row_splits[rank + 1])
        return masked_whiten(values[rows], mask[rows], all_reduce_sum=all_reduce_sum)

    shards = _run_ranks(len(row_splits) - 1, rank_fn)
    assert_close(torch.cat(shards), full)
    # Sanity: whitening each shard on its own (no all-reduce) gives a different answer, so the check above can fail
    # (unless one shard holds every valid token, as in [0, 4, 5]).
    local = torch.cat([masked_whiten(values[a:b], mask[a:b]) for a, b in _consecutive(row_splits)])
    if all(mask[a:b].sum() > 0 for a, b in _consecutive(row_splits)):
        assert not torch.allclose(local, full, atol=1e-3)
    else:
        assert_close(local, full)


# ----------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"; k3 is GRPO's, arXiv 2402.03300 eq. 4)
# ----------------------------------------------------------------------------------------------------

KL_LOG_PROB = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -3.0, -1.0]])
KL_REF_LOG_PROB = torch.tensor([[-1.5, -0.5, -1.0], [-0.2, -1.0, -4.0]])
# d = logp - logp_ref = [[0.5, 0, -1], [0.1, -2, 3]]


def test_k1_golden():
    assert_close(k1(KL_LOG_PROB, KL_REF_LOG_PROB), torch.tensor([[0.5, 0.0, -1.0], [0.1, -2.0, 3.0]]))


def test_k2_golden():
    # 0.5 d^2: 0.5 * 0.25, 0, 0.5 * 1; 0.5 * 0.01, 0.5 * 4, 0.5 * 9
    assert_close(k2(KL_LOG_PROB, KL_REF_LOG_PROB), torch.tensor([[0.125, 0.0, 0.5], [0.005, 2.0, 4.5]]))


def test_k3_golden():
    # k3 = e^{-d} + d - 1 (log_ratio = logp_ref - logp = -d)
    expected = torch.tensor(
        [
            [
                0.106531,  # d = 0.5: e^-0.5 + 0.5 - 1 = 0.606531 - 0.5
                0.0,  # d = 0: 1 + 0 - 1
                0.718282,  # d = -1: e^1 - 1 - 1
            ],
            [
                0.004837,  # d = 0.1: e^-0.1 + 0.1 - 1 = 0.904837 - 0.9
                4.389056,  # d = -2: e^2 - 2 - 1 = 7.389056 - 3
                2.049787,  # d = 3: e^-3 + 3 - 1 = 0.049787 + 2
            ],
        ]
    )
    assert_close(k3(KL_LOG_PROB, KL_REF_LOG_PROB), expected)


def test_k3_nonnegative_and_zero_only_at_equality():
    generator = torch.Generator().manual_seed(0)
    log_prob = 3 * torch.randn(64, 32, generator=generator, dtype=torch.float64)
    ref_log_prob = 3 * torch.randn(64, 32, generator=generator, dtype=torch.float64)
    assert (k3(log_prob, ref_log_prob) > 0).all()
    assert (k2(log_prob, ref_log_prob) > 0).all()
    assert (k3(log_prob, log_prob) == 0).all()


def test_k3_is_second_order_close_to_k2():
    # k3(d) = e^{-d} + d - 1 = d^2/2 - d^3/6 + d^4/24 - ...: for d = 1e-2,
    # k3 - k2 = -1e-6 / 6 + 1e-8 / 24 = -1.666667e-7 + 4.166667e-10 = -1.662500e-7 (next term -d^5/120 ~ 1e-12).
    d = torch.tensor([1e-2], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert_close(k3(d, zero) - k2(d, zero), torch.tensor([-1.6625e-7], dtype=torch.float64), rtol=1e-4, atol=0)


def test_k1_and_k3_are_unbiased_k2_is_not():
    """Exact expectation under pi (no sampling): E_pi[k1] = E_pi[k3] = KL(pi || ref), E_pi[k2] != KL."""
    pi = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    ref = torch.full((4,), 0.25, dtype=torch.float64)
    # KL(pi || ref) = 0.5 ln(0.5/0.25) + 0.25 ln 1 + 2 * 0.125 ln(0.125/0.25) = 0.5 ln 2 - 0.25 ln 2 = 0.25 ln 2
    kl = torch.tensor(0.25 * math.log(2), dtype=torch.float64)  # 0.173287
    assert_close((pi * k1(pi.log(), ref.log())).sum(), kl)
    # E[k3] = sum_x ref(x) - 1 + KL = KL (sum of ref is 1)
    assert_close((pi * k3(pi.log(), ref.log())).sum(), kl)
    # E[k2] = 0.5 (0.5 ln^2 2 + 0 + 0.25 ln^2 2) = 0.375 ln^2 2 = 0.180170
    assert_close((pi * k2(pi.log(), ref.log())).sum(), torch.tensor(0.375 * math.log(2) ** 2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# PPO clip (Clip-Higher, arXiv 2503.14476) and dual-clip (arXiv 1912.09729)
# ----------------------------------------------------------------------------------------------------

# log-ratios 0.1, 0.5, -0.5 on both rows: r = e^0.1 = 1.105171, e^0.5 = 1.648721, e^-0.5 = 0.606531
PPO_OLD_LOG_PROB = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
PPO_LOG_PROB = PPO_OLD_LOG_PROB + torch.tensor([[0.1, 0.5, -0.5], [0.1, 0.5, -0.5]])
PPO_ADVANTAGES = torch.tensor([[1.0], [-2.0]])


def test_ppo_clip_golden():
    """l = -min(r A, clip(r, 1 - 0.2, 1 + 0.28) A)."""
    loss, grad, metrics = _loss_and_grad(
        ppo_clip_loss, PPO_LOG_PROB, PPO_OLD_LOG_PROB, PPO_ADVANTAGES, torch.ones(2, 3), eps_low=0.2, eps_high=0.28
    )
    expected_loss = torch.tensor(
        [
            [
                -1.105171,  # A = 1, r = 1.105171 inside [0.8, 1.28] -> -r A
                -1.28,  # r = 1.648721 > 1.28: min(1.648721, 1.28) = 1.28 -> -1.28 (clipped)
                -0.606531,  # r = 0.606531 < 0.8 but A > 0: min(0.606531, 0.8) = 0.606531 -> unclipped
            ],
            [
                2.210342,  # A = -2, r = 1.105171 inside -> -r A = 2.210342
                3.297443,  # r = 1.648721: min(-3.297443, -2.56) = -3.297443 -> unclipped, 3.297443
                1.6,  # r = 0.606531 < 0.8: min(-1.213061, -1.6) = -1.6 -> clipped, 1.6
            ],
        ]
    )
    assert_close(loss, expected_loss)
    # d(-r A)/dlogp = -A r on unclipped tokens, 0 on clipped ones.
    expected_grad = torch.tensor([[-1.105171, 0.0, -0.606531], [2.210342, 3.297443, 0.0]])
    assert_close(grad, expected_grad)
    assert_close(metrics["clip_ratio/high_mean"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(metrics["clip_ratio/low_mean"], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert_close(metrics["clip_ratio/region_mean"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert "clip_ratio/dual_mean" not in metrics


def test_ppo_dual_clip_golden():
    """Dual-clip (arXiv 1912.09729 eq. 5), c = 3: for A < 0, l = min(l_clip, -c A)."""
    old = torch.zeros(2, 3)
    log_prob = torch.tensor([[0.5, 1.5, -0.5], [0.5, 1.5, -0.5]])  # r = 1.648721, 4.481689, 0.606531
    advantages = torch.tensor([[-2.0], [1.0]])
    loss, grad, metrics = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, torch.ones(2, 3), eps_low=0.2, eps_high=0.28, dual_clip_c=3.0
    )
    expected_loss = torch.tensor(
        [
            [
                3.297443,  # A = -2, r = 1.648721 < 3: l_clip = 3.297443 < c|A| = 6 -> unchanged
                6.0,  # r = 4.481689 > 3: l_clip = 8.963378 > 6 -> 6 (dual-clipped, constant)
                1.6,  # r < 0.8: l_clip = 1.6 < 6 -> unchanged (and PPO-clipped)
            ],
            # A = 1 > 0: dual-clip never applies -> -min(r, clip(r)): -1.28, -1.28, -0.606531
            [-1.28, -1.28, -0.606531],
        ]
    )
    assert_close(loss, expected_loss)
    expected_grad = torch.tensor([[3.297443, 0.0, 0.0], [0.0, 0.0, -0.606531]])  # -A r where unclipped
    assert_close(grad, expected_grad)
    assert_close(metrics["clip_ratio/dual_mean"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def _trl_ppo_clip(log_prob, old_log_prob, advantages, eps_low, eps_high):
    """TRL GRPOTrainer._compute_loss: -min(coef_1 A, clamp(coef_1, 1 - eps_low, 1 + eps_high) A)."""
    coef_1 = torch.exp(log_prob - old_log_prob)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
def test_ppo_clip_matches_trl_and_clipped_gradient_is_zero(eps_low, eps_high):
    generator = torch.Generator().manual_seed(0)
    old = -2 + torch.randn(6, 20, generator=generator)
    log_prob = old + 0.5 * torch.randn(6, 20, generator=generator)
    advantages = torch.randn(6, 20, generator=generator)
    loss, grad, _ = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, torch.ones(6, 20), eps_low=eps_low, eps_high=eps_high
    )
    assert_close(loss, _trl_ppo_clip(log_prob, old, advantages, eps_low, eps_high))
    ratio = torch.exp(log_prob - old)
    clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    assert clipped.sum() > 5 and (~clipped).sum() > 5
    assert (grad[clipped] == 0).all()
    assert_close(grad[~clipped], (-advantages * ratio)[~clipped])


@pytest.mark.parametrize("advantage", [-1.5, -0.3])
def test_dual_clip_bounds_negative_advantage_loss(advantage):
    """For A < 0, the dual-clipped loss never exceeds c |A| for r in [0.1, 100], and its gradient is 0 beyond r = c."""
    c = 3.0
    ratios = torch.logspace(-1, 2, 61, dtype=torch.float64)  # 0.1 ... 100
    log_prob = ratios.log()[None, :]
    old = torch.zeros_like(log_prob)
    advantages = torch.full((1, 1), advantage, dtype=torch.float64)
    mask = torch.ones_like(log_prob)
    loss, grad, metrics = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=c
    )
    plain_loss, plain_grad, _ = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, mask, eps_low=0.2, eps_high=0.28
    )
    bound = c * abs(advantage)
    assert (loss <= bound + 1e-12).all()
    beyond = ratios[None, :] > c
    assert beyond.sum() > 10
    assert_close(loss[beyond], torch.full((int(beyond.sum()),), bound, dtype=torch.float64))
    assert (grad[beyond] == 0).all()
    assert (plain_grad[beyond] != 0).all()  # without dual-clip these tokens still have a gradient
    assert (plain_loss[beyond] > bound).all()
    # Below c the dual clip changes nothing.
    assert_close(loss[~beyond], plain_loss[~beyond])
    assert_close(grad[~beyond], plain_grad[~beyond])
    assert_close(metrics["clip_ratio/dual_mean"], beyond.float())


def test_dual_clip_changes_nothing_for_positive_advantages():
    generator = torch.Generator().manual_seed(3)
    old = torch.zeros(4, 30)
    log_prob = 2.5 * torch.randn(4, 30, generator=generator)  # ratios from ~e^-7 to ~e^7, many beyond c
    advantages = torch.rand(4, 1, generator=generator) + 0.1
    mask = torch.ones(4, 30)
    loss, grad, metrics = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0
    )
    plain_loss, plain_grad, _ = _loss_and_grad(
        ppo_clip_loss, log_prob, old, advantages, mask, eps_low=0.2, eps_high=0.28
    )
    assert (log_prob.exp() > 3.0).sum() > 10
    assert torch.equal(loss, plain_loss)
    assert torch.equal(grad, plain_grad)
    assert metrics["clip_ratio/dual_mean"].sum() == 0


# ----------------------------------------------------------------------------------------------------
# ASPO (arXiv 2510.06062)
# ----------------------------------------------------------------------------------------------------


def test_aspo_golden():
    """eps_low = eps_high = 0.2, C_neg = C_pos = 3. old logp = -3 everywhere."""
    old = torch.full((2, 4), -3.0)
    # row 0 (A = 1):  log-ratios 0.1, 0.5, -0.5, -1.5 -> r = 1.105171, 1.648721, 0.606531, 0.223130
    # row 1 (A = -2): log-ratios 0.1, 0.5, -0.5,  1.5 -> r = 1.105171, 1.648721, 0.606531, 4.481689
    log_prob = old + torch.tensor([[0.1, 0.5, -0.5, -1.5], [0.1, 0.5, -0.5, 1.5]])
    advantages = torch.tensor([[1.0], [-2.0]])
    loss, grad, metrics = _loss_and_grad(
        aspo_loss, log_prob, old, advantages, torch.ones(2, 4), eps_low=0.2, eps_high=0.2
    )
    expected_loss = torch.tensor(
        [
            [
                -0.904837,  # c_pos = r = 1.105171 <= 1.2: value -A / c_pos = -e^-0.1
                -0.833333,  # r = 1.648721 > 1.2: hard mask, c_pos = 1.2 -> -1 / 1.2
                -1.648721,  # c_pos = 0.606531, 1/c_pos = 1.648721 <= 3 -> -1 / 0.606531
                13.5,  # 1/c_pos = 1/0.223130 = 4.481689 > 3: soft clip -A C logp = -1 * 3 * (-4.5)
            ],
            [
                2.210342,  # A < 0, c_neg = r = 1.105171 -> -A c_neg = 2 * 1.105171
                3.297443,  # c_neg = r = 1.648721 <= 3 -> 2 * 1.648721
                1.6,  # r = 0.606531 < 0.8: hard mask, c_neg = 0.8 -> 2 * 0.8
                -9.0,  # c_neg = 4.481689 > 3: soft clip -A C logp = 2 * 3 * (-1.5)
            ],
        ]
    )
    assert_close(loss, expected_loss)
    expected_grad = torch.tensor(
        [
            # -A / r (the flipped weight), 0 (hard mask), -A / r, -A C_pos
            [-0.904837, 0.0, -1.648721, -3.0],
            # -A r, -A r, 0 (hard mask), -A C_neg
            [2.210342, 3.297443, 0.0, 6.0],
        ]
    )
    assert_close(grad, expected_grad)
    assert_close(metrics["clip_ratio/high_mean"], torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(metrics["clip_ratio/low_mean"], torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert_close(metrics["clip_ratio/soft_dual_mean"], torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("advantage", [1.5, 0.2, -0.7, -3.0])
def test_aspo_gradient_by_region(advantage):
    """Over log-ratios -2..2 (no grid point on a boundary: ln 0.8, ln 1.2, ln 3, ln 1/3 are not multiples of 0.1):
    A > 0: grad -A/r unclipped, 0 for r > 1 + eps_high, -A C_pos for 1/r > C_pos; value -A / c_pos unless soft-clipped.
    A < 0: grad -A r unclipped, 0 for r < 1 - eps_low, -A C_neg for r > C_neg."""
    eps_low, eps_high, clip_c = 0.2, 0.2, 3.0
    log_ratio = torch.linspace(-2.0, 2.0, 41, dtype=torch.float64)[None, :]
    old = torch.full_like(log_ratio, -2.5)
    log_prob = old + log_ratio
    ratio = log_ratio.exp()
    advantages = torch.full((1, 1), advantage, dtype=torch.float64)
    loss, grad, _ = _loss_and_grad(
        aspo_loss, log_prob, old, advantages, torch.ones_like(log_prob), eps_low=eps_low, eps_high=eps_high
    )
    a = advantage
    if a > 0:
        hard = ratio > 1 + eps_high
        soft = 1 / ratio > clip_c
        plain = ~hard & ~soft
        assert_close(grad[plain], -a / ratio[plain])
        assert_close(loss[plain], -a / ratio[plain])  # value -A / c_pos, c_pos = r
        assert_close(loss[hard], torch.full((int(hard.sum()),), -a / (1 + eps_high), dtype=torch.float64))
        assert_close(grad[soft], torch.full((int(soft.sum()),), -a * clip_c, dtype=torch.float64))
    else:
        hard = ratio < 1 - eps_low
        soft = ratio > clip_c
        plain = ~hard & ~soft
        assert_close(grad[plain], -a * ratio[plain])
        assert_close(loss[plain], -a * ratio[plain])
        assert_close(loss[hard], torch.full((int(hard.sum()),), -a * (1 - eps_low), dtype=torch.float64))
        assert_close(grad[soft], torch.full((int(soft.sum()),), -a * clip_c, dtype=torch.float64))
    assert_close(loss[soft], -a * clip_c * log_prob[soft])
    assert (grad[hard] == 0).all()
    assert hard.sum() > 3 and soft.sum() > 3 and plain.sum() > 3


# ----------------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (arXiv 2505.22617 sec. 4.2)
# ----------------------------------------------------------------------------------------------------

# 5 valid tokens; the padding token (1, 2) is given a log-prob that would be eligible / top-ranked if the mask were
# ignored. A = 1 on row 0, -1 on row 1: valid mean A = (1 + 1 + 1 - 1 - 1) / 5 = 0.2 -> centered 0.8 and -1.2.
COV_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
COV_ADVANTAGES = torch.tensor([[1.0], [-1.0]])


def _cov_log_prob(pad_value):
    # valid logp mean = (-0.5 - 1 - 3 - 0.5 - 3) / 5 = -1.6 -> centered 1.1, 0.6, -1.4 / 1.1, -1.4
    return torch.tensor([[-0.5, -1.0, -3.0], [-0.5, -3.0, pad_value]])


def test_token_covariance_golden():
    cov = token_covariance(_cov_log_prob(-2.2), COV_ADVANTAGES, COV_MASK)
    expected = torch.tensor(
        [
            [0.88, 0.48, -1.12],  # 1.1 * 0.8, 0.6 * 0.8, -1.4 * 0.8
            [-1.32, 1.68, 0.72],  # 1.1 * -1.2, -1.4 * -1.2; padding: (-2.2 + 1.6) * -1.2 = 0.72 (not excluded here)
        ]
    )
    assert_close(cov, expected)


def _clip_cov_on_cov_batch(clip_cov_lb, clip_cov_ub, **kwargs):
    """clip_cov_loss on the covariance batch, token (0,1) off-policy (log r = 0.5), eps 0.2 / 0.28, ratio 0.4."""
    log_prob = _cov_log_prob(-2.2)
    old = log_prob - torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    return _loss_and_grad(
        clip_cov_loss,
        log_prob,
        old,
        COV_ADVANTAGES,
        COV_MASK,
        eps_low=0.2,
        eps_high=0.28,
        clip_cov_ratio=0.4,
        clip_cov_lb=clip_cov_lb,
        clip_cov_ub=clip_cov_ub,
        **kwargs,
    )


def test_clip_cov_golden():
    """lb = 0.4, ub = 1.0: cov in (0.4, 1.0) for (0,0) = 0.88, (0,1) = 0.48 and padding (1,2) = 0.72.
    (0,1) is PPO-clipped (A = 1, r = e^0.5 = 1.648721 > 1.28) and (1,2) is padding, so (0,0) is the only candidate.
    max(1, int(0.4 * 5)) = 2 > 1 candidate -> exactly (0,0) is detached."""
    loss, grad, metrics = _clip_cov_on_cov_batch(0.4, 1.0, generator=torch.Generator().manual_seed(0))
    # r = 1 elsewhere: -A r = -1 on row 0, 1 on row 1; (0,1): -min(1.648721, 1.28) = -1.28; (0,0) detached -> 0.
    assert_close(loss, torch.tensor([[0.0, -1.28, -1.0], [1.0, 1.0, 1.0]]))
    # gradient -A r; 0 on the detached token and on the PPO-clipped one
    assert_close(grad, torch.tensor([[0.0, 0.0, -1.0], [1.0, 1.0, 1.0]]))
    assert_close(metrics["clip_cov/detached_mean"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(metrics["clip_ratio/region_mean"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_clip_cov_no_eligible_token_detaches_nothing():
    loss, grad, metrics = _clip_cov_on_cov_batch(2.0, 5.0)  # every cov is below lb = 2 (max 1.68)
    # plain clipped PPO: -1 (r = 1, A = 1), -1.28 (clipped), -1; row 1: A = -1, r = 1 -> 1
    assert_close(loss, torch.tensor([[-1.0, -1.28, -1.0], [1.0, 1.0, 1.0]]))
    assert_close(grad, torch.tensor([[-1.0, 0.0, -1.0], [1.0, 1.0, 1.0]]))
    assert metrics["clip_cov/detached_mean"].sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_detaches_exactly_the_budget_among_eligible(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    batch, length = 8, 16
    old = -2 + torch.randn(batch, length, generator=generator)
    log_prob = old + 0.4 * torch.randn(batch, length, generator=generator)
    advantages = torch.randn(batch, length, generator=generator)
    lengths = torch.tensor([16, 3, 9, 12, 1, 16, 7, 10])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    lb, ub, clip_ratio = 0.0, 0.5, 0.05
    num_valid = int(lengths.sum())  # 74
    budget = max(1, int(clip_ratio * num_valid))  # int(3.7) = 3

    settings = dict(eps_low=0.2, eps_high=0.28, clip_cov_ratio=clip_ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    loss, grad, metrics = _loss_and_grad(
        clip_cov_loss, log_prob, old, advantages, mask, **settings, generator=torch.Generator().manual_seed(seed)
    )
    # Eligibility from the definition: cov = (logp - mean logp)(A - mean A) over valid tokens, in (lb, ub),
    # valid, and not PPO-clipped.
    valid = mask.bool()
    cov = (log_prob - log_prob[valid].mean()) * (advantages - advantages[valid].mean())
    ratio = torch.exp(log_prob - old)
    ppo_clipped = ((advantages > 0) & (ratio > 1.28)) | ((advantages < 0) & (ratio < 0.8))
    eligible = (cov > lb) & (cov < ub) & valid & ~ppo_clipped
    assert eligible.sum() > budget  # enough candidates that the budget binds
    assert ((cov > lb) & (cov < ub) & ~valid).any() and ((cov > lb) & (cov < ub) & ppo_clipped).any()

    detached = metrics["clip_cov/detached_mean"].bool()
    assert detached.sum() == budget
    assert not (detached & ~eligible).any()
    assert (loss[detached] == 0).all() and (grad[detached] == 0).all()
    # Every other token keeps the clipped PPO loss and gradient.
    kept = ~detached
    assert_close(loss[kept], _trl_ppo_clip(log_prob, old, advantages, 0.2, 0.28)[kept])
    expected_grad = torch.where(ppo_clipped, 0.0, -advantages * ratio)
    assert_close(grad[kept], expected_grad[kept])
    assert (grad[kept & eligible] != 0).all()

    # Same seed -> same choice.
    _, again = clip_cov_loss(
        log_prob, old, advantages, mask, **settings, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(again["clip_cov/detached_mean"], metrics["clip_cov/detached_mean"])


def test_kl_cov_golden():
    """KL-Cov: the top max(1, int(0.5 * 5)) = 2 valid tokens by covariance get + coef |logp - old_logp|.
    cov (see test_token_covariance_golden): [[0.88, 0.48, -1.12], [-1.32, 1.68, pad]]; the padding token has logp -6:
    (-6 + 1.6) * -1.2 = 5.28, the largest, but it is masked. Top-2 valid: (1,1) = 1.68 and (0,0) = 0.88."""
    log_prob = _cov_log_prob(-6.0)
    old = torch.tensor([[-0.3, -1.5, -3.0], [-0.5, -2.0, -6.0]])
    # logp - old = [[-0.2, 0.5, 0], [0, -1, 0]]
    # -> r = [[e^-0.2 = 0.818731, e^0.5 = 1.648721, 1], [1, e^-1 = 0.367879, 1]]
    loss, grad, metrics = _loss_and_grad(
        kl_cov_loss, log_prob, old, COV_ADVANTAGES, COV_MASK, kl_cov_ratio=0.5, kl_cov_coef=2.0
    )
    expected_loss = torch.tensor(
        [
            [
                -0.418731,  # penalized: -A r + 2 |-0.2| = -0.818731 + 0.4
                -1.648721,  # -A r = -1.648721 (no clipping in KL-Cov)
                -1.0,  # -A r = -1
            ],
            [
                1.0,  # A = -1, r = 1 -> 1
                2.367879,  # penalized: -A r + 2 |-1| = 0.367879 + 2
                1.0,  # padding: plain -A r = 1, never penalized
            ],
        ]
    )
    assert_close(loss, expected_loss)
    # gradient: -A r, plus coef * sign(logp - old) on penalized tokens: -0.818731 - 2, 0.367879 - 2
    expected_grad = torch.tensor([[-2.818731, -1.648721, -1.0], [1.0, -1.632121, 1.0]])
    assert_close(grad, expected_grad)
    assert_close(metrics["kl_cov/penalized_mean"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def test_kl_cov_default_ratio_penalizes_one_token_and_all_masked_none():
    log_prob = _cov_log_prob(-6.0)
    old = torch.tensor([[-0.3, -1.5, -3.0], [-0.5, -2.0, -6.0]])
    # default ratio 2e-3: max(1, int(0.01)) = 1 -> only the top cov (1,1) = 1.68; coef 1: 0.367879 + 1
    loss, _ = kl_cov_loss(log_prob, old, COV_ADVANTAGES, COV_MASK)
    assert_close(loss, torch.tensor([[-0.818731, -1.648721, -1.0], [1.0, 1.367879, 1.0]]))
    # no valid token -> nothing penalized, plain -A r
    loss, metrics = kl_cov_loss(log_prob, old, COV_ADVANTAGES, torch.zeros(2, 3))
    assert_close(loss, torch.tensor([[-0.818731, -1.648721, -1.0], [1.0, 0.367879, 1.0]]))
    assert metrics["kl_cov/penalized_mean"].sum() == 0


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------

AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_token_mean_golden():
    """DAPO (arXiv 2503.14476 eq. 8)."""
    # (1 + 2 + 4 + 5 + 6) / 5 valid tokens = 18 / 5
    assert_close(token_mean(AGG_LOSS, AGG_MASK), torch.tensor(3.6))
    # with the global token count of a larger batch: 18 / 10
    assert_close(token_mean(AGG_LOSS, AGG_MASK, num_tokens=10), torch.tensor(1.8))
    assert_close(token_mean(AGG_LOSS, AGG_MASK, num_tokens=torch.tensor(10)), torch.tensor(1.8))


def test_seq_mean_token_mean_golden():
    """GRPO (arXiv 2402.03300): ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2 = (1.5 + 5) / 2."""
    assert_close(seq_mean_token_mean(AGG_LOSS, AGG_MASK), torch.tensor(3.25))


def test_seq_mean_token_sum_norm_golden():
    """Dr. GRPO (arXiv 2503.20783): 18 / (B * max_length) = 18 / (2 * 4)."""
    assert_close(seq_mean_token_sum_norm(AGG_LOSS, AGG_MASK, max_length=4), torch.tensor(2.25))


def _aggregation_batch():
    generator = torch.Generator().manual_seed(0)
    per_token_loss = torch.randn(6, 7, generator=generator)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    return per_token_loss, mask


@pytest.mark.parametrize("splits", [[0, 2, 6], [0, 1, 4, 6], [0, 5, 6]])
def test_token_mean_split_invariance(splits):
    """Summing the shares of uneven splits (processes / accumulation steps) with the global token count gives the
    full-batch token mean."""
    per_token_loss, mask = _aggregation_batch()
    num_tokens = mask.sum()  # 25
    full = token_mean(per_token_loss, mask)
    shares = [token_mean(per_token_loss[a:b], mask[a:b], num_tokens=num_tokens) for a, b in _consecutive(splits)]
    assert_close(sum(shares), full)
    # Sanity: averaging each split's own token mean is NOT the same thing.
    local = [token_mean(per_token_loss[a:b], mask[a:b]) for a, b in _consecutive(splits)]
    assert not torch.allclose(sum(local) / len(local), full)


@pytest.mark.parametrize("num_splits", [2, 3, 6])
def test_seq_mean_token_mean_split_invariance(num_splits):
    per_token_loss, mask = _aggregation_batch()
    full = seq_mean_token_mean(per_token_loss, mask)
    chunks = zip(per_token_loss.chunk(num_splits), mask.chunk(num_splits), strict=True)
    shares = [seq_mean_token_mean(chunk_loss, chunk_mask) for chunk_loss, chunk_mask in chunks]
    assert len(shares) == num_splits
    assert_close(sum(shares) / num_splits, full)


@pytest.mark.parametrize("splits", [[0, 3, 6], [0, 1, 4, 6], [0, 5, 6]])
def test_seq_mean_token_sum_norm_split_invariance(splits):
    """Each split returns S_k / (B_k L); the full batch is sum_k S_k / (B L) = sum_k (B_k / B) * share_k."""
    per_token_loss, mask = _aggregation_batch()
    full = seq_mean_token_sum_norm(per_token_loss, mask, max_length=7)
    combined = sum(
        (b - a) / 6 * seq_mean_token_sum_norm(per_token_loss[a:b], mask[a:b], max_length=7)
        for a, b in _consecutive(splits)
    )
    assert_close(combined, full)


# ----------------------------------------------------------------------------------------------------
# No NaN in degenerate batches
# ----------------------------------------------------------------------------------------------------

ALL_HYPERPARAMETERS = dict(
    eps_low=0.2,
    eps_high=0.28,
    dual_clip_c=3.0,
    aspo_neg_clip=3.0,
    aspo_pos_clip=3.0,
    clip_cov_ratio=0.5,
    clip_cov_lb=-100.0,
    clip_cov_ub=100.0,
    kl_cov_ratio=0.5,
    kl_cov_coef=1.0,
)


def _degenerate_case(name):
    generator = torch.Generator().manual_seed(0)
    old = -1.0 - torch.rand(2, 3, generator=generator)
    log_prob = old + 0.3 * torch.randn(2, 3, generator=generator)
    advantages = torch.tensor([[1.0], [-1.0]])
    mask = torch.ones(2, 3)
    if name == "zero_variance_group":
        advantages = grpo_advantages(torch.tensor([1.0, 1.0]), 2)[:, None]  # all-equal group -> A = 0
    elif name == "all_masked":
        mask = torch.zeros(2, 3)
    elif name == "single_token":
        old, log_prob, mask = old[:, :1], log_prob[:, :1], mask[:, :1]
    elif name == "extreme_log_ratio":
        # e^100 overflows float32: only the MAX_LOG_RATIO clamp keeps these finite.
        log_prob = old + torch.tensor([[100.0, -100.0, 0.0], [100.0, -100.0, 0.0]])
    return log_prob, old, advantages, mask


@pytest.mark.parametrize("loss_name", ["ppo_clip", "aspo", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("case", ["zero_variance_group", "all_masked", "single_token", "extreme_log_ratio"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_losses_and_aggregations_finite_on_degenerate_batches(loss_name, case, aggregation):
    log_prob, old, advantages, mask = _degenerate_case(case)
    log_prob.requires_grad_(True)
    per_token_loss, metrics = call_with_supported(
        POLICY_LOSSES.get(loss_name), log_prob, old, advantages, mask, **ALL_HYPERPARAMETERS
    )
    loss = call_with_supported(
        AGGREGATIONS.get(aggregation), per_token_loss, mask, num_tokens=mask.sum(), max_length=log_prob.size(1)
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert torch.isfinite(per_token_loss).all()
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    for value in metrics.values():
        assert torch.isfinite(value).all()
    if case == "all_masked":
        assert loss.item() == 0.0
        assert (grad == 0).all()
    if case == "zero_variance_group" and loss_name != "kl_cov":
        # A = 0 -> every loss term is -0 * (something finite); KL-Cov adds its |logp - old| penalty on top.
        assert loss.item() == 0.0


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_advantages_finite_on_degenerate_rewards(name):
    estimator = ADVANTAGES.get(name)
    # Zero-variance groups (and a zero-variance batch): every baseline-using estimator gives exactly 0.
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    advantages = estimator(rewards, 3)
    expected = rewards if name == "reinforce_pp" else torch.zeros(6)  # REINFORCE++ has no baseline
    assert_close(advantages, expected)
    if name == "grpo":
        for scale_rewards in ["group", "batch", "none"]:
            assert_close(estimator(rewards, 3, scale_rewards=scale_rewards), torch.zeros(6))
            assert_close(estimator(torch.full((6,), 2.0), 3, scale_rewards=scale_rewards), torch.zeros(6))
    # Group size 1: no baseline can be formed (GRPO: std undefined, RLOO: no other sample; r - mean = 0), so 0,
    # except REINFORCE++ which passes the raw reward through.
    single = estimator(torch.tensor([0.3, -2.0]), 1)
    assert_close(single, torch.tensor([0.3, -2.0]) if name == "reinforce_pp" else torch.zeros(2))
    # A group with no scored reward at all.
    all_nan = estimator(torch.tensor([NAN, NAN, 1.0, 0.0]), 2)
    assert torch.isfinite(all_nan).all()
    assert (all_nan[:2] == 0).all()
    # Single-token completions: the token-level REINFORCE++ steps stay finite.
    kl = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
    token_advantages = kl_penalty_to_go(advantages, kl, torch.ones(6, 1), beta=0.01)
    assert torch.isfinite(masked_whiten(token_advantages, torch.ones(6, 1))).all()
    assert_close(masked_whiten(token_advantages, torch.zeros(6, 1)), torch.zeros(6, 1))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ],
)
@pytest.mark.parametrize(
    "loss_fn, advantage, old_value, log_ratio, expected_loss, expected_grad",
    [
        # ppo_clip, A = 1, r = e^12 = 162755 > 1.28: clipped -> loss -1.28, gradient 0
        (ppo_clip_loss, 1.0, -1.0, 12.0, -1.28, 0.0),
        # ASPO, A = 1, logp = -16, r = e^-15, 1/r > 3: soft clip -A C logp = -3 * -16 = 48, gradient -A C = -3
        (aspo_loss, 1.0, -1.0, -15.0, 48.0, -3.0),
        # ASPO, A = -1, logp = -1, r = e^12 > 3: soft clip -A C logp = 3 * -1 = -3, gradient -A C = 3
        (aspo_loss, -1.0, -13.0, 12.0, -3.0, 3.0),
    ],
)
def test_large_log_ratios_in_half_precision(
    loss_fn, advantage, old_value, log_ratio, expected_loss, expected_grad, dtype
):
    """An extreme (clipped) token never turns into NaN in low precision: the ratio is float32 and bounded."""
    old = torch.tensor([[old_value]], dtype=dtype)
    loss, grad, _ = _loss_and_grad(
        loss_fn,
        old + log_ratio,
        old,
        torch.tensor([[advantage]], dtype=dtype),
        torch.ones(1, 1),
        eps_low=0.2,
        eps_high=0.28,
    )
    tolerance = dict(atol=2e-3, rtol=1e-2) if dtype != torch.float32 else {}
    # The ratio is computed in float32 (float16 overflows past e^11), so the loss comes back in float32.
    assert_close(loss.to(dtype), torch.tensor([[expected_loss]], dtype=dtype), **tolerance)
    assert_close(grad, torch.tensor([[expected_grad]], dtype=dtype), **tolerance)


# ----------------------------------------------------------------------------------------------------
# Gradient-preserving clipping (GPPO arXiv 2508.07629, CE-GPPO arXiv 2509.20712) and TRL's delta
# ----------------------------------------------------------------------------------------------------

# log-ratios 0.1, 0.5, -0.5, 1.5 -> r = 1.105171, 1.648721, 0.606531, 4.481689; old logp = -3 everywhere.
_GPPO_LOG_RATIOS = torch.tensor([[0.1, 0.5, -0.5, 1.5], [0.1, 0.5, -0.5, 1.5]])


def test_gppo_golden():
    """eps_low = 0.2, eps_high = 0.28. Row 0 A = 1, row 1 A = -2."""
    old = torch.full((2, 4), -3.0)
    advantages = torch.tensor([[1.0], [-2.0]])
    loss, grad, metrics = _loss_and_grad(
        gppo_loss, old + _GPPO_LOG_RATIOS, old, advantages, torch.ones(2, 4), eps_low=0.2, eps_high=0.28
    )
    expected_loss = torch.tensor(
        [
            # -A r; r = 1.648721 > 1.28: clipped, -(1 + eps_high) A = -1.28; r = 0.606531 (A > 0: no low clip);
            # r = 4.481689 > 1.28: clipped, -1.28
            [-1.105171, -1.28, -0.606531, -1.28],
            # A < 0: -A r = 2 * r for r >= 0.8; r = 0.606531 < 0.8: clipped, -(1 - eps_low) A = 0.8 * 2 = 1.6
            [2.210342, 3.297443, 1.6, 8.963378],
        ]
    )
    assert_close(loss, expected_loss)
    # Unclipped: d(-A r)/d logp = -A r. Clipped: -(1 -/+ eps) A (r / sg(r))' = -(1 -/+ eps) A, where PPO gives 0.
    expected_grad = torch.tensor([[-1.105171, -1.28, -0.606531, -1.28], [2.210342, 3.297443, 1.6, 8.963378]])
    assert_close(grad, expected_grad)
    assert_close(metrics["clip_ratio/high_mean"], torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(metrics["clip_ratio/low_mean"], torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))


def test_gppo_with_dual_clip_and_delta_golden():
    """Dual clip c = 3: row 1 (A = -2), r = 4.481689: -A r = 8.963378 > -A c = 6 -> loss 6, gradient 0.
    delta = 1.5 (TRL's two-sided clip of the unclipped term): row 0 (A = 1) is clipped above 1.28 anyway; row 1's
    r = 1.648721 -> -A min(r, 1.5) = 3.0, gradient 0; r = 4.481689 -> 3.0, then dual clip leaves 3 < 6."""
    old = torch.full((2, 4), -3.0)
    advantages = torch.tensor([[1.0], [-2.0]])
    ones = torch.ones(2, 4)
    loss, grad, metrics = _loss_and_grad(
        gppo_loss, old + _GPPO_LOG_RATIOS, old, advantages, ones, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0
    )
    assert_close(loss[1], torch.tensor([2.210342, 3.297443, 1.6, 6.0]))
    assert_close(grad[1], torch.tensor([2.210342, 3.297443, 1.6, 0.0]))
    assert_close(metrics["clip_ratio/dual_mean"][1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    loss, grad, _ = _loss_and_grad(
        gppo_loss, old + _GPPO_LOG_RATIOS, old, advantages, ones, eps_low=0.2, eps_high=0.28, delta=1.5
    )
    assert_close(loss[1], torch.tensor([2.210342, 3.0, 1.6, 3.0]))
    assert_close(grad[1], torch.tensor([2.210342, 0.0, 1.6, 0.0]))


def test_ce_gppo_golden():
    """beta1 = 0.5 (A < 0, r < 1 - eps_low), beta2 = 2 (A > 0, r > 1 + eps_high): the clipped tokens' loss and
    gradient are beta times GPPO's: row 0 r = 1.648721, 4.481689: -2 * 1.28 = -2.56; row 1 r = 0.606531:
    0.5 * 0.8 * 2 = 0.8. Unclipped tokens are GPPO's (and PPO's)."""
    old = torch.full((2, 4), -3.0)
    advantages = torch.tensor([[1.0], [-2.0]])
    loss, grad, _ = _loss_and_grad(
        ce_gppo_loss,
        old + _GPPO_LOG_RATIOS,
        old,
        advantages,
        torch.ones(2, 4),
        eps_low=0.2,
        eps_high=0.28,
        ce_gppo_beta_low=0.5,
        ce_gppo_beta_high=2.0,
    )
    expected = torch.tensor([[-1.105171, -2.56, -0.606531, -2.56], [2.210342, 3.297443, 0.8, 8.963378]])
    assert_close(loss, expected)
    assert_close(grad, expected)  # every term here is (constant) * r / sg(r) or -A r: gradient = value


def test_ce_gppo_registered_defaults_are_the_authors():
    import inspect

    defaults = inspect.signature(POLICY_LOSSES.get("ce_gppo")).parameters
    assert (defaults["ce_gppo_beta_low"].default, defaults["ce_gppo_beta_high"].default) == (0.75, 1.0)


@pytest.mark.parametrize("advantage", [1.5, -0.7])
def test_gradient_preserving_clip_properties(advantage):
    """Over log-ratios -2..2: (1) GPPO's loss VALUE is PPO-clip's everywhere (only the backward pass differs);
    (2) its gradient is PPO's on unclipped tokens and -(1 -/+ eps) A on clipped ones, bounded by (1 + eps_high) |A|
    where PPO's is 0; (3) CE-GPPO with beta1 = beta2 = 0 is PPO-clip exactly, value and gradient."""
    eps_low, eps_high = 0.2, 0.28
    log_ratio = torch.linspace(-2.0, 2.0, 41, dtype=torch.float64)[None, :]
    old = torch.full_like(log_ratio, -2.5)
    advantages = torch.full((1, 1), advantage, dtype=torch.float64)
    mask = torch.ones_like(log_ratio)
    hyper = {"eps_low": eps_low, "eps_high": eps_high}
    ppo, ppo_grad, _ = _loss_and_grad(ppo_clip_loss, old + log_ratio, old, advantages, mask, **hyper)
    gppo, gppo_grad, metrics = _loss_and_grad(gppo_loss, old + log_ratio, old, advantages, mask, **hyper)
    assert_close(gppo, ppo)
    clipped = metrics["clip_ratio/region_mean"].bool()
    assert clipped.any() and (~clipped).any()
    assert_close(gppo_grad[~clipped], ppo_grad[~clipped])
    assert (ppo_grad[clipped] == 0).all()
    bound = (1 - eps_low) if advantage < 0 else (1 + eps_high)
    assert_close(gppo_grad[clipped], torch.full_like(gppo_grad[clipped], -bound * advantage))
    zero_beta, zero_beta_grad, _ = _loss_and_grad(
        ce_gppo_loss, old + log_ratio, old, advantages, mask, ce_gppo_beta_low=0.0, ce_gppo_beta_high=0.0, **hyper
    )
    assert_close(zero_beta_grad, ppo_grad)
    assert_close(zero_beta[~clipped], ppo[~clipped])  # clipped tokens: value 0 * bound, gradient 0 as PPO


def test_ppo_clip_delta_golden():
    """TRL's delta (INTELLECT-2): the unclipped ratio is min(r, delta). eps_low = 0.2, eps_high = 1.0, delta = 1.5.
    A = 1, r = 1.648721 (< 1 + eps_high = 2): -min(min(r, 1.5), clip(r)) A = -1.5, gradient 0 (PPO: -r, -1.648721).
    A = -1, r = 4.481689: -min(-1.5, -2) = 2 (the clipped term, as PPO; gradient 0)."""
    old = torch.full((2, 1), -3.0)
    log_prob = old + torch.tensor([[0.5], [1.5]])
    loss, grad, _ = _loss_and_grad(
        ppo_clip_loss,
        log_prob,
        old,
        torch.tensor([[1.0], [-1.0]]),
        torch.ones(2, 1),
        eps_low=0.2,
        eps_high=1.0,
        delta=1.5,
    )
    assert_close(loss, torch.tensor([[-1.5], [2.0]]))
    assert_close(grad, torch.tensor([[0.0], [0.0]]))


# ----------------------------------------------------------------------------------------------------
# Entropy-shaped advantages (arXiv 2506.14758)
# ----------------------------------------------------------------------------------------------------


def test_entropy_shaped_advantages_golden():
    """alpha = 0.4, kappa = 2: psi = min(0.4 H, |A| / 2).
    A = 1:  H = 0.5 -> min(0.2, 0.5) = 0.2 -> 1.2; H = 2 -> min(0.8, 0.5) = 0.5 -> 1.5; H = 0 -> 1.0; masked -> 0.
    A = -1: -1 + 0.2 = -0.8; -1 + 0.5 = -0.5; -1.0; masked -> 0.
    A = 0:  min(0.4 H, 0) = 0: a zero advantage stays 0 (no signal is invented)."""
    advantages = torch.tensor([[1.0], [-1.0], [0.0]])
    entropies = torch.tensor([[0.5, 2.0, 0.0, 3.0]]).expand(3, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(3, 4)
    shaped = entropy_shaped_advantages(advantages, entropies, mask, alpha=0.4, kappa=2.0)
    assert_close(shaped, torch.tensor([[1.2, 1.5, 1.0, 0.0], [-0.8, -0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_entropy_shaped_advantages_properties():
    """For random A and H >= 0 with kappa > 1: the bonus is in [0, |A| / kappa] and at most alpha H, the sign of A
    never flips, and no gradient reaches the entropies (sg(H))."""
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(64, 1, generator=generator) * 2
    entropies = (torch.rand(64, 16, generator=generator) * 4).requires_grad_(True)
    mask = torch.ones(64, 16)
    for alpha, kappa in [(0.1, 1.5), (0.4, 2.0), (5.0, 1.01)]:
        shaped = entropy_shaped_advantages(advantages, entropies, mask, alpha=alpha, kappa=kappa)
        bonus = shaped - advantages
        assert (bonus >= 0).all()
        assert (bonus <= advantages.abs() / kappa + 1e-6).all()
        assert (bonus <= alpha * entropies.detach() + 1e-6).all()
        assert (torch.sign(shaped) == torch.sign(advantages).expand_as(shaped)).all()
        assert not shaped.requires_grad
