"""`trl_plus.GRPOTrainer` and the preset trainers on a tiny CPU model.

1. Drop-in parity: with a default `trl_plus.GRPOConfig` training is `trl.GRPOTrainer`'s, step for step.
2. The registry loss path (PPO-clip + aggregation + KL) reproduces TRL's `_compute_loss` where both define the loss.
3. Dual-clip (arXiv 1912.09729) on crafted ratios, against hand-derived values.
4. Estimators inside the trainer equal the pure functions of `trl_plus.algos` applied to the rewards.
5. Every preset and every trl_plus loss trains: parameters move, losses are finite, its metrics are logged.
6. Degenerate batches (everything masked, constant rewards) never produce NaN.
"""

import math
from pathlib import Path

import pytest
import torch
import transformers
import trl
from conftest import digit_reward, make_config
from datasets import Dataset
from transformers import set_seed
from trl.rewards import get_soft_overlong_punishment

import trl_plus
from trl_plus.algos import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    kl_penalty_to_go,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from trl_plus.rewards import overlong_penalty

PAD_ID, EOS_ID, VOCAB_SIZE = 0, 1, 48  # trl_plus.tiny's character tokenizer: <pad>, <eos>, <unk> + 45 characters
# The random tiny model rarely ends a completion. Raising <eos>'s logit by 3 (p ~ 0.3 per token for its near-uniform
# distribution) makes completions end at varied lengths, so masks and per-sequence normalizers matter.
EOS_BIAS = {"sequence_bias": [[[EOS_ID], 3.0]]}
# Forbidding <pad> and <eos> makes every completion run to max_completion_length, i.e. be truncated.
NO_EOS = {"suppress_tokens": [PAD_ID, EOS_ID]}
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# An off-policy layout: one generation batch of 4 x 4 = 16 rows serves 4 micro-batches of 4 rows, 2 per optimizer
# step, so TRL computes old_per_token_logps and the token_mean normalizer is num_items_in_batch * 2 / 4.
OFF_POLICY = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "steps_per_generation": 4}
# TRL's PPO-clip loss types and the trl_plus aggregation each one is.
AGGREGATION_OF = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


# ---------------------------------------------------------------------------------------------- helpers


class RecordingReward:
    """A reward function that remembers what it returned (TRL names its metric after `__name__`)."""

    def __init__(self, name, function):
        self.__name__ = name
        self.function = function
        self.calls = []

    def __call__(self, completions, **kwargs):
        rewards = self.function(completions)
        self.calls.append(rewards)
        return rewards


def length_reward(completions):
    return [float(len(completion)) for completion in completions]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def build(
    model_path,
    dataset,
    output_dir,
    trainer_class=trl_plus.GRPOTrainer,
    config_class=trl_plus.GRPOConfig,
    reward_funcs=digit_reward,
    **overrides,
):
    args = make_config(config_class, output_dir, **overrides)
    return trainer_class(model_path, reward_funcs=reward_funcs, args=args, train_dataset=dataset)


def generation_output(trainer, seed=0):
    """`_generate_and_score_completions` on the first generation batch of the training dataloader (train mode)."""
    trainer.model.train()
    set_seed(seed)
    return trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))


def micro_batch(trainer, seed=0):
    """The first micro-batch of training, as `_prepare_inputs` builds it: generate, shuffle, split."""
    trainer.model.train()
    # Set by transformers' training loop before each optimizer step; `_compute_loss` reads it in train mode.
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer._step, trainer._buffered_inputs = 0, None
    set_seed(seed)
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_and_grads(trainer, inputs, trl_reference=False):
    """The loss on `inputs` and the gradient of every parameter (fresh: gradients are zeroed before and after).

    With `trl_reference`, the loss is TRL's own `_compute_loss` run on this (trl_plus) trainer: the reference the
    registry path must reproduce.
    """
    model = trainer.model
    model.zero_grad(set_to_none=True)
    if trl_reference:
        loss = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
    else:
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def last_metrics(trainer):
    return {name: values[-1] for name, values in trainer._metrics["train"].items() if values}


def assert_same_grads(actual, expected, rtol=1e-5, atol=1e-7):
    assert len(expected) > 0 and actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def policy_log_probs(trainer, batch):
    """Log-probs of the completion tokens under the current policy, `(B, T)`, without gradient."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, batch["completion_ids"].size(1)
        )
    return log_probs


def perturb_log_probs(inputs, keys, scale=0.3, seed=1):
    """Add Gaussian noise (log space) to stored log-probs: ratios and KL move away from 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(inputs)
    for key in keys:
        inputs[key] = inputs[key] + scale * torch.randn(inputs[key].shape, generator=generator)
    return inputs


