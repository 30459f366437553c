"""GRPO with process supervision in the trainer (arXiv 2402.03300 sec. 4.1.3): per-token step advantages."""

import pickle

import pytest
import torch
from conftest import make_config

import trl_plus
from trl_plus.rewards import ProcessReward


def alternating_steps(completions, **kwargs):
    """Even rows: steps [2, 0] ending at tokens 1 and 3; odd rows: steps [0, 0] ending at tokens 0 and 2."""
    return [([2.0, 0.0], [1, 3]) if index % 2 == 0 else ([0.0, 0.0], [0, 2]) for index in range(len(completions))]


class RecordingTrainer(trl_plus.GRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records.append({key: value.clone() for key, value in output.items() if torch.is_tensor(value)})
        return output


def test_process_reward_advantages_by_hand(tiny_model_path, prompt_dataset, tmp_path):
    args = make_config(trl_plus.GRPOConfig, tmp_path, max_steps=1, num_generations=4)
    trainer = RecordingTrainer(
        model=tiny_model_path,
        reward_funcs=ProcessReward(alternating_steps),
        args=args,
        train_dataset=prompt_dataset,
    )
    trainer.records = []
    trainer.train()
    output = trainer.records[0]
    # Each group of 4 holds the step rewards 2, 0, 0, 0, 2, 0, 0, 0: mean 0.5, Bessel std sqrt(6 / 7) = 0.925820,
    # plus eps 1e-4 -> 0.925920. Normalized: 2 -> 1.5 / 0.925920 = 1.620011, 0 -> -0.5 / 0.925920 = -0.540004.
    # Even rows: t = 0, 1 see both steps (1.080007), t = 2, 3 only the second (-0.540004), then 0.
    # Odd rows: t = 0 sees both (-1.080007), t = 1, 2 the second (-0.540004), then 0.
    even = [1.080007, 1.080007, -0.540004, -0.540004, 0, 0, 0, 0]
    odd = [-1.080007, -0.540004, -0.540004, 0, 0, 0, 0, 0]
    width = output["completion_ids"].size(1)
    expected = torch.tensor([even if row % 2 == 0 else odd for row in range(8)])[:, :width]
    torch.testing.assert_close(output["advantages"], expected * output["completion_mask"], atol=1e-5, rtol=1e-5)
    assert output["advantages"].shape == output["completion_mask"].shape
    logged = [entry["rewards/alternating_steps/mean"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([1.0])  # TRL logs the sum of step rewards: (2 + 0) / 2 on average


def test_process_reward_is_picklable_and_returns_step_sums():
    reward = pickle.loads(pickle.dumps(ProcessReward(alternating_steps, name="prm")))
    assert reward(completions=["a", "b", "c"]) == [2.0, 0.0, 2.0]
    assert reward.__name__ == "prm"
    assert reward.last_steps[1] == ([0.0, 0.0], [0, 2])


def steps_ending_at(*indices):
    """A step function whose one completion has one step of reward 1 per index in `indices`."""

    def step_fn(completions, **kwargs):
        return [([1.0] * len(indices), list(indices))]

    return step_fn


@pytest.mark.parametrize("index", [5, 9, -1])
def test_a_step_index_outside_the_completion_raises_naming_it_the_length_and_the_step_function(index):
    # TRL passes each completion's token ids; a completion of 5 tokens has step end indices 0 to 4.
    reward = ProcessReward(steps_ending_at(1, index))
    with pytest.raises(ValueError) as excinfo:
        reward(completions=["abcde"], completion_ids=[[7] * 5])
    assert str(excinfo.value) == (
        f"Step end index {index} of completion 0, from the step function step_fn, is outside the completion "
        "(5 tokens); valid: 0 to 4."
    )


@pytest.mark.parametrize("index", [2.0, 2.7, "2", True])
def test_a_step_index_that_is_not_an_int_raises(index):
    # int(2.7) would put the step on token 2 without a word.
    reward = ProcessReward(steps_ending_at(index))
    with pytest.raises(TypeError) as excinfo:
        reward(completions=["abcde"], completion_ids=[[7] * 5])
    assert str(excinfo.value) == (
        f"Step end index {index!r} of completion 0, from the step function step_fn, is not an int; valid: a "
        "completion-token index (int) from 0."
    )


def test_integer_step_indices_of_any_int_type_are_kept_as_ints():
    reward = ProcessReward(steps_ending_at(torch.tensor(1), torch.tensor([4])[0], 0))
    assert reward(completions=["abcde"], completion_ids=[[7] * 5]) == [3.0]
    assert reward.last_steps == [([1.0, 1.0, 1.0], [1, 4, 0])]
    assert all(type(index) is int for index in reward.last_steps[0][1])


def test_process_reward_needs_the_grpo_estimator(tiny_model_path, prompt_dataset, tmp_path):
    args = make_config(trl_plus.GRPOConfig, tmp_path, advantage_estimator="rloo")
    with pytest.raises(ValueError, match="advantage_estimator='grpo'"):
        trl_plus.GRPOTrainer(
            model=tiny_model_path,
            reward_funcs=ProcessReward(alternating_steps),
            args=args,
            train_dataset=prompt_dataset,
        )
