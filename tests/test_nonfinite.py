"""Non-finite and huge rewards, non-finite steps and malformed reward output never reach the weights (issue 9).

- A +-inf reward is treated exactly like a None (a completion the function did not score): a run with inf trains to
  the same weights, bit for bit, as a run where the function returned None, for every estimator and for PPO.
- Rewards near 1e30 keep their meaning: whitening and the group std are scale-invariant, so a run on rewards * 1e28
  equals the run on the rewards themselves (float32 squares of 1e28 overflow; the statistics fall back to float64).
- A step whose loss or gradient norm is non-finite is skipped (weights and optimizer state unchanged), counted, and
  after `max_consecutive_nonfinite_steps` in a row training stops; `save_model` refuses non-finite weights.
- A reward function that returns something other than one number or None per completion is named in the error.
"""

import json
import logging

import pytest
import torch
from conftest import make_config
from peft import LoraConfig
from transformers import TrainerCallback

import trl_plus
from trl_plus.algos import masked_whiten
from trl_plus.algos.advantages import grpo_advantages
from trl_plus.algos.value import explained_variance
from trl_plus.trainer.checkpoints import MissingCheckpointFileError
from trl_plus.trainer.grpo import NONFINITE_STEPS_FILE
from trl_plus.trainer.nonfinite import NonFiniteStepGuard, NonFiniteTrainingError

INF = float("inf")

# name: (trainer class, config class, config overrides, LoRA policy)
CASES = {
    "grpo": (trl_plus.GRPOTrainer, trl_plus.GRPOConfig, {}, False),
    "rloo": (trl_plus.RLOOTrainer, trl_plus.RLOOConfig, {}, False),
    "reinforce_pp": (trl_plus.ReinforcePPTrainer, trl_plus.ReinforcePPConfig, {}, False),
    "reinforce_pp_baseline": (
        trl_plus.GRPOTrainer,
        trl_plus.GRPOConfig,
        {"advantage_estimator": "reinforce_pp_baseline"},
        False,
    ),
    "remax": (trl_plus.ReMaxTrainer, trl_plus.ReMaxConfig, {}, False),
    "ppo": (trl_plus.PPOTrainer, trl_plus.PPOConfig, {}, True),
}


class DigitReward:
    """1.0 per digit, the first completion of every call replaced by `first` (inf, None, ...), times `scale`."""

    __name__ = "digits"

    def __init__(self, first="keep", scale=1.0):
        self.first, self.scale = first, scale

    def __call__(self, completions, **kwargs):
        rewards = [self.scale * sum(ch.isdigit() for ch in completion) for completion in completions]
        if self.first != "keep":
            rewards[0] = self.first
        return rewards


class LoggedMetrics(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def values(self, key):
        return [entry[key] for entry in self.logs if key in entry]


def build(case, model_path, dataset, output_dir, reward, trainer_class=None, **overrides):
    default_class, config_class, case_overrides, use_lora = CASES[case]
    args = make_config(config_class, output_dir, **{**case_overrides, **overrides})
    peft_config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8) if use_lora else None
    trainer = (trainer_class or default_class)(
        model_path, reward_funcs=reward, args=args, train_dataset=dataset, peft_config=peft_config
    )
    metrics = LoggedMetrics()
    trainer.add_callback(metrics)
    return trainer, metrics


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


# ---------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("case", CASES)
def test_infinite_reward_trains_exactly_like_an_unscored_completion(
    case, tiny_model_path, prompt_dataset, tmp_path, caplog
):
    unscored, _ = build(case, tiny_model_path, prompt_dataset, tmp_path / "none", DigitReward(first=None))
    unscored.train()
    bad = -INF if case == "rloo" else INF
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        infinite, metrics = build(case, tiny_model_path, prompt_dataset, tmp_path / "inf", DigitReward(first=bad))
        infinite.train()

    expected = parameters(unscored)
    for name, value in parameters(infinite).items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # One inf per generation round (2 steps, one round each), reported once, counted every time.
    assert metrics.values("rewards/digits/non_finite") == [1, 1]
    warnings = [record.getMessage() for record in caplog.records if "non-finite reward" in record.getMessage()]
    assert len(warnings) == 1
    assert "Reward function 'digits' gave a non-finite reward (inf) to 1 of 8 completions at step 0" in warnings[0]


@pytest.mark.parametrize("case", ["grpo", "reinforce_pp_baseline"])
def test_huge_rewards_train_like_the_same_rewards_at_unit_scale(case, tiny_model_path, prompt_dataset, tmp_path):
    # Group z-scores and global whitening do not depend on the reward scale; with beta = 0 (no KL term, which would
    # not scale) a run on rewards * 1e28 must equal the run on rewards * 1e4 (where GRPO's eps = 1e-4 in std + eps is
    # as negligible as at 1e28). Before the float64 fallback, 1e28 squared overflowed float32: GRPO's group std became
    # inf (every advantage 0) and whitening gave NaN weights.
    small, _ = build(case, tiny_model_path, prompt_dataset, tmp_path / "small", DigitReward(scale=1e4))
    small.train()
    huge, _ = build(case, tiny_model_path, prompt_dataset, tmp_path / "huge", DigitReward(scale=1e28))
    huge.train()
    initial = build(case, tiny_model_path, prompt_dataset, tmp_path / "initial", DigitReward())[0]
    expected, start = parameters(small), parameters(initial)
    assert max((expected[name] - start[name]).abs().max() for name in expected) > 5e-3  # learning moved the weights
    # Advantages agree to float32 rounding (~1e-7); Adam's first steps (update ~ lr * g / |g|) amplify that on the
    # weights whose gradient nearly cancels, to a few 1e-5 here, far below the 1e-2 moves of learning.
    for name, value in parameters(huge).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=2e-4, msg=name)