def perturb_policy(trainer, scale=0.05, seed=1):
    """Move the policy away from the reference model, so the KL terms are not 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def crafted_inputs(trainer, advantages, ratios, completion_mask=None, num_items_in_batch=None, seed=0):
    """A batch of random tokens whose old log-probs make the current ratio r_{i,t} = `ratios[t]` exactly.

    old_logp = logp - log(r), so exp(logp - old_logp) = r. Advantages `(B,)`, ratios `(T,)`.
    """
    generator = torch.Generator().manual_seed(seed)
    batch_size, length = len(advantages), len(ratios)
    completion_mask = torch.ones(batch_size, length, dtype=torch.long) if completion_mask is None else completion_mask
    inputs = {
        "prompt_ids": torch.randint(3, VOCAB_SIZE, (batch_size, 3), generator=generator),
        "prompt_mask": torch.ones(batch_size, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, VOCAB_SIZE, (batch_size, length), generator=generator),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum().float() if num_items_in_batch is None else num_items_in_batch,
    }
    inputs["old_per_token_logps"] = policy_log_probs(trainer, inputs) - torch.log(ratios)
    return inputs


def prepare_for_loss(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def log_entries(trainer):
    """The per-step log entries of a finished run, without the wall-clock ones."""
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [{key: value for key, value in entry.items() if key not in TIMING_KEYS} for entry in entries]


# ---------------------------------------------------------------------------------------------- 1. drop-in parity


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="trl-defaults"),  # loss_type "dapo", beta 0, scale_rewards "group"
        pytest.param({"loss_type": "grpo", "beta": 0.04, "scale_rewards": "batch"}, id="grpo-kl-batch-scale"),
    ],
)
def test_default_config_trains_exactly_like_trl(tiny_model_path, prompt_dataset, tmp_path, settings):
    trainers = {}
    for name, trainer_class, config_class in [
        ("trl", trl.GRPOTrainer, trl.GRPOConfig),
        ("trl_plus", trl_plus.GRPOTrainer, trl_plus.GRPOConfig),
    ]:
        trainer = build(
            tiny_model_path,
            prompt_dataset,
            tmp_path / name,
            trainer_class=trainer_class,
            config_class=config_class,
            max_steps=3,
            generation_kwargs=EOS_BIAS,
            **OFF_POLICY,
            **settings,
        )
        set_seed(0)
        trainer.train()
        trainers[name] = trainer

    trl_logs, plus_logs = log_entries(trainers["trl"]), log_entries(trainers["trl_plus"])
    assert len(trl_logs) == 3
    generated = []
    for step, (trl_entry, plus_entry) in enumerate(zip(trl_logs, plus_logs, strict=True)):
        # trl_plus logs TRL's keys plus its cumulative generation counts (every trainer's, issue 14).
        assert plus_entry.keys() - trl_entry.keys() == {"generation/completions", "generation/tokens"}
        assert trl_entry.keys() <= plus_entry.keys()
        generated.append(plus_entry["generation/completions"])
        for key, value in trl_entry.items():
            if value is None:
                assert plus_entry[key] is None
            else:
                assert plus_entry[key] == pytest.approx(value, rel=1e-6, abs=1e-9), f"step {step + 1}: {key}"
        assert trl_entry["grad_norm"] > 0
    # One generation batch (16 completions) every steps_per_generation = 4 micro-batches, i.e. every 2 optimizer
    # steps of 2 accumulated micro-batches, counted when generated: 16 at steps 1 and 2, 32 at step 3.
    args = trainers["trl_plus"].args
    micro_batches_before = [step * args.gradient_accumulation_steps for step in range(3)]
    expected = [args.generation_batch_size * (m // args.steps_per_generation + 1) for m in micro_batches_before]
    assert generated == expected == [16, 16, 32]

    initial = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    trl_params = dict(trainers["trl"].model.named_parameters())
    plus_params = dict(trainers["trl_plus"].model.named_parameters())
    assert plus_params.keys() == trl_params.keys()
    for name, param in trl_params.items():
        torch.testing.assert_close(plus_params[name], param, rtol=1e-6, atol=1e-8)
    assert any(not torch.equal(param, initial[name]) for name, param in trl_params.items())


def test_default_config_loss_and_gradients_equal_trl(tiny_model_path, prompt_dataset, tmp_path):
    settings = {**OFF_POLICY, "beta": 0.04, "generation_kwargs": EOS_BIAS}
    trl_trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path / "trl",
        trainer_class=trl.GRPOTrainer,
        config_class=trl.GRPOConfig,
        **settings,
    )
    plus_trainer = build(tiny_model_path, prompt_dataset, tmp_path / "trl_plus", **settings)
    trl_inputs, plus_inputs = micro_batch(trl_trainer), micro_batch(plus_trainer)

    # By default the generation hook changes nothing: the same rows, advantages and log-probs.
    assert plus_inputs.keys() == trl_inputs.keys()
    assert {"old_per_token_logps", "ref_per_token_logps"} <= trl_inputs.keys()
    for key, value in trl_inputs.items():
        torch.testing.assert_close(plus_inputs[key], value, rtol=0, atol=0)
    assert list(plus_trainer._logs["advantages"]) == list(trl_trainer._logs["advantages"])

    # Off-policy ratios and a nonzero KL, so the clipped branches and the KL gradient are exercised.
    inputs = perturb_log_probs(trl_inputs, ["old_per_token_logps", "ref_per_token_logps"])
    trl_loss_value, trl_grads = loss_and_grads(trl_trainer, inputs)
    plus_loss_value, plus_grads = loss_and_grads(plus_trainer, inputs)
    assert trl_loss_value.abs() > 1e-4
    torch.testing.assert_close(plus_loss_value, trl_loss_value, rtol=0, atol=0)
    assert_same_grads(plus_grads, trl_grads, rtol=0, atol=0)
    assert last_metrics(plus_trainer) == last_metrics(trl_trainer)
    assert last_metrics(trl_trainer)["clip_ratio/region_mean"] > 0


# ---------------------------------------------------------------------------------------------- 2. registry = TRL


def registry_path_batch(tiny_model_path, prompt_dataset, tmp_path, loss_type: str, options: dict):
    """A trainer whose explicit `loss_aggregation` (the loss type's own) routes TRL's `loss_type` with `options`
    through the registry's PPO clip, and an off-policy micro-batch of it (old and, with `beta`, reference log-probs
    perturbed)."""
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        loss_type=loss_type,
        loss_aggregation=AGGREGATION_OF[loss_type],
        generation_kwargs=EOS_BIAS,
        **OFF_POLICY,
        **options,
    )
    assert trainer.args.registry_policy_loss == "ppo_clip"
    keys = ["old_per_token_logps"] + (["ref_per_token_logps"] if "beta" in options else [])
    return trainer, perturb_log_probs(micro_batch(trainer), keys)


@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        pytest.param("grpo", {}, id="grpo"),
        pytest.param("dapo", {}, id="dapo"),
        pytest.param("dr_grpo", {}, id="dr_grpo"),
        pytest.param("dapo", {"beta": 0.1}, id="dapo-kl"),
        pytest.param("grpo", {"beta": 0.1, "use_bias_correction_kl": True}, id="grpo-kl-bias-corrected"),
    ],
)
def test_registry_ppo_clip_reproduces_trl_loss(
    tiny_model_path, prompt_dataset, tmp_path, monkeypatch, loss_type, extra
):
    # An explicit loss_aggregation equal to the loss type's own routes the loss through POLICY_LOSSES["ppo_clip"],
    # AGGREGATIONS and KL_ESTIMATORS["k3"]; every number must be TRL's.
    trainer, inputs = registry_path_batch(tiny_model_path, prompt_dataset, tmp_path, loss_type, extra)
    assert inputs["completion_mask"].sum(1).unique().numel() > 1  # sequences of different lengths

    trl_calls = []
    original_compute_loss = trl.GRPOTrainer._compute_loss

    def spy(self, model, batch):
        trl_calls.append(1)
        return original_compute_loss(self, model, batch)

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", spy)
    registry_loss, registry_grads = loss_and_grads(trainer, inputs)
    registry_metrics = last_metrics(trainer)
    assert trl_calls == []  # the registry path computed this loss, not TRL
    reference_loss, reference_grads = loss_and_grads(trainer, inputs, trl_reference=True)
    reference_metrics = last_metrics(trainer)

    assert reference_loss.abs() > 1e-4
    torch.testing.assert_close(registry_loss, reference_loss, rtol=1e-6, atol=1e-7)
    assert_same_grads(registry_grads, reference_grads)
    shared = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    shared += ["kl"] if "beta" in extra else []
    for key in shared:
        assert registry_metrics[key] == pytest.approx(reference_metrics[key], rel=1e-6), key
    assert registry_metrics["clip_ratio/region_mean"] > 0  # the batch exercises the clipped branch

    # In evaluation there is no accumulation: both normalize by the batch alone.
    trainer.model.eval()
    with torch.no_grad():
        registry_eval = trainer.compute_loss(trainer.model, inputs)
        reference_eval = trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(registry_eval, reference_eval, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(registry_eval, registry_loss)  # train mode did scale for accumulation


def test_registry_token_mean_matches_trl_with_few_valid_tokens(tiny_model_path, prompt_dataset, tmp_path):
    # steps_per_generation=4, gradient_accumulation_steps=1: TRL's normalizer is num_items_in_batch * 1 / 4. With
    # only 2 valid tokens in the whole generation batch (e.g. DAPO overlong filtering masked everything else) it is
    # 0.5, so TRL's loss is sum / 0.5; the registry's is sum / max(0.5, 1) = sum / 1, half of TRL's.
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        loss_type="dapo",
        loss_aggregation="token_mean",
        per_device_train_batch_size=4,
        steps_per_generation=4,
    )
    prepare_for_loss(trainer)
    completion_mask = torch.zeros(4, 4, dtype=torch.long)
    completion_mask[0, :2] = 1
    inputs = crafted_inputs(
        trainer,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        ratios=torch.tensor([1.1, 0.9, 1.0, 1.0]),
        completion_mask=completion_mask,
        num_items_in_batch=torch.tensor(2.0),
    )
    registry_loss, _ = loss_and_grads(trainer, inputs)
    reference_loss, _ = loss_and_grads(trainer, inputs, trl_reference=True)
    # Row 0 (A = 1): -min(r, clip(r, 0.8, 1.2)) = [-1.1, -0.9] on its 2 valid tokens, sum -2.0; TRL: -2.0 / 0.5.
    assert reference_loss.item() == pytest.approx(-4.0, rel=1e-5)
    torch.testing.assert_close(registry_loss, reference_loss)


# ---------------------------------------------------------------------------------------------- 3. dual-clip


def test_dual_clip_hand_values_and_difference_from_trl(tiny_model_path, prompt_dataset, tmp_path):
    trainer = build(tiny_model_path, prompt_dataset, tmp_path, loss_type="dapo", dual_clip_c=3.0)
    prepare_for_loss(trainer)
    assert trainer.args.registry_policy_loss == "ppo_clip"
    advantages = torch.tensor([-1.0, -2.0, 1.0, 0.5])
    ratios = torch.tensor([0.5, 1.0, 2.0, 5.0])
    inputs = crafted_inputs(trainer, advantages, ratios)  # 16 valid tokens, num_items_in_batch = 16

    # Per-token PPO-clip loss, eps 0.2 / 0.2: l = -min(r A, clip(r, 0.8, 1.2) A); for A < 0 this is |A| max(r, 0.8).
    #   A = -1  : [0.8, 1, 2, 5]                        -> dual clip min(l, 3 |A| = 3): [0.8, 1, 2, 3]     sum  6.8
    #   A = -2  : [1.6, 2, 4, 10]                       -> dual clip min(l, 3 |A| = 6): [1.6, 2, 4, 6]     sum 13.6
    #   A = +1  : -[0.5, 1, 1.2, 1.2]  (no dual clip for A > 0)                                        sum -3.9
    #   A = +0.5: -[0.25, 0.5, 0.6, 0.6]                                                               sum -1.95
    # token_mean over num_items_in_batch = 16 tokens: trl_plus (6.8 + 13.6 - 3.9 - 1.95) / 16 = 14.55 / 16;
    # TRL has no dual clip: (8.8 + 17.6 - 3.9 - 1.95) / 16 = 20.55 / 16. Two tokens are dual-clipped (r = 5, A < 0).
    loss, grads = loss_and_grads(trainer, inputs)
    metrics = last_metrics(trainer)
    torch.testing.assert_close(loss, torch.tensor(14.55 / 16), rtol=1e-5, atol=1e-6)
    assert metrics["clip_ratio/dual_mean"] == pytest.approx(2 / 16)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 16)  # A < 0 and r = 0.5 < 0.8
    assert metrics["clip_ratio/high_mean"] == pytest.approx(4 / 16)  # A > 0 and r in {2, 5} > 1.2
    assert metrics["clip_ratio/region_mean"] == pytest.approx(6 / 16)

    trl_value, _ = loss_and_grads(trainer, inputs, trl_reference=True)
    torch.testing.assert_close(trl_value, torch.tensor(20.55 / 16), rtol=1e-5, atol=1e-6)

    # The difference is confined to the dual-clipped tokens: there trl_plus's loss is the constant c |A| (no
    # gradient), elsewhere it is TRL's. TRL with those tokens removed from the loss mask (tool_mask, which leaves
    # attention unchanged) plus (3 * 1 + 3 * 2) / 16 gives trl_plus's value and exactly its gradients.
    is_dual_clipped = (advantages.unsqueeze(1) < 0) & (ratios > 3.0)
    assert is_dual_clipped.sum() == 2
    trl_masked_value, trl_masked_grads = loss_and_grads(
        trainer, {**inputs, "tool_mask": (~is_dual_clipped).long()}, trl_reference=True
    )
    torch.testing.assert_close(loss, trl_masked_value + 9.0 / 16, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads, trl_masked_grads)


# ---------------------------------------------------------------------------------------------- 4. estimators


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_estimator_advantages_equal_pure_functions(tiny_model_path, prompt_dataset, tmp_path, estimator):
    digits, length = RecordingReward("digits", digit_reward), RecordingReward("length", length_reward)
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        reward_funcs=[digits, length],
        reward_weights=[1.0, 0.5],
        advantage_estimator=estimator,
        steps_per_generation=2,
        generation_kwargs=EOS_BIAS,
    )
    output = generation_output(trainer)
    group_size = 4
    rewards = torch.tensor(digits.calls[-1]) + 0.5 * torch.tensor(length.calls[-1])  # the weighted sum, (16,)
    assert rewards.shape == (16,)
    assert (rewards.view(-1, group_size).std(1) > 0).sum() >= 2  # most groups carry a signal
    advantages, mask = output["advantages"], output["completion_mask"].float()

    if estimator == "rloo":
        # RLOO (arXiv 2402.14740): b_i = (sum_g r - r_i) / (G - 1), A_i = r_i - b_i.
        grouped = rewards.view(-1, group_size)
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        assert advantages.shape == (16,)
        torch.testing.assert_close(advantages, (grouped - baseline).view(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(advantages, rloo_advantages(rewards, group_size))
        assert list(trainer._logs["advantages"]) == pytest.approx(advantages.tolist())
        return

    # REINFORCE++ (arXiv 2501.03262): the outcome reward (minus the group mean for -baseline) on every token of the
    # completion, z-scored over all valid tokens of the batch (token-weighted mean, population variance).
    pure = {"reinforce_pp": reinforce_pp_advantages, "reinforce_pp_baseline": reinforce_pp_baseline_advantages}
    group_mean = rewards.view(-1, group_size).mean(1).repeat_interleave(group_size)
    raw = rewards if estimator == "reinforce_pp" else rewards - group_mean
    torch.testing.assert_close(pure[estimator](rewards, group_size), raw)
    tokens = raw.repeat_interleave(mask.sum(1).long())  # one value per valid token
    expected = ((raw - tokens.mean()) / tokens.std(unbiased=False)).unsqueeze(1) * mask
    assert advantages.shape == mask.shape
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(advantages, masked_whiten(raw.unsqueeze(1) * mask, mask))
    valid = advantages[mask.bool()]
    assert valid.mean().abs() < 1e-5
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert (advantages[~mask.bool()] == 0).all()
    # The completions log shows each sequence's mean token advantage.
    sequence_means = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert list(trainer._logs["advantages"]) == pytest.approx(sequence_means.tolist(), abs=1e-6)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_kl_in_reward_gives_kl_to_go_advantages(tiny_model_path, prompt_dataset, tmp_path, kl_estimator):
    recorder = RecordingReward("digits", digit_reward)
    beta = 0.1
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        reward_funcs=recorder,
        advantage_estimator="rloo",  # not whitened: the KL-shaped returns are the advantages
        beta=beta,
        kl_in_reward=True,
        kl_estimator=kl_estimator,
        per_device_train_batch_size=16,  # one on-policy generation batch of 4 groups
        generation_kwargs=EOS_BIAS,
    )
    perturb_policy(trainer)
    output = generation_output(trainer)
    assert "old_per_token_logps" not in output  # on-policy: trl_plus scores the sampling policy itself

    mask = output["completion_mask"].float()
    kl = KL_ESTIMATORS.get(kl_estimator)(policy_log_probs(trainer, output), output["ref_per_token_logps"])
    assert (kl * mask).abs().max() > 1e-2  # the policy is not the reference
    outcome = rloo_advantages(torch.tensor(recorder.calls[-1]), 4)
    # REINFORCE++ eq. 3-4 with gamma = 1: token reward 1[t = T_i] A_i - beta KL_t, so
    # A_{i,t} = A_i - beta * sum_{s >= t} m_{i,s} KL_{i,s}, zero on padding.
    length = mask.size(1)
    kl_to_go = torch.stack([(kl * mask)[:, t:].sum(1) for t in range(length)], dim=1)
    expected = (outcome.unsqueeze(1) - beta * kl_to_go) * mask
    assert output["advantages"].shape == mask.shape
    torch.testing.assert_close(output["advantages"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output["advantages"], kl_penalty_to_go(outcome, kl, mask, beta), rtol=1e-4, atol=1e-5)
    expected_kl = ((kl * mask).sum() / mask.sum()).item()
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)


def test_reinforce_pp_preset_whitens_kl_shaped_returns(tiny_model_path, prompt_dataset, tmp_path):
    recorder = RecordingReward("digits", digit_reward)
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        trainer_class=trl_plus.ReinforcePPTrainer,
        config_class=trl_plus.ReinforcePPConfig,
        reward_funcs=recorder,
        steps_per_generation=2,
        generation_kwargs=EOS_BIAS,
    )
    assert (trainer.beta, trainer.args.kl_estimator, trainer.args.kl_in_reward) == (0.01, "k1", True)
    perturb_policy(trainer)
    output = generation_output(trainer)
    assert "old_per_token_logps" in output  # off-policy layout: the KL uses TRL's sampling log-probs
    torch.testing.assert_close(output["old_per_token_logps"], policy_log_probs(trainer, output), rtol=1e-4, atol=1e-5)
    mask = output["completion_mask"].float()
    kl = policy_log_probs(trainer, output) - output["ref_per_token_logps"]  # k1
    returns = kl_penalty_to_go(torch.tensor(recorder.calls[-1]), kl, mask, 0.01)
    expected = masked_whiten(returns, mask)
    torch.testing.assert_close(output["advantages"], expected, rtol=1e-4, atol=1e-4)
    valid = output["advantages"][mask.bool()]
    assert valid.mean().abs() < 1e-5 and valid.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    # Within a completion the advantage now varies per token (the KL still to come differs).
    longest = mask.sum(1).argmax()
    assert mask[longest].sum() > 1
    assert output["advantages"][longest][mask[longest].bool()].unique().numel() > 1


# ---------------------------------------------------------------------------------------------- 5. presets train


def _in_unit_interval(values):
    return all(0.0 <= value <= 1.0 for value in values)


PRESET_RUNS = {
    # DAPO filters truncated completions out of the loss; the eos bias makes most completions end.
    "dapo": (
        trl_plus.DAPOTrainer,
        trl_plus.DAPOConfig,
        {"generation_kwargs": EOS_BIAS},
        {
            "clip_ratio/high_mean": _in_unit_interval,
            "entropy": lambda values: all(value > 0 for value in values),
            "completions/clipped_ratio": lambda values: all(value < 1 for value in values),
        },
    ),
    "gspo": (
        trl_plus.GSPOTrainer,
        trl_plus.GSPOConfig,
        {},
        {"clip_ratio/region_mean": _in_unit_interval, "entropy": lambda values: all(v > 0 for v in values)},
    ),
    # steps_per_generation=2 > gradient_accumulation_steps=1: every second update is off-policy.
    "aspo": (
        trl_plus.ASPOTrainer,
        trl_plus.ASPOConfig,
        {"steps_per_generation": 2, "max_steps": 3},
        {
            "clip_ratio/soft_dual_mean": _in_unit_interval,
            "clip_ratio/high_mean": _in_unit_interval,
            "entropy": lambda values: all(value > 0 for value in values),
        },
    ),
    "rloo": (trl_plus.RLOOTrainer, trl_plus.RLOOConfig, {}, {"clip_ratio/region_mean": _in_unit_interval}),
    # KL in the reward is logged at generation; after one update the policy differs from the reference.
    "reinforce_pp": (
        trl_plus.ReinforcePPTrainer,
        trl_plus.ReinforcePPConfig,
        {},
        {"kl": lambda values: values[0] == 0 and values[-1] != 0, "clip_ratio/high_mean": _in_unit_interval},
    ),
    # Covariance bounds wide enough that some tokens are eligible, so one token per batch is detached.
    "clip_cov": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"loss_type": "clip_cov", "clip_cov_lb": 0.0, "clip_cov_ub": 1e3},
        {"clip_cov/detached_mean": lambda values: all(0 < value < 0.2 for value in values)},
    ),
    "kl_cov": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"loss_type": "kl_cov", "num_iterations": 2},
        {"kl_cov/penalized_mean": lambda values: all(0 < value < 0.2 for value in values)},
    ),
    "dual_clip": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"dual_clip_c": 3.0, "num_iterations": 2},
        {"clip_ratio/dual_mean": _in_unit_interval, "clip_ratio/low_mean": _in_unit_interval},
    ),
    # The policy starts as the reference (KL 0); after one update k1 is nonzero and k2 = (logp - ref)^2 / 2 > 0.
    "kl_k1": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"beta": 0.1, "kl_estimator": "k1"},
        {"kl": lambda values: values[0] == 0 and values[-1] != 0},
    ),
    "kl_k2": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"beta": 0.1, "kl_estimator": "k2"},
        {"kl": lambda values: values[0] == 0 and values[-1] > 0},
    ),
}


@pytest.mark.parametrize(
    ("trainer_class", "config_class", "overrides", "metric_checks"), PRESET_RUNS.values(), ids=PRESET_RUNS.keys()
)
def test_preset_trains(
    tiny_model_path, prompt_dataset, tmp_path, trainer_class, config_class, overrides, metric_checks
):
    trainer = build(
        tiny_model_path, prompt_dataset, tmp_path, trainer_class=trainer_class, config_class=config_class, **overrides
    )
    assert type(trainer.args) is config_class
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()

    entries = log_entries(trainer)
    assert len(entries) == trainer.args.max_steps
    for entry in entries:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"])
        assert entry["entropy"] > 0
    assert any(entry["grad_norm"] > 0 for entry in entries)
    for key, check in metric_checks.items():
        values = [entry[key] for entry in entries]
        assert all(value is not None and math.isfinite(value) for value in values), key
        assert check(values), f"{key}: {values}"

    change = 0.0
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name
        change += (param.detach() - initial[name]).abs().sum().item()
    assert change > 0


def test_dapo_preset_masks_truncated_completions(tiny_model_path, prompt_dataset, tmp_path):
    # Overlong filtering is on by default: with no way to end a completion, every row is out of the loss.
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        trainer_class=trl_plus.DAPOTrainer,
        config_class=trl_plus.DAPOConfig,
        generation_kwargs=NO_EOS,
    )
    assert trainer.args.mask_truncated_completions is True
    output = generation_output(trainer)
    assert output["completion_ids"].shape == (8, 8) and output["completion_mask"].sum() == 0


# ---------------------------------------------------------------------------------------------- preset construction

PRESET_TRAINERS = {
    trl_plus.GRPOTrainer: (trl_plus.GRPOConfig, {"loss_type": "dapo", "beta": 0.0, "advantage_estimator": "grpo"}),
    trl_plus.DAPOTrainer: (
        trl_plus.DAPOConfig,
        {
            "epsilon": 0.2,
            "epsilon_high": 0.28,
            "loss_type": "dapo",
            "mask_truncated_completions": True,
            "dynamic_sampling": True,
        },
    ),
    trl_plus.GSPOTrainer: (
        trl_plus.GSPOConfig,
        {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    ),
    trl_plus.ASPOTrainer: (trl_plus.ASPOConfig, {"loss_type": "aspo", "epsilon": 0.2, "epsilon_high": 0.2}),
    trl_plus.RLOOTrainer: (trl_plus.RLOOConfig, {"advantage_estimator": "rloo", "scale_rewards": "none"}),
    trl_plus.ReMaxTrainer: (trl_plus.ReMaxConfig, {"advantage_estimator": "remax", "scale_rewards": "none"}),
    trl_plus.ReinforcePPTrainer: (
        trl_plus.ReinforcePPConfig,
        {"advantage_estimator": "reinforce_pp", "beta": 0.01, "kl_in_reward": True, "kl_estimator": "k1"},
    ),
}


@pytest.mark.parametrize("trainer_class", PRESET_TRAINERS, ids=lambda cls: cls.__name__)
def test_preset_trainer_without_args_uses_its_config(
    tiny_model_path, prompt_dataset, tmp_path, monkeypatch, trainer_class
):
    config_class, expected = PRESET_TRAINERS[trainer_class]
    if not torch.cuda.is_available():
        # The default config is GPU-shaped (bf16=True), which TrainingArguments rejects on a CPU-only machine.
        monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)  # args=None puts output_dir in the working directory
    trainer = trainer_class(tiny_model_path, reward_funcs=digit_reward, train_dataset=prompt_dataset)
    assert type(trainer.args) is config_class
    assert Path(trainer.args.output_dir).name == f"{Path(tiny_model_path).name}-{trainer_class._name}"
    for name, value in expected.items():
        assert getattr(trainer.args, name) == value, name
    # TRL's __init__ copied the preset's values onto the trainer.
    assert (trainer.epsilon_low, trainer.epsilon_high) == (
        trainer.args.epsilon,
        trainer.args.epsilon_high if trainer.args.epsilon_high is not None else trainer.args.epsilon,
    )
    assert trainer.beta == trainer.args.beta
    assert (trainer.ref_model is not None) == (trainer.args.beta > 0)


@pytest.mark.parametrize("trainer_class", PRESET_TRAINERS, ids=lambda cls: cls.__name__)
def test_trl_config_is_rejected(tiny_model_path, prompt_dataset, tmp_path, trainer_class):
    config_class, _ = PRESET_TRAINERS[trainer_class]
    args = make_config(trl.GRPOConfig, tmp_path)
    with pytest.raises(TypeError, match=rf"trl_plus\.{config_class.__name__}.*trl\..*GRPOConfig"):
        trainer_class(tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset)


def test_preset_trainer_accepts_any_trl_plus_config(tiny_model_path, prompt_dataset, tmp_path):
    # A preset only supplies defaults: an explicit trl_plus config (even another preset's) is used as given.
    args = make_config(trl_plus.RLOOConfig, tmp_path)
    trainer = trl_plus.DAPOTrainer(tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset)
    assert trainer.args is args and trainer.args.advantage_estimator == "rloo"


# ---------------------------------------------------------------------------------------------- 6. no NaN


def _registry_loss_configs():
    """One config per registered policy loss; PPO-clip once per aggregation and once with dual-clip."""
    configs = []
    for name in POLICY_LOSSES.names():
        if name == "ppo_clip":
            for aggregation in AGGREGATIONS.names():
                configs.append(pytest.param({"loss_aggregation": aggregation}, id=f"ppo_clip-{aggregation}"))
            configs.append(pytest.param({"dual_clip_c": 3.0}, id="ppo_clip-dual_clip"))
        else:
            configs.append(pytest.param({"loss_type": name}, id=name))
    return configs


@pytest.mark.parametrize("masked", [True, False], ids=["all-masked", "zero-advantage"])
@pytest.mark.parametrize("overrides", _registry_loss_configs())
def test_registry_losses_stay_finite_on_degenerate_batches(
    tiny_model_path, prompt_dataset, tmp_path, overrides, masked
):
    # Constant rewards give every advantage 0; overlong filtering can leave no valid token at all (completion_mask
    # all 0, num_items_in_batch 0). Off-policy ratios and a KL term (k2 in the loss) stay in play.
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        beta=0.1,
        kl_estimator="k2",
        num_iterations=2,
        **{"loss_type": "grpo", **overrides},
    )
    assert trainer.args.registry_policy_loss is not None
    prepare_for_loss(trainer)
    completion_mask = torch.zeros(4, 6, dtype=torch.long) if masked else torch.ones(4, 6, dtype=torch.long)
    ratios = torch.tensor([1e-4, 0.5, 1.0, 1.5, 3.0, 1e4])  # from far below to far above every clip bound
    inputs = crafted_inputs(trainer, torch.zeros(4), ratios, completion_mask=completion_mask)
    inputs = perturb_log_probs(
        {**inputs, "ref_per_token_logps": inputs["old_per_token_logps"]}, ["ref_per_token_logps"]
    )

    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert {key for key, value in last_metrics(trainer).items() if not math.isfinite(value)} == set()
    if masked:
        assert loss.item() == 0.0
        assert all((grad == 0).all() for grad in grads.values())
    else:
        assert loss.item() > 0  # A = 0 leaves the KL term (and KL-Cov's penalty): beta * k2 > 0


@pytest.mark.parametrize("masked", [True, False], ids=["all-masked", "constant-reward"])
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"advantage_estimator": "rloo"}, id="rloo"),
        pytest.param({"advantage_estimator": "reinforce_pp"}, id="reinforce_pp"),
        pytest.param({"advantage_estimator": "reinforce_pp_baseline"}, id="reinforce_pp_baseline"),
        pytest.param(
            {"advantage_estimator": "reinforce_pp", "beta": 0.01, "kl_in_reward": True, "kl_estimator": "k1"},
            id="reinforce_pp-kl_in_reward",
        ),
    ],
)
def test_estimators_stay_finite_on_degenerate_batches(tiny_model_path, prompt_dataset, tmp_path, overrides, masked):
    trainer = build(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        reward_funcs=constant_reward,  # every group has zero reward variance
        mask_truncated_completions=masked,
        generation_kwargs=NO_EOS if masked else EOS_BIAS,
        steps_per_generation=2,
        **overrides,
    )
    if "beta" in overrides:
        perturb_policy(trainer)
    inputs = micro_batch(trainer)
    mask, advantages = inputs["completion_mask"], inputs["advantages"]
    if masked:
        assert mask.sum() == 0 and inputs["num_items_in_batch"] == 0
    assert torch.isfinite(advantages).all()
    if masked or "beta" not in overrides:
        assert advantages.abs().max() < 1e-6  # no reward signal, no KL signal on valid tokens: advantage 0

    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    # TRL's own per-sequence extremes are NaN without a valid token (its logs then show None); every other metric,
    # trl_plus's included, must stay finite.
    trl_nan_metrics = {"clip_ratio/low_min", "clip_ratio/high_max"} if masked else set()
    non_finite = {key for key, value in last_metrics(trainer).items() if not math.isfinite(value)}
    assert non_finite <= trl_nan_metrics


# ---------------------------------------------------------------------------------------------- 7. bad input

# Not a model: these checks must answer before the model loads (a load would raise OSError instead).
NO_MODEL = "no-such-model"


@pytest.mark.parametrize(
    ("dataset_argument", "name"),
    [
        ("train_dataset", "train_dataset"),
        ("eval_dataset", "eval_dataset"),
        ("eval_dataset_dict", "eval_dataset['held_out']"),
    ],
)
def test_a_dataset_without_a_prompt_column_raises_before_the_model_loads(
    prompt_dataset, tmp_path, dataset_argument, name
):
    questions = Dataset.from_dict({"question": ["1+1=", "2+2="] * 8, "answer": ["2", "4"] * 8})
    datasets = {
        "train_dataset": {"train_dataset": questions},
        "eval_dataset": {"train_dataset": prompt_dataset, "eval_dataset": questions},
        "eval_dataset_dict": {"train_dataset": prompt_dataset, "eval_dataset": {"held_out": questions}},
    }[dataset_argument]
    args = make_config(trl_plus.GRPOConfig, tmp_path)
    with pytest.raises(ValueError) as excinfo:
        trl_plus.GRPOTrainer(NO_MODEL, reward_funcs=digit_reward, args=args, **datasets)
    assert str(excinfo.value) == (
        f"`{name}` has no `prompt` column, which the trainer generates from; its columns are ['question', 'answer']. "
        "Rename the prompt column (e.g. `dataset.rename_column('question', 'prompt')`)."
    )


def test_an_environment_may_supply_the_prompts(tmp_path):
    args = make_config(trl_plus.GRPOConfig, tmp_path)
    dataset = Dataset.from_dict({"environment": ["maze"] * 4})
    trl_plus.GRPOTrainer._check_datasets(args, dataset, None, has_environment=True)  # no `prompt` column needed


@pytest.mark.parametrize("num_rows", [0, 3])
def test_a_dataset_smaller_than_one_generation_batch_raises_before_the_model_loads(tmp_path, num_rows):
    # 16 rows per generation batch of 4 completions per prompt: one batch takes 4 prompts, and TRL's RepeatSampler
    # drops a partial batch, so 3 prompts give no step at all.
    args = make_config(trl_plus.GRPOConfig, tmp_path, per_device_train_batch_size=16)
    dataset = Dataset.from_dict({"prompt": [f"{a}+1=" for a in range(num_rows)]})
    with pytest.raises(ValueError) as excinfo:
        trl_plus.GRPOTrainer(NO_MODEL, reward_funcs=digit_reward, args=args, train_dataset=dataset)
    assert str(excinfo.value) == (
        f"`train_dataset` has {num_rows} rows, fewer than the 4 prompts of one generation batch "
        "(generation_batch_size 16 // num_generations 4, over all processes): training would run 0 steps. Give more "
        "prompts, or lower per_device_train_batch_size, steps_per_generation or the number of processes."
    )


def test_a_dataset_of_one_generation_batch_trains_one_batch_per_epoch(tiny_model_path, tmp_path):
    args = make_config(trl_plus.GRPOConfig, tmp_path, per_device_train_batch_size=16)
    dataset = Dataset.from_dict({"prompt": [f"{a}+1=" for a in range(4)]})
    trainer = trl_plus.GRPOTrainer(tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=dataset)
    assert len(trainer.get_train_dataloader()) == 1


@pytest.mark.parametrize(
    "penalty",
    [overlong_penalty(8, 4), get_soft_overlong_punishment(8, 2)],
    ids=["trl_plus", "trl"],
)
def test_overlong_penalty_given_twice_raises(prompt_dataset, tmp_path, penalty):
    args = make_config(trl_plus.GRPOConfig, tmp_path, overlong_buffer_len=4)
    with pytest.raises(ValueError) as excinfo:
        trl_plus.GRPOTrainer(NO_MODEL, reward_funcs=[digit_reward, penalty], args=args, train_dataset=prompt_dataset)
    assert str(excinfo.value) == (
        "`overlong_buffer_len` is 4, which adds DAPO's overlong penalty to the rewards, and `reward_funcs` already "
        f"holds one ({type(penalty).__name__}): it would be applied twice. Unset overlong_buffer_len, or remove the "
        "penalty from reward_funcs."
    )


# ---------------------------------------------------------------------------------------------- 7. TRL's loss options


def _entropy_controller_state(trainer):
    return trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats


def _set_entropy_controller_state(trainer, state):
    trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats = state


# Each of TRL 1.16's loss options, on a batch that exercises it: 50% top-entropy tokens; the off-policy mask with
# threshold -0.2 (a negative-advantage sequence is dropped when its mean log(pi_old / pi) > -0.2: on this batch the
# means are -0.28 and -0.12 for the two negative rows, so one is dropped and one kept); delta 1.3 (noise e^{+-0.6}
# puts ratios above it); GSPO's sequence ratio (with the KL bias correction, whose weight is then the sequence ratio
# too); a static and an adaptive entropy bonus.
TRL_LOSS_OPTIONS = [
    pytest.param("dapo", {"top_entropy_quantile": 0.5}, id="top_entropy_quantile"),
    pytest.param("grpo", {"off_policy_mask_threshold": -0.2}, id="off_policy_mask_threshold"),
    pytest.param("dapo", {"delta": 1.3}, id="delta"),
    pytest.param("grpo", {"importance_sampling_level": "sequence"}, id="sequence"),
    pytest.param(
        "dapo",
        {"importance_sampling_level": "sequence", "beta": 0.1, "use_bias_correction_kl": True},
        id="sequence-kl-bias-corrected",
    ),
    pytest.param("dr_grpo", {"entropy_coef": 0.05}, id="entropy_coef"),
    pytest.param(
        "dapo",
        {"use_adaptive_entropy": True, "entropy_coef": 0.05, "entropy_target": 10.0, "top_entropy_quantile": 0.5},
        id="adaptive-entropy-top-quantile",
    ),
]


@pytest.mark.parametrize(("loss_type", "option"), TRL_LOSS_OPTIONS)
def test_registry_path_keeps_trl_meaning_of_each_loss_option(
    tiny_model_path, prompt_dataset, tmp_path, monkeypatch, loss_type, option
):
    # The registry path (POLICY_LOSSES["ppo_clip"] + AGGREGATIONS) with TRL's option on must give TRL's own loss,
    # gradients and metrics with that option on: the composition keeps TRL's meaning of every option.
    trainer, inputs = registry_path_batch(tiny_model_path, prompt_dataset, tmp_path, loss_type, option)
    inputs["advantages"] = torch.tensor([-1.0, -0.5, 1.5, 0.5])  # both signs twice (the off-policy mask reads A < 0)
    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", lambda *a: pytest.fail("TRL's loss was called"))
    # Two steps, so the adaptive controller's first update (gate closed at step 1, then open) is part of the check.
    start = _entropy_controller_state(trainer)
    registry = [loss_and_grads(trainer, inputs) for _ in range(2)]
    registry_metrics, registry_state = last_metrics(trainer), _entropy_controller_state(trainer)
    monkeypatch.undo()
    _set_entropy_controller_state(trainer, start)
    reference = [loss_and_grads(trainer, inputs, trl_reference=True) for _ in range(2)]
    reference_metrics, reference_state = last_metrics(trainer), _entropy_controller_state(trainer)

    for (registry_loss, registry_grads), (reference_loss, reference_grads) in zip(registry, reference, strict=True):
        assert reference_loss.abs() > 1e-4
        torch.testing.assert_close(registry_loss, reference_loss, rtol=1e-6, atol=1e-7)
        assert_same_grads(registry_grads, reference_grads)
    assert registry_state[:2] == pytest.approx(reference_state[:2], rel=1e-6)
    shared = {"entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"}
    shared |= {"policy_loss", "entropy_coef"}
    for key in shared & reference_metrics.keys():
        assert registry_metrics[key] == pytest.approx(reference_metrics[key], rel=1e-6), key

    # The option does act on this batch: with it off, TRL's loss differs.
    for name, value in {
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "importance_sampling_level": "token",
        "_entropy_bonus_enabled": False,
    }.items():
        monkeypatch.setattr(trainer, name, value)
    monkeypatch.setattr(trainer.args, "delta", None)
    _set_entropy_controller_state(trainer, registry_state)
    without_option = trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    assert not torch.allclose(without_option, reference[-1][0], rtol=1e-4)


def test_gppo_and_entropy_shaped_advantages_in_the_trainer(tiny_model_path, prompt_dataset, tmp_path, monkeypatch):
    # loss_type="gppo" with entropy_advantage_alpha: the trainer's loss and metrics are token_mean of
    # POLICY_LOSSES["gppo"] on A' = entropy_shaped_advantages(A, H) with H the policy's token entropies (detached).
    trainer = build(
        tiny_model_path, prompt_dataset, tmp_path, loss_type="gppo", entropy_advantage_alpha=0.4, num_iterations=2
    )
    prepare_for_loss(trainer)
    advantages = torch.tensor([-1.0, -0.5, 1.0, 0.5])
    ratios = torch.tensor([0.5, 1.0, 2.0, 5.0])  # clipped: A < 0 at r = 0.5; A > 0 at r = 2, 5
    inputs = crafted_inputs(trainer, advantages, ratios)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        log_probs, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, 4, compute_entropy=True
        )
    mask = inputs["completion_mask"].float()
    shaped = trl_plus.algos.entropy_shaped_advantages(advantages[:, None], entropies, mask, alpha=0.4, kappa=2.0)
    assert (shaped != advantages[:, None]).any()  # the tiny model's entropies (~ln 48 = 3.9) do shape A
    expected, _ = POLICY_LOSSES.get("gppo")(
        log_probs, inputs["old_per_token_logps"], shaped, mask, eps_low=0.2, eps_high=0.2
    )
    loss, grads = loss_and_grads(trainer, inputs)
    metrics = last_metrics(trainer)
    torch.testing.assert_close(loss, (expected * mask).sum() / 16, rtol=1e-5, atol=1e-6)
    assert metrics["entropy_advantage/bonus_mean"] == pytest.approx(
        ((shaped - advantages[:, None]) * mask).sum().item() / 16, rel=1e-5
    )
    # Clipped: r = 0.5 in the two A < 0 rows, r = 2 and 5 in the two A > 0 rows (the bonus keeps every sign).
    assert metrics["clip_ratio/region_mean"] == pytest.approx(6 / 16)
    # TRL's PPO-clip ("dapo") on the shaped advantages: the same loss value, other gradients (GPPO keeps the clipped
    # tokens' gradient, PPO drops it).
    monkeypatch.setattr(trainer, "loss_type", "dapo")
    trl_loss, trl_grads = loss_and_grads(trainer, {**inputs, "advantages": shaped}, trl_reference=True)
    torch.testing.assert_close(trl_loss, loss)  # GPPO's value is PPO-clip's value
    assert any(not torch.allclose(grads[name], trl_grads[name]) for name in grads)
