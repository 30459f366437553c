"""PF-PPO policy filtration (arXiv 2409.06957): the pure weights of `trl_plus.algos.POLICY_FILTERS` and their use in
the trainers (which completions are trained on, with which advantages and normalizers)."""

import pytest
import torch
from conftest import digit_reward, make_config
from test_trainer import RecordingReward, generation_output, loss_and_grads, prepare_for_loss

import trl_plus
from trl_plus.algos import (
    POLICY_FILTERS,
    best_of_n_weights,
    grpo_advantages,
    max_min_weights,
    max_random_weights,
    normalize_filter_weights,
    pow_weights,
)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------- pure weights


def test_registry_names():
    assert POLICY_FILTERS.names() == ["best_of_n", "max_min", "max_random", "pow"]


def test_filter_golden():
    # Two groups of 4. Group 1: rewards 0.2, 0.9, 0.5, 0.9 -> best 0.9 (rows 1 and 3, a tie), worst 0.2 (row 0).
    # Group 2: 1.0, NaN (unscored), -2.0, 1.0 -> best 1.0 (rows 4, 7), worst -2.0 (row 6); the NaN row gets 0 always.
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.9, 1.0, NAN, -2.0, 1.0])
    # best_of_n: 1 on the best of each group, ties included.
    assert best_of_n_weights(rewards, 4).tolist() == [0, 1, 0, 1, 1, 0, 0, 1]
    # max_min (BW): best or worst.
    assert max_min_weights(rewards, 4).tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    # max_random: 0.4 on the best, 0.1 elsewhere, 0 unscored.
    torch.testing.assert_close(max_random_weights(rewards, 4), torch.tensor([0.1, 0.4, 0.1, 0.4, 0.4, 0, 0.1, 0.4]))
    # pow, k = 2: 0.04, 0.81, 0.25, 0.81, 1, 0, 4, 1; k = 1: |r|.
    torch.testing.assert_close(
        pow_weights(rewards, 4, weight_pow=2.0), torch.tensor([0.04, 0.81, 0.25, 0.81, 1.0, 0.0, 4.0, 1.0])
    )
    torch.testing.assert_close(pow_weights(rewards, 4, weight_pow=1.0), torch.nan_to_num(rewards.abs()))


def test_filter_degenerate_groups():
    # All equal: every row is both the best and the worst. All unscored: nothing kept.
    rewards = torch.tensor([0.5, 0.5, 0.5, NAN, NAN, NAN])
    assert best_of_n_weights(rewards, 3).tolist() == [1, 1, 1, 0, 0, 0]
    assert max_min_weights(rewards, 3).tolist() == [1, 1, 1, 0, 0, 0]
    assert max_random_weights(rewards, 3).tolist() == pytest.approx([0.4, 0.4, 0.4, 0, 0, 0])