def test_reinforce_pp_with_a_huge_reward_keeps_finite_weights(tiny_model_path, prompt_dataset, tmp_path):
    # KL in the reward, one reward of 1e30 per round: padding held inf squared deviations times 0 = NaN.
    trainer, metrics = build("reinforce_pp", tiny_model_path, prompt_dataset, tmp_path, DigitReward(first=1e30))
    start = parameters(trainer)
    trainer.train()
    final = parameters(trainer)
    assert all(torch.isfinite(value).all() for value in final.values())
    assert any(not torch.equal(final[name], start[name]) for name in final)
    assert metrics.values("nonfinite/skipped_steps") == []  # logged from the first skipped step on


def test_ppo_with_a_huge_reward_never_updates_on_an_overflowed_value_loss(tiny_model_path, prompt_dataset, tmp_path):
    # Value targets of 1e30: (V - R)^2 is inf in float32, so each step is skipped; the statistics stay finite.
    trainer, metrics = build("ppo", tiny_model_path, prompt_dataset, tmp_path, DigitReward(first=1e30))
    start = parameters(trainer)
    trainer.train()
    for name, value in parameters(trainer).items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
    assert metrics.values("nonfinite/skipped_steps") == [1, 2]
    explained = metrics.values("value/explained_variance")
    assert len(explained) == 2 and all(abs(value) < 1e3 for value in explained)


def test_overflow_safe_statistics_golden_values():
    # masked_whiten: mean 2e30, population std 1e30 -> [-1, 1]; padding (here inf squared would be) stays 0.
    whitened = masked_whiten(torch.tensor([[1e30, 3e30, 0.0]]), torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 1.0, 0.0]]))
    # grpo_advantages, group [1e30, 0]: mean 5e29, Bessel std 7.0711e29 >> eps -> +-1/sqrt(2).
    advantages = grpo_advantages(torch.tensor([1e30, 0.0, 3.0, 3.0]), 2)
    torch.testing.assert_close(advantages, torch.tensor([0.5**0.5, -(0.5**0.5), 0.0, 0.0]))
    # explained_variance: the doctest's case scaled by 1e30 (scale-invariant): 1 - Var([-.5, 0, .5]) / Var([1, 2, 3]).
    values, returns = torch.tensor([[1.5e30, 2.0e30, 2.5e30]]), torch.tensor([[1.0e30, 2.0e30, 3.0e30]])
    torch.testing.assert_close(explained_variance(values, returns, torch.ones(1, 3)), torch.tensor(0.75))


