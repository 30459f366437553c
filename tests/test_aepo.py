"""AEPO (arXiv 2510.08141; the authors' `verl/trainer/ray_trainer.py`, `RayPPOTrainer.fit`, `alg == "AEPO"`): the
temperature switch, the regularizer's sample count and rewarded samples, and the trainer that puts them together."""

import json

import pytest
import torch
from conftest import digit_reward, make_config
from test_trainer import RecordingReward, loss_and_grads, prepare_for_loss
from transformers import set_seed

import trl_plus
from trl_plus.algos.entropy_control import aepo_num_regularizer_samples, aepo_rewarded, aepo_temperature
from trl_plus.trainer.aepo import AEPOController, sampling_temperature
from trl_plus.trainer.checkpoints import MissingCheckpointFileError

# ---------------------------------------------------------------------------------------------- pure functions


def test_temperature_switch_golden():
    # T = T_high if H <= H_target else T_low (the authors: `if entropy <= entropy_base: temperature_high`).
    assert aepo_temperature(0.0, 0.5, 1.2, 0.8) == 1.2  # the first batch: entropy starts at 0
    assert aepo_temperature(0.5, 0.5, 1.2, 0.8) == 1.2  # at the target: raise
    assert aepo_temperature(0.5001, 0.5, 1.2, 0.8) == 0.8


def test_num_regularizer_samples_golden():
    # min(reinforce_sample_num, rewarded) at or below the target; that // 2 above it.
    assert aepo_num_regularizer_samples(0.4, 0.5, 60, 100) == 60
    assert aepo_num_regularizer_samples(0.4, 0.5, 60, 7) == 7
    assert aepo_num_regularizer_samples(0.6, 0.5, 60, 100) == 30
    assert aepo_num_regularizer_samples(0.6, 0.5, 60, 7) == 3  # 7 // 2
    assert aepo_num_regularizer_samples(0.6, 0.5, 60, 0) == 0


def test_rewarded_golden():
    # Advantage > 0.05 (strictly; the authors' `_select_by_advantage(threshold=0.05, absolute=False)`); of token
    # advantages, the first token's.
    assert aepo_rewarded(torch.tensor([0.05, 0.051, -2.0, 1.0])).tolist() == [False, True, False, True]
    token_advantages = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    assert aepo_rewarded(token_advantages).tolist() == [False, True]


@pytest.mark.parametrize("seed", range(3))
def test_regularizer_properties(seed):
    generator = torch.Generator().manual_seed(seed)
    for entropy, num_samples, num_selected in torch.randint(0, 100, (50, 3), generator=generator).tolist():
        entropy = entropy / 50
        count = aepo_num_regularizer_samples(entropy, 1.0, num_samples, num_selected)
        assert 0 <= count <= min(num_samples, num_selected)
        # Below the target at least as many regularizer samples as above it, and a higher temperature.
        assert aepo_num_regularizer_samples(0.0, 1.0, num_samples, num_selected) >= count
        assert aepo_temperature(entropy, 1.0, 1.2, 0.8) == (1.2 if entropy <= 1.0 else 0.8)


def test_controller_averages_the_update_and_keeps_its_state():
    controller = AEPOController(target=0.5, temperature_high=1.2, temperature_low=0.8, num_samples=60)
    assert controller.next_temperature() == 1.2  # nothing observed yet: entropy 0
    for entropy in (0.2, 0.4):  # one update of two micro-batches: mean 0.3 <= 0.5
        controller.observe(entropy)
    assert controller.next_temperature() == 1.2 and controller.entropy == pytest.approx(0.3)
    for entropy in (0.6, 0.8):  # mean 0.7 > 0.5
        controller.observe(entropy)
    assert controller.next_temperature() == 0.8 and controller.entropy == pytest.approx(0.7)
    assert controller.num_regularizer_samples(100) == 30
    assert controller.next_temperature() == 0.8  # no update in between: the last entropy still holds
    controller.observe(0.1)
    restored = AEPOController(0.5, 1.2, 0.8, 60)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.next_temperature() == controller.next_temperature() == 1.2


# ---------------------------------------------------------------------------------------------- in the trainer


def build(tiny_model_path, prompt_dataset, tmp_path, reward=digit_reward, **overrides):
    args = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    return trl_plus.GRPOTrainer(tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)


def test_config_validates_aepo(tmp_path):
    with pytest.raises(ValueError, match=r"`aepo_target_entropy` is -1.0; valid: >= 0"):
        make_config(trl_plus.GRPOConfig, tmp_path, aepo_target_entropy=-1.0)
    with pytest.raises(ValueError, match=r"valid: 0 < low < high"):
        make_config(trl_plus.GRPOConfig, tmp_path, aepo_target_entropy=0.5, aepo_temperature_low=1.5)
    with pytest.raises(ValueError, match=r"`aepo_prompt_fraction` is 0.0; valid: 0 < x <= 1"):
        make_config(trl_plus.GRPOConfig, tmp_path, aepo_target_entropy=0.5, aepo_prompt_fraction=0.0)
    with pytest.raises(ValueError, match=r"`aepo_target_entropy` is 0.5; valid with PPO: None"):
        make_config(trl_plus.PPOConfig, tmp_path, aepo_target_entropy=0.5)


def test_sampling_temperature_changes_generation_only(tiny_model_path, prompt_dataset, tmp_path):
    trainer = build(tiny_model_path, prompt_dataset, tmp_path, aepo_target_entropy=0.5)
    with sampling_temperature(trainer, 1.7):
        assert trainer.generation_config.temperature == 1.7
        assert trainer.generation_kwargs["temperature"] == 1.7
        assert trainer.temperature == 1.0  # the log-probs' temperature
    assert trainer.generation_config.temperature == 1.0 and trainer.generation_kwargs["temperature"] == 1.0


