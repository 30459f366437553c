"""TTRL's vote/train split (`ttrl_num_votes`) on 2 processes vs the vote counted by hand.

Run by `tests/test_distributed.py::test_ttrl_votes_*`, twice on the same saved tiny model:

    python check_ttrl.py MODEL_DIR OUT_DIR                              # 1 process
    torchrun --nproc_per_node 2 check_ttrl.py MODEL_DIR OUT_DIR         # 2 processes, gloo on CPU

3 prompts x 4 trained completions, 6 rows per process, so group "q1" straddles the processes. `ttrl_num_votes=12`:
each `_generate` call is followed by 2 vote-only calls. A `rollout_func` answers by (prompt, call, position in the
group) from `ANSWERS` instead of generating, so both runs see the same completions wherever a row sits. The
rewards (`MajorityVoteReward`, first character, `ties="none"`) of every row after TRL's real
`_generate_and_score_completions` (gathered by TRL) are checked against the vote counted here over all 12
completions of each prompt; the generation counter must hold the 36 generated completions.

Writes OUT_DIR/rank{R}.json and OUT_DIR/rank{R}.pt; exits 1 if a check fails.
"""

import operator
import sys
from collections import Counter
from pathlib import Path

import torch
from fixed_batch import check, config_settings, exit_process, finish

NUM_GENERATIONS = 4
NUM_VOTES = 12
PROMPTS = ["q0", "q1", "q2"]
# ANSWERS[prompt][call][position in group]: call 0 is trained, calls 1 and 2 only vote.
ANSWERS = {
    # a2 b4 c3 d1 e1 f1 -> label b. The trained four alone (a, a, b, c) would give a.
    "q0": ["aabc", "bbcc", "bdef"],
    # x2 y4 z2 w3 q1 -> label y. Rows 0-1 sit on process 0 (x, y; votes z, z, w, w: a tie there), rows 2-3 on
    # process 1 (y, x; votes y, w, y, q): the label needs the other process's votes.
    "q1": ["xyyx", "zzyw", "wwyq"],
    # m5 n4 o3 -> label m.
    "q2": ["mnmn", "nmoo", "omnm"],
}


def expected_rewards() -> list[float]:
    """The majority vote of each prompt's 12 completions counted here; 1.0 for the label, 0.0 otherwise (no ties)."""
    rewards = []
    for prompt in PROMPTS:
        counts = Counter("".join(ANSWERS[prompt]))
        (label, top), (_, second) = counts.most_common(2)
        assert top > second, "the table is meant to have no tie"
        rewards += [float(answer == label) for answer in ANSWERS[prompt][0]]
    return rewards


def make_rollout_func(tokenizer, local_size: int):
    calls = [0]  # every process makes the same calls: the trained one, then the vote-only ones

    def rollout_func(prompts, trainer):
        call = calls[0] % (NUM_VOTES // NUM_GENERATIONS)
        calls[0] += 1
        offset = trainer.accelerator.process_index * local_size
        completions = [
            ANSWERS[prompt][call][(offset + index) % NUM_GENERATIONS] for index, prompt in enumerate(prompts)
        ]
        return {
            "prompt_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts],
            "completion_ids": [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in completions],
            "logprobs": None,
        }

    return rollout_func


def first_letter(text: str) -> str | None:
    return text[:1] or None


def main(model_dir: str, out_dir: str) -> int:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trl_plus import GRPOConfig, GRPOTrainer
    from trl_plus.rewards import MajorityVoteReward

    out_dir = Path(out_dir)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = config_settings(out_dir, world_size)
    local_size = settings["per_device_train_batch_size"]
    args = GRPOConfig(**settings, num_generations=NUM_GENERATIONS, ttrl_num_votes=NUM_VOTES)
    reward = MajorityVoteReward(extractor=first_letter, equivalent=operator.eq, ties="none")
    trainer = GRPOTrainer(
        model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        rollout_func=make_rollout_func(tokenizer, local_size),
    )
    trainer.model.train()
    rows = [prompt for prompt in PROMPTS for _ in range(NUM_GENERATIONS)]
    inputs = [{"prompt": prompt} for prompt in rows[rank * local_size : (rank + 1) * local_size]]
    output = trainer._generate_and_score_completions(inputs)

    rewards = trainer._last_rewards_per_func[:, 0].cpu()  # every process's rows, gathered by TRL in rank order
    summary = {"rank": rank, "world_size": world_size, "num_processes": trainer.accelerator.num_processes}
    summary["checks"] = checks = {}
    check(checks, "rewards", rewards, torch.tensor(expected_rewards()), atol=0.0)
    counted = torch.tensor([float(trainer._generation_counter.completions)])
    check(checks, "generated_completions", counted, torch.tensor([float(len(rows) * NUM_VOTES // NUM_GENERATIONS)]), 0)
    trained_rows = torch.tensor([float(output["completion_ids"].size(0))])
    check(checks, "trained_rows", trained_rows, torch.tensor([float(local_size)]), 0)  # vote-only rows never train
    return finish(out_dir, rank, summary, {"rewards": rewards})


if __name__ == "__main__":
    exit_process(main(*sys.argv[1:3]))