@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30])
def test_whitening_is_scale_invariant_past_float32_squares(scale):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.3
    torch.testing.assert_close(masked_whiten(values * scale, mask), masked_whiten(values, mask), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- reward output


def string_reward(completions, **kwargs):
    return ["1.0"] * len(completions)


def scalar_reward(completions, **kwargs):
    return 1.0


def short_reward(completions, **kwargs):
    return [1.0]


async def async_string_reward(completions, **kwargs):
    return ["1.0"] * len(completions)


@pytest.mark.parametrize(
    ("reward", "error", "message"),
    [
        (string_reward, TypeError, r"Reward function 'string_reward' returned a str \('1.0'\) for completion 0"),
        (scalar_reward, TypeError, r"Reward function 'scalar_reward' returned a float; .* \(8 here\)"),
        (short_reward, ValueError, "Reward function 'short_reward' returned 1 rewards for 8 completions"),
        (async_string_reward, TypeError, "Reward function 'async_string_reward' returned a str"),
    ],
)
def test_malformed_reward_output_names_the_function(reward, error, message, tiny_model_path, prompt_dataset, tmp_path):
    trainer, _ = build("grpo", tiny_model_path, prompt_dataset, tmp_path, [reward])
    with pytest.raises(error, match=message):
        trainer.train()


# ---------------------------------------------------------------------------------------------- the step guard


class PoisonedTrainer(trl_plus.GRPOTrainer):
    """Multiplies the loss by NaN on the optimizer steps (0-based global_step) in `poisoned_steps`, or sets one
    gradient to inf after the backward on those in `inf_grad_steps`."""

    poisoned_steps: tuple = ()
    inf_grad_steps: tuple = ()

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss * float("nan") if self.state.global_step in self.poisoned_steps else loss

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.state.global_step in self.inf_grad_steps:
            next(param for param in model.parameters() if param.grad is not None).grad.view(-1)[0] = INF
        return loss


class Snapshots(TrainerCallback):
    """Weights and Adam state after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.optimizer_states = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append(parameters(self.trainer))
        optimizer_state = self.trainer.optimizer.state_dict()["state"]
        self.optimizer_states.append(
            {key: {name: value.clone() for name, value in entry.items()} for key, entry in optimizer_state.items()}
        )


def test_a_non_finite_step_changes_neither_weights_nor_optimizer_state(tiny_model_path, prompt_dataset, tmp_path):
    trainer, metrics = build(
        "grpo", tiny_model_path, prompt_dataset, tmp_path, DigitReward(), trainer_class=PoisonedTrainer, max_steps=3
    )
    trainer.poisoned_steps = (1,)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()

    before, skipped, after = snapshots.weights
    for name in before:
        torch.testing.assert_close(skipped[name], before[name], rtol=0, atol=0)
    assert any(not torch.equal(after[name], skipped[name]) for name in after)  # training goes on after it
    state_before, state_skipped = snapshots.optimizer_states[:2]
    assert state_skipped.keys() == state_before.keys()
    for key, entry in state_before.items():
        for name, value in entry.items():
            torch.testing.assert_close(state_skipped[key][name], value, rtol=0, atol=0)
    assert metrics.values("nonfinite/skipped_steps") == [1, 1]  # from the skipped step on


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        ("poisoned_steps", r"Optimizer step 2: the loss was nan\. That makes 2 optimizer steps in a row"),
        ("inf_grad_steps", r"Optimizer step 2: the gradient norm was inf\. That makes 2 optimizer steps in a row"),
    ],
)
def test_consecutive_non_finite_steps_stop_training(poison, message, tiny_model_path, prompt_dataset, tmp_path):
    trainer, _ = build(
        "grpo",
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        DigitReward(),
        trainer_class=PoisonedTrainer,
        max_steps=4,
        max_consecutive_nonfinite_steps=2,
    )
    setattr(trainer, poison, (0, 1, 2, 3))
    start = parameters(trainer)
    with pytest.raises(NonFiniteTrainingError, match=message):
        trainer.train()
    assert trainer.state.global_step == 1  # the error came at the second step
    for name, value in parameters(trainer).items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)


def test_save_model_refuses_non_finite_weights(tiny_model_path, prompt_dataset, tmp_path):
    trainer, _ = build("grpo", tiny_model_path, prompt_dataset, tmp_path, DigitReward())
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[3] = float("nan")
    # The tiny model ties lm_head to the embedding, so both names hold the NaN.
    expected = r"Refusing to save non-finite weights to .*saved: 2 tensors hold NaN or inf \(first: \['model.embed"
    with pytest.raises(NonFiniteTrainingError, match=expected):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_guard_counts_and_resets():
    guard = NonFiniteStepGuard(max_consecutive=3)
    assert [guard.should_skip_step(norm, step) for step, norm in enumerate([1.0, INF, float("nan"), 2.0], 1)] == [
        False,
        True,
        True,
        False,
    ]
    assert (guard.num_skipped, guard.num_consecutive) == (2, 0)  # a finite step resets the streak only
    guard.should_skip_step(1.0, 5, loss_was_finite_everywhere=False)  # another process saw a NaN loss
    assert guard.state_dict() == {"num_skipped": 3, "num_consecutive": 1}
    with pytest.raises(ValueError, match="keys num_skipped, num_consecutive"):
        guard.load_state_dict({"num_skipped": 1})


def test_max_consecutive_nonfinite_steps_is_validated(tmp_path):
    with pytest.raises(ValueError, match="`max_consecutive_nonfinite_steps` is 0; valid: an int >= 1"):
        make_config(trl_plus.GRPOConfig, tmp_path, max_consecutive_nonfinite_steps=0)


def test_resume_restores_the_skipped_step_counts_or_fails_loudly(tiny_model_path, prompt_dataset, tmp_path):
    settings = dict(trainer_class=PoisonedTrainer, max_steps=2, save_strategy="steps", save_steps=1)
    first, _ = build("grpo", tiny_model_path, prompt_dataset, tmp_path / "a", DigitReward(), **settings)
    first.poisoned_steps = (0,)  # step 1 skipped: the checkpoint after it holds 1 skipped, 1 in a row
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert json.loads((checkpoint / NONFINITE_STEPS_FILE).read_text()) == {
        "step_guard": {"num_skipped": 1, "num_consecutive": 1}
    }

    resumed, metrics = build("grpo", tiny_model_path, prompt_dataset, tmp_path / "b", DigitReward(), **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert metrics.values("nonfinite/skipped_steps") == [1]  # step 2 is finite; the run's count carries on
    assert resumed._step_guard.state_dict() == {"num_skipped": 1, "num_consecutive": 0}

    (checkpoint / NONFINITE_STEPS_FILE).unlink()
    again, _ = build("grpo", tiny_model_path, prompt_dataset, tmp_path / "c", DigitReward(), **settings)
    with pytest.raises(MissingCheckpointFileError, match=f"`{NONFINITE_STEPS_FILE}` \\(the counts of optimizer steps"):
        again.train(resume_from_checkpoint=str(checkpoint))
