"""TTRL (arXiv 2504.16084) inside the trainer: majority-vote rewards over whole groups, labels never read."""

from accelerate.utils import gather_object
from conftest import make_config
from datasets import Dataset

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
