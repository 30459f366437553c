"""TTRL (arXiv 2504.16084) inside the trainer: majority-vote rewards over whole groups, labels never read."""

import operator
from collections import Counter

import pytest
from accelerate.utils import gather_object
from conftest import digit_reward, make_config
from datasets import Dataset
from transformers import set_seed

import trl_plus
from trl_plus.rewards import MajorityVoteReward


def test_trainer_votes_over_gathered_groups_and_logs_label_agreement(tiny_model_path, tmp_path):
    # The `answer` column is the ground truth: only the agreement metric reads it, never the reward.
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)], "answer": ["7"] * 16})
    reward = MajorityVoteReward()
    args = make_config(trl_plus.GRPOConfig, tmp_path, max_steps=2, num_generations=4)
    trainer = trl_plus.GRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=dataset)
    assert reward.gather_fn is gather_object  # a group straddling processes is voted on as a whole
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        # A completion earns 1 exactly when its answer is its group's majority answer, so with equal-size groups the
        # mean reward equals the mean share of the majority answer in its group.
        assert 0.0 <= entry["ttrl/majority_ratio"] <= 1.0
        assert 0.0 <= entry["ttrl/label_accuracy"] <= 1.0
        assert abs(entry["rewards/majority_vote_reward/mean"] - entry["ttrl/majority_ratio"]) < 1e-6


class RecordingVote(MajorityVoteReward):
    """The majority vote, recording each call's prompts, completions, vote-only completions and rewards."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def __call__(self, completions, prompts=None, **kwargs):
        rewards = super().__call__(completions, prompts=prompts, **kwargs)
        self.calls.append((list(prompts), list(completions), kwargs.get("ttrl_votes"), rewards))
        return rewards


def first_letter(text: str) -> str | None:
    """The vote of a completion in these tests: its first character when it is a letter or digit."""
    return text[0] if text[:1].isalnum() else None


def hand_vote(prompts, completions, extra_votes):
    """ties='none' by hand: per prompt, count the first letters of its trained and vote-only completions; the label
    is the unique most common one (None on a tie); a completion gets 1.0 for the label, 0.0 otherwise, None for all
    of a tied group (a group without any answer has no tie and gets 0.0)."""
    counts = {}
    for prompt, completion, votes in zip(prompts, completions, extra_votes, strict=True):
        for text in [completion, *votes]:
            if first_letter(text) is not None:
                counts.setdefault(prompt, Counter())[first_letter(text)] += 1
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ranked = counts.get(prompt, Counter()).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            rewards.append(None)
        else:
            rewards.append(float(bool(ranked) and first_letter(completion) == ranked[0][0]))
    return rewards


def test_vote_only_completions_vote_are_counted_and_not_trained(tiny_model_path, prompt_dataset, tmp_path):
    # ttrl_num_votes 12 with num_generations 4: each generation call of the 8 trained rows (2 prompts x 4) is
    # followed by 12 / 4 - 1 = 2 vote-only calls, so each trained row carries 2 vote-only completions of its prompt.
    reward = RecordingVote(extractor=first_letter, equivalent=operator.eq, ties="none")
    args = make_config(trl_plus.GRPOConfig, tmp_path, num_generations=4, ttrl_num_votes=12, temperature=1.5)
    trainer = trl_plus.GRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)
    trainer.model.train()
    set_seed(0)
    inputs = next(iter(trainer.get_train_dataloader()))
    output = trainer._generate_and_score_completions(inputs)

    assert output["completion_ids"].shape[0] == 8  # only the trained rows reach the loss
    ((prompts, completions, extra_votes, rewards),) = reward.calls
    assert len(completions) == 8 and [len(votes) for votes in extra_votes] == [2] * 8
    assert all(isinstance(text, str) for votes in extra_votes for text in votes)
    assert rewards == hand_vote(prompts, completions, extra_votes)
    # Every generated completion is counted: 8 trained + 16 vote-only.
    assert trainer._generation_counter.completions == 24
    assert 0.0 in rewards and 1.0 in rewards  # real labels, not only tied or empty groups
    # The vote-only completions decided: the trained ones alone would give other rewards.
    assert hand_vote(prompts, completions, [[]] * 8) != rewards


def test_ttrl_num_votes_trains_and_logs(tiny_model_path, prompt_dataset, tmp_path):
    reward = MajorityVoteReward(extractor=first_letter, equivalent=operator.eq, ties="none")
    args = make_config(trl_plus.GRPOConfig, tmp_path, max_steps=2, num_generations=4, ttrl_num_votes=8)
    trainer = trl_plus.GRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=prompt_dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # Two steps of 8 trained completions, each with 8 vote-only ones: 16 and 32 generated in all.
    assert [entry["generation/completions"] for entry in logs] == [16, 32]
    assert all(0.0 <= entry["ttrl/tied_groups"] <= 1.0 for entry in logs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ttrl_num_votes=6), r"`ttrl_num_votes` is 6; valid: a multiple of num_generations \(4\) greater than it"),
        (dict(ttrl_num_votes=4), r"`ttrl_num_votes` is 4; valid: a multiple"),
        (dict(ttrl_num_votes=8, advantage_estimator="remax"), "ttrl_num_votes` with advantage_estimator='remax'"),
    ],
)
def test_ttrl_num_votes_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(trl_plus.GRPOConfig, tmp_path, num_generations=4, **overrides)


def test_ttrl_num_votes_needs_a_majority_vote_reward(tiny_model_path, prompt_dataset, tmp_path):
    args = make_config(trl_plus.GRPOConfig, tmp_path, num_generations=4, ttrl_num_votes=8)
    with pytest.raises(ValueError, match="add trl_plus.rewards.MajorityVoteReward to reward_funcs"):
        trl_plus.GRPOTrainer(model=tiny_model_path, reward_funcs=digit_reward, args=args, train_dataset=prompt_dataset)