def test_regularizer_rows_replace_the_first_rows(tiny_model_path, prompt_dataset, tmp_path):
    # 8 rows (2 groups of 4) per step; aepo_prompt_fraction 0.5 resamples the first group at T_high = 1.2 (entropy
    # starts at 0). Its rows with GRPO advantage > 0.05 replace the batch's first rows with advantage 1.
    reward = RecordingReward("digits", digit_reward)
    trainer = build(
        tiny_model_path, prompt_dataset, tmp_path, reward, aepo_target_entropy=0.5, aepo_prompt_fraction=0.5
    )
    temperatures = []
    generate = trainer._generate

    def recording_generate(prompts):
        temperatures.append((len(prompts), trainer.generation_config.temperature))
        return generate(prompts)

    trainer._generate = recording_generate
    trainer.model.train()
    set_seed(0)
    main = {}
    round_ = trainer._generate_and_score_round

    def recording_round(inputs):
        output = round_(inputs)
        main.setdefault("output", output)  # the first round is the batch's own, the second the regularizer's
        return output

    trainer._generate_and_score_round = recording_round
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert temperatures == [(8, 1.0), (4, 1.2)]
    regularizer_rewards = torch.tensor(reward.calls[1])  # (4,), the regularizer's group
    advantages = (regularizer_rewards - regularizer_rewards.mean()) / (regularizer_rewards.std() + 1e-4)
    num_rewarded = int((advantages > 0.05).sum())
    assert 0 < num_rewarded < 4
    assert batch["completion_ids"].size(0) == 8
    torch.testing.assert_close(batch["advantages"][:num_rewarded], torch.ones(num_rewarded))
    torch.testing.assert_close(batch["advantages"][num_rewarded:], main["output"]["advantages"][num_rewarded:])
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    assert metrics["aepo/temperature"] == 1.2 and metrics["aepo/target_entropy"] == 0.5
    assert metrics["aepo/regularizer_samples"] == num_rewarded and metrics["aepo/entropy"] == 0.0
    assert metrics["aepo/rewarded_fraction"] == num_rewarded / 4

    # The regularizer term: on-policy (ratio 1) TRL's "dapo" loss is -sum_i A_i |o_i| / sum_i |o_i|, so each
    # regularizer row adds -1 * its length: REINFORCE with R = 1.
    prepare_for_loss(trainer)
    loss, _ = loss_and_grads(trainer, batch)
    lengths = batch["completion_mask"].sum(1).float()
    expected = -(batch["advantages"] * lengths).sum() / lengths.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert trainer._aepo._window_count == 1  # the update's entropy was observed for the next temperature


def test_training_follows_the_entropy_and_resumes_it(tiny_model_path, prompt_dataset, tmp_path):
    # The tiny model's token entropy is ~3.84 nats (near ln 48). With the target at 3.0 the first step samples at
    # T_high (entropy 0 before any update), every later one at T_low, each judged on the previous step's entropy.
    trainer = build(
        tiny_model_path, prompt_dataset, tmp_path / "run", aepo_target_entropy=3.0, max_steps=3, save_strategy="steps",
        save_steps=2, aepo_prompt_fraction=0.5,
    )  # fmt: skip
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["aepo/temperature"] for entry in entries] == [1.2, 0.8, 0.8]
    for previous, entry in zip(entries, entries[1:], strict=False):
        assert entry["aepo/entropy"] == pytest.approx(previous["entropy"], rel=1e-6)
        assert previous["entropy"] > 3.0
    checkpoint = tmp_path / "run" / "checkpoint-2"
    state = json.loads((checkpoint / "aepo_state.json").read_text())
    # After step 2: the entropy that set step 2's temperature (step 1's), and step 2's update, still open (it sets
    # step 3's temperature when step 3 generates).
    assert state["aepo"]["entropy"] == pytest.approx(entries[0]["entropy"], rel=1e-6)
    assert state["aepo"]["window_count"] == 1
    assert state["aepo"]["window_sum"] == pytest.approx(entries[1]["entropy"], rel=1e-6)
    # A resume restores the controller, or names the missing file.
    (checkpoint / "aepo_state.json").unlink()
    resumed = build(tiny_model_path, prompt_dataset, tmp_path / "run", aepo_target_entropy=3.0, max_steps=3)
    with pytest.raises(MissingCheckpointFileError, match="aepo_state.json"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_regularizer_temperature_moves_the_entropy(tiny_model_path, prompt_dataset, tmp_path):
    # The regularizer alone sets the direction: every resampled group at T = 3 (near-uniform samples) or at T = 0.3
    # (near-greedy ones), all rewarded rows trained with advantage 1. Sharper samples lower the entropy more.
    def final_entropy(target, **temperatures):
        trainer = build(
            tiny_model_path, prompt_dataset, tmp_path / str(target), aepo_target_entropy=target, max_steps=4,
            aepo_prompt_fraction=1.0, aepo_num_samples=8, **temperatures,
        )  # fmt: skip
        trainer.train()
        return [entry["entropy"] for entry in trainer.state.log_history if "loss" in entry]

    raising = final_entropy(100.0, aepo_temperature_high=3.0)  # always below the target: T_high
    lowering = final_entropy(0.0, aepo_temperature_high=3.0, aepo_temperature_low=0.3)  # T_low after step 1
    assert raising[0] == pytest.approx(lowering[0], rel=1e-6)  # the same first step (both sample at 3.0)
    assert lowering[-1] < raising[-1]