def test_normalize_golden():
    # Kept weights 0.1, 0.4, 0.1 (one row dropped): mean 0.2 -> 0.5, 2.0, 0.5, and the dropped row stays 0.
    weights = torch.tensor([0.1, 0.4, 0.0, 0.1])
    normalized = normalize_filter_weights(weights, total_weight=0.6, num_kept=3.0)
    torch.testing.assert_close(normalized, torch.tensor([0.5, 2.0, 0.0, 0.5]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["best_of_n", "max_min", "max_random", "pow"])
def test_filter_properties(name, seed):
    generator = torch.Generator().manual_seed(seed)
    group_size, num_groups = 6, 5
    rewards = torch.randint(0, 4, (num_groups * group_size,), generator=generator).float()  # ties are common
    rewards[torch.rand(rewards.shape, generator=generator) < 0.1] = NAN
    weights = POLICY_FILTERS.get(name)(rewards, group_size)
    assert (weights >= 0).all() and torch.isfinite(weights).all()
    assert (weights[torch.isnan(rewards)] == 0).all()
    # Only the order of ranks matters, not the order of rows: permuting a group's rows permutes its weights.
    permutation = torch.cat([g * group_size + torch.randperm(group_size, generator=generator) for g in range(5)])
    torch.testing.assert_close(POLICY_FILTERS.get(name)(rewards[permutation], group_size), weights[permutation])
    grouped_rewards, grouped = rewards.view(num_groups, group_size), weights.view(num_groups, group_size)
    if name != "pow":  # the rank filters keep every group's best
        best = torch.where(torch.isnan(grouped_rewards), -torch.inf, grouped_rewards).amax(1, keepdim=True)
        assert (grouped[grouped_rewards == best] > 0).all()
    if name in ("best_of_n", "max_min"):
        assert set(weights.tolist()) <= {0.0, 1.0}
    if name == "best_of_n":
        assert (weights <= max_min_weights(rewards, group_size)).all()  # BoN keeps a subset of BW
    kept = weights > 0
    normalized = normalize_filter_weights(weights, weights.sum().item(), kept.sum().item())
    assert normalized[kept].mean().item() == pytest.approx(1.0)
    assert (normalized[~kept] == 0).all()


# ---------------------------------------------------------------------------------------------- in the trainer


def build(tiny_model_path, prompt_dataset, tmp_path, reward, **overrides):
    args = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    return trl_plus.GRPOTrainer(tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)


def test_config_validates_policy_filtration(tmp_path):
    with pytest.raises(ValueError, match=r"`policy_filtration` is 'top'; valid choices: \['best_of_n', 'max_min'"):
        make_config(trl_plus.GRPOConfig, tmp_path, policy_filtration="top")
    with pytest.raises(ValueError, match=r"`policy_filtration_pow` is 0.0; valid: > 0"):
        make_config(trl_plus.GRPOConfig, tmp_path, policy_filtration="pow", policy_filtration_pow=0.0)


@pytest.mark.parametrize("name", ["max_min", "pow"])
def test_trainer_applies_the_filter_weights(tiny_model_path, prompt_dataset, tmp_path, name):
    reward = RecordingReward("digits", digit_reward)
    trainer = build(tiny_model_path, prompt_dataset, tmp_path, reward, policy_filtration=name)
    output = generation_output(trainer)
    rewards = torch.tensor(reward.calls[-1])  # (8,): 2 groups of 4
    weights = POLICY_FILTERS.get(name)(rewards, 4, **({"weight_pow": 2.0} if name == "pow" else {}))
    kept = weights > 0
    assert 0 < kept.sum() < 8  # something is filtered out
    normalized = weights * kept.sum() / weights.sum()  # kept weights average 1
    # TRL's GRPO advantages (scale_rewards="group"), times the normalized weights.
    torch.testing.assert_close(output["advantages"], grpo_advantages(rewards, 4) * normalized, rtol=1e-5, atol=1e-6)
    completion_mask = output["completion_mask"]
    assert (completion_mask[~kept] == 0).all() and (completion_mask[kept].sum(1) > 0).all()
    assert output["num_items_in_batch"].item() == completion_mask.sum().item()
    assert "policy_filter_weight" not in output
    assert trainer._metrics["train"]["policy_filtration/kept_fraction"][-1] == pytest.approx(kept.float().mean())


def test_filtered_completions_train_as_if_not_generated(tiny_model_path, prompt_dataset, tmp_path):
    # best_of_n keeps only each group's best: the loss and gradients on the filtered batch are those of the batch of
    # the kept rows alone (TRL's "dapo" normalizer counts only their tokens).
    reward = RecordingReward("digits", digit_reward)
    trainer = build(tiny_model_path, prompt_dataset, tmp_path, reward, policy_filtration="best_of_n")
    output = generation_output(trainer)
    kept = best_of_n_weights(torch.tensor(reward.calls[-1]), 4) > 0
    assert 0 < kept.sum() < 8
    prepare_for_loss(trainer)
    loss, grads = loss_and_grads(trainer, output)
    alone = {key: value[kept] if value.dim() else value for key, value in output.items()}
    alone["num_items_in_batch"] = alone["completion_mask"].sum()
    alone_loss, alone_grads = loss_and_grads(trainer, alone)
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-7)
    for key, grad in alone_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-7)
    assert loss.abs() > 0


def test_ppo_filters_after_whitening(tiny_model_path, prompt_dataset, tmp_path):
    # PPO with a critic: GAE advantages, whitened over the batch, then weighted (max_random: 0.4 on each group's best,
    # 0.1 elsewhere, normalized to mean 1). Without filtration the same seed gives the whitened advantages alone.
    settings = dict(num_generations=4, policy_filtration="max_random")
    reward = RecordingReward("digits", digit_reward)
    args = make_config(trl_plus.PPOConfig, tmp_path / "pf", **settings)
    trainer = trl_plus.PPOTrainer(tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)
    output = generation_output(trainer)
    args = make_config(trl_plus.PPOConfig, tmp_path / "plain", num_generations=4)
    plain = trl_plus.PPOTrainer(tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset)
    reference = generation_output(plain)
    torch.testing.assert_close(output["completion_ids"], reference["completion_ids"])
    weights = max_random_weights(torch.tensor(reward.calls[-1]), 4)
    normalized = weights * 8 / weights.sum()
    assert len(set(normalized.tolist())) == 2  # two levels: 4x apart
    torch.testing.assert_close(output["advantages"], reference["advantages"] * normalized[:, None])


def test_dynamic_sampling_carries_the_weights(tiny_model_path, prompt_dataset, tmp_path):
    # DAPO regroups rows across rounds: each kept row's weight travels with it, so the trained batch keeps exactly the
    # best of each of its groups (best_of_n) and a whole step trains.
    args = make_config(trl_plus.DAPOConfig, tmp_path, policy_filtration="best_of_n", max_steps=2)
    trainer = trl_plus.DAPOTrainer(tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset)
    trainer.train()
    kept = [entry["policy_filtration/kept_fraction"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(kept) == 2 and all(0 < share < 1 for share in kept)
