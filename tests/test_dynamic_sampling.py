"""DAPO dynamic sampling (arXiv 2503.14476 sec. 3.2): the pure helpers in `trl_plus.sampling` and the trainer loop.

The trainer tests use a reward whose zero-variance groups are known from the prompt alone: a `+` prompt is scored by
a hash of the completion text (its 4 completions almost never tie), a `-` prompt gets 1.0 whatever the completion.
About half the groups of every round are therefore all-equal, which makes dynamic sampling generate extra rounds and,
when a round brings more valid groups than the batch needs, keep the surplus for the next step. Every trained batch
is re-scored from its decoded text, independently of the trainer's own bookkeeping.

A two-process run (`torchrun --nproc_per_node 2`, gloo on CPU) is launched from here: see
`tests/distributed/check_dynamic_sampling.py`.
"""

import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from check_dynamic_sampling import (
    PROMPTS,
    SELECTIVE_GROUP_SIZE,
    SELECTIVE_PROMPTS,
    MicroBatchRecorder,
    signal_reward,
)
from conftest import make_config, requires_gloo, run_isolated
from datasets import Dataset, IterableDataset
from torch.testing import assert_close

from trl_plus import DAPOConfig, DAPOTrainer, GRPOConfig, GRPOTrainer
from trl_plus.rewards.majority_vote import prompt_key
from trl_plus.sampling import PromptBatchStream, SurplusBuffer, groups_with_signal, split_rows, stack_rows
from trl_plus.sampling.selective import SIGNAL, SOLVED, UNSOLVED
from trl_plus.trainer.checkpoints import MissingCheckpointFileError, UnreadableCheckpointFileError
from trl_plus.trainer.grpo import SURPLUS_BUFFER_FILE

NAN = float("nan")
GROUP_SIZE = 4
CHECK_SCRIPT = Path(__file__).parent / "distributed" / "check_dynamic_sampling.py"


class ConstantReward:
    """1.0 for every completion (every group is zero-variance); counts its calls, i.e. the generation rounds."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        return [1.0] * len(completions)


def policy_log_probs(model, batch):
    """`(B, T)` log-probs of `completion_ids` under `model`: one plain forward pass, independent of TRL's scoring."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    # The logit at position p predicts token p + 1: the completion is predicted from the last prompt position on.
    logits = logits[:, batch["prompt_ids"].size(1) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def clone_rows(rows):
    return [{key: value.detach().cpu().clone() for key, value in row.items()} for row in rows]


class RecordingTrainer(MicroBatchRecorder):
    """Records, per generation step, the batch dynamic sampling hands to TRL, its metrics, the surplus buffer left
    for the next step and the sampling policy's log-probs of both; and the row count of every micro-batch trained."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        metrics = self.latest_dynamic_sampling_metrics()
        buffer = clone_rows(self._sampler.surplus.rows)
        # The model has not been updated yet: this is the policy that sampled this step's rows.
        buffer_log_probs = policy_log_probs(self.model, stack_rows(buffer, self._pad_values)) if buffer else None
        self.steps.append(
            {
                "batch": {key: value.detach().cpu().clone() for key, value in batch.items()},
                "metrics": metrics,
                "buffer": buffer,
                "buffer_policy_log_probs": buffer_log_probs,
                "batch_policy_log_probs": policy_log_probs(self.model, batch).cpu(),
                # what TRL's completions table (log_completions=True) would show for this step
                "logged": {key: list(self._logs[key]) for key in ("prompt", "completion", "advantages")},
            }
        )
        return batch


def on_prompts(model, args, reward=signal_reward, trainer_class=RecordingTrainer):
    """`trainer_class` trained on PROMPTS, rewarded by `reward`."""
    return trainer_class(
        model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )


def decode_rows(tokenizer, batch):
    """`(prompt, completion)` texts of every row, decoded the way TRL decodes the completions it scores."""
    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    return list(zip(prompts, completions, strict=True))


def groups_of(items, group_size=GROUP_SIZE):
    return [items[start : start + group_size] for start in range(0, len(items), group_size)]


def row_key(row):
    """A row's identity: its prompt and completion tokens without padding (for rows whose loss is not masked)."""
    prompt = row["prompt_ids"][row["prompt_mask"].bool()].tolist()
    return tuple(prompt), tuple(row["completion_ids"][: int(row["completion_mask"].sum())].tolist())


# What a trained row is made of (buffered rows may carry more bookkeeping keys, which are not trained on).
ROW_KEYS = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_per_token_logps"]


def assert_rows_equal(actual, expected, keys):
    """Rows hold the same values; `actual` may carry more padding (left for prompts, right otherwise)."""
    assert len(actual) == len(expected)
    for actual_row, expected_row in zip(actual, expected, strict=True):
        for key in keys:
            actual_value, expected_value = actual_row[key], expected_row[key]
            if expected_value.dim() > 0:
                width = expected_value.size(0)
                actual_value = actual_value[-width:] if key in ("prompt_ids", "prompt_mask") else actual_value[:width]
            assert torch.equal(actual_value, expected_value), key


def ds_config(output_dir, **overrides):
    settings = dict(dynamic_sampling=True, gradient_accumulation_steps=2)  # 16 rows (4 groups) per generation
    settings.update(overrides)
    return make_config(GRPOConfig, output_dir, **settings)


# ---------------------------------------------------------------------------------------------------------------------
# groups_with_signal
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, group_size, expected",
    [
        # docstring: {1, 0} differ; {1, 1} equal; {2, NaN}: one scored reward, nothing to compare it with
        ([1.0, 0.0, 1.0, 1.0, 2.0, NAN], 2, [True, False, False]),
        # 0/1 rewards: a group has signal iff 0 < #correct < G (DAPO eq. 11)
        ([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0], 4, [False, False, True, True]),
        # NaN = unscored, ignored: all NaN -> no signal; NaN + equal scored -> no signal; NaN + different -> signal
        ([NAN, NAN, NAN, NAN, NAN, 1, 1, NAN, NAN, 0, 1, NAN, 3, NAN, NAN, NAN], 4, [False, False, True, False]),
        # equal non-zero rewards, negative rewards, and a difference of 1e-6 (float32 keeps it: 0.5 + 2^-20 > 0.5)
        ([2.5, 2.5, 2.5, -1.0, -1.0, -1.0, 0.5, 0.5, 0.5 + 2**-20], 3, [False, False, True]),
        # infinities compare as values: {-inf, -inf} equal, {-inf, 0} differ, {inf, NaN} one scored
        ([-math.inf, -math.inf, -math.inf, 0.0, math.inf, NAN], 2, [False, True, False]),
        # group size 1: a single completion never has signal
        ([0.0, 1.0, NAN], 1, [False, False, False]),
    ],
)
def test_groups_with_signal_golden(rewards, group_size, expected):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    before = rewards.clone()
    result = groups_with_signal(rewards, group_size)
    assert result.dtype == torch.bool
    assert result.tolist() == expected
    assert torch.equal(rewards.isnan(), before.isnan()) and torch.equal(rewards.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("seed", range(5))
def test_groups_with_signal_iff_some_grpo_advantage_is_nonzero(seed):
    # TRL's GRPO advantage is (r - nanmean_g r) / (nanstd_g r + 1e-4): all 0 exactly when the scored rewards are equal.
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (64, 4), generator=generator).float()
    rewards[torch.rand(64, 4, generator=generator) < 0.3] = NAN
    mean = rewards.nanmean(dim=1, keepdim=True)
    advantages = (rewards - mean).nan_to_num(0.0)
    expected = advantages.abs().amax(dim=1) > 0
    assert 0 < int(expected.sum()) < 64  # both kinds of group occur
    assert torch.equal(groups_with_signal(rewards.flatten(), 4), expected)


# ---------------------------------------------------------------------------------------------------------------------
# split_rows / stack_rows
# ---------------------------------------------------------------------------------------------------------------------

PAD = 0


def _round_batch(prompt_ids, completion_ids, advantages):
    """A TRL-style batch: prompts left-padded, completions right-padded with PAD (the masks say which is which)."""
    prompt_ids = torch.tensor(prompt_ids)
    completion_ids = torch.tensor(completion_ids)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": (prompt_ids != PAD).long(),
        "completion_ids": completion_ids,
        "completion_mask": (completion_ids != PAD).long(),
        "old_per_token_logps": -completion_ids.float() / 10 * (completion_ids != PAD),
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": (completion_ids != PAD).sum(),  # 0-dim: not a per-row value
        "group_ids": torch.tensor([7, 7, 7, 7, 7]),  # first dim 5 != the row count: not a per-row value
        "prompts": ["a", "b"],  # not a tensor
    }


def test_split_rows_keeps_only_per_row_tensors():
    batch = _round_batch([[0, 5, 6], [4, 5, 6]], [[9, 8, 0], [9, 0, 0]], [1.0, -1.0])
    rows = split_rows(batch, 2)
    assert len(rows) == 2
    per_row = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps", "advantages"}
    assert all(set(row) == per_row for row in rows)
    assert rows[0]["prompt_ids"].tolist() == [0, 5, 6]
    assert rows[1]["completion_ids"].tolist() == [9, 0, 0]
    assert rows[1]["advantages"].item() == -1.0


def test_split_then_stack_round_trip():
    batch = _round_batch([[0, 5, 6], [4, 5, 6], [0, 0, 3]], [[9, 8, 0], [9, 0, 0], [7, 7, 7]], [1.0, -1.0, 0.5])
    restacked = stack_rows(split_rows(batch, 3), {"prompt_ids": PAD, "completion_ids": PAD})
    assert set(restacked) == {
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "old_per_token_logps",
        "advantages",
    }
    for key, value in restacked.items():
        assert torch.equal(value, batch[key]), key


def test_stack_rows_of_two_rounds_pads_prompts_left_and_the_rest_right():
    # round A: prompt width 2, completion width 2; round B: prompt width 3, completion width 3
    round_a = _round_batch([[5, 6], [0, 6]], [[9, 8], [9, 0]], [1.0, -1.0])
    round_b = _round_batch([[4, 5, 6], [0, 4, 5]], [[7, 7, 7], [3, 0, 0]], [2.0, -2.0])
    rows = split_rows(round_a, 2) + split_rows(round_b, 2)
    batch = stack_rows(rows, {"prompt_ids": PAD, "completion_ids": PAD})
    # prompts: A's rows get one more pad on the LEFT, so the last prompt token stays next to the completion
    assert batch["prompt_ids"].tolist() == [[0, 5, 6], [0, 0, 6], [4, 5, 6], [0, 4, 5]]
    assert batch["prompt_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]]
    # completions and per-token values: one more pad on the RIGHT
    assert batch["completion_ids"].tolist() == [[9, 8, 0], [9, 0, 0], [7, 7, 7], [3, 0, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert_close(
        batch["old_per_token_logps"],
        torch.tensor([[-0.9, -0.8, 0.0], [-0.9, 0.0, 0.0], [-0.7, -0.7, -0.7], [-0.3, 0.0, 0.0]]),
    )
    assert batch["advantages"].tolist() == [1.0, -1.0, 2.0, -2.0]


def test_stack_rows_pad_values_and_token_level_advantages():
    rows = [
        {"completion_ids": torch.tensor([5]), "tool_mask": torch.tensor([0]), "advantages": torch.tensor([0.5])},
        {
            "completion_ids": torch.tensor([6, 7, 8]),
            "tool_mask": torch.tensor([1, 0, 1]),
            "advantages": torch.tensor([1.0, 2.0, 3.0]),
        },
    ]
    batch = stack_rows(rows, {"completion_ids": 2, "tool_mask": 1})
    assert batch["completion_ids"].tolist() == [[5, 2, 2], [6, 7, 8]]  # pad id 2 (not 0)
    assert batch["tool_mask"].tolist() == [[0, 1, 1], [1, 0, 1]]  # tool_mask pads with 1, as TRL's does
    assert batch["advantages"].tolist() == [[0.5, 0.0, 0.0], [1.0, 2.0, 3.0]]  # (B, T) advantages: right, 0
    assert batch["completion_ids"].dtype == torch.int64 and batch["advantages"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# SurplusBuffer
# ---------------------------------------------------------------------------------------------------------------------


def _rows(*values):
    return [
        {"completion_ids": torch.tensor([value, value + 1]), "advantages": torch.tensor(float(value))}
        for value in values
    ]


def test_surplus_buffer_put_take_and_capacity():
    buffer = SurplusBuffer(group_size=2, capacity_groups=3)
    assert buffer.num_groups == 0 and buffer.take_all() == []
    assert buffer.put(_rows(0, 1)) == 0  # 1 group, fits
    assert buffer.put(_rows(2, 3, 4, 5, 6, 7)) == 1  # 3 groups, room for 2: the last group is dropped
    assert buffer.num_groups == 3
    assert buffer.put(_rows(8, 9)) == 1  # full
    taken = buffer.take_all()
    assert [row["advantages"].item() for row in taken] == [0, 1, 2, 3, 4, 5]  # order kept, whole groups
    assert buffer.num_groups == 0 and buffer.rows == []
    assert buffer.put(_rows(10, 11)) == 0 and buffer.num_groups == 1  # usable again after take_all


def test_surplus_buffer_zero_capacity_drops_everything():
    buffer = SurplusBuffer(group_size=2, capacity_groups=0)
    assert buffer.put(_rows(0, 1, 2, 3)) == 2
    assert buffer.num_groups == 0


def test_surplus_buffer_state_dict_round_trip(tmp_path):
    buffer = SurplusBuffer(group_size=2, capacity_groups=2)
    buffer.put(_rows(0, 1, 2, 3))
    torch.save(buffer.state_dict(), tmp_path / "buffer.pt")
    restored = SurplusBuffer(group_size=2, capacity_groups=2)
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert restored.num_groups == 2
    assert_rows_equal(restored.rows, buffer.rows, ["completion_ids", "advantages"])
    assert restored.put(_rows(4, 5)) == 1  # the restored rows count against the capacity


@pytest.mark.parametrize(
    "state, words",
    [({"rows": _rows(0, 1, 2)}, "not whole groups of 2"), ({"rows": [], "capacity": 2}, "keys ['rows']")],
)
def test_surplus_buffer_refuses_a_state_it_cannot_hold(state, words):
    buffer = SurplusBuffer(group_size=2, capacity_groups=2)
    buffer.put(_rows(7, 8))
    with pytest.raises(ValueError, match=re.escape(words)):
        buffer.load_state_dict(state)
    assert [row["advantages"].item() for row in buffer.rows] == [7, 8]  # unchanged


# ---------------------------------------------------------------------------------------------------------------------
# PromptBatchStream
# ---------------------------------------------------------------------------------------------------------------------


def _epoch_loader(epoch):
    """8 items in batches of 2, shuffled by a sampler seeded with the epoch; the DataLoader has no generator of its
    own, so starting its iteration draws its workers' base seed from the global RNG, as the trainer's loaders do."""
    sampler = torch.utils.data.RandomSampler(range(8), generator=torch.Generator().manual_seed(epoch))
    return torch.utils.data.DataLoader(range(8), batch_size=2, sampler=sampler)


def test_prompt_stream_resumes_at_its_position_and_leaves_the_global_rng_as_an_uninterrupted_stream():
    torch.manual_seed(0)
    stream = PromptBatchStream(_epoch_loader)
    first_epoch = [next(stream).tolist() for _ in range(4)]
    assert sorted(sum(first_epoch, [])) == list(range(8))  # one pass over the data
    next(stream)
    saved, rng_state = stream.state_dict(), torch.get_rng_state()
    assert saved == {"epoch": 1, "batches_taken": 1}
    expected = [next(stream).tolist() for _ in range(5)]  # the rest of epoch 1, then epoch 2 starts
    expected_rng_state = torch.get_rng_state()
    assert stream.state_dict() == {"epoch": 2, "batches_taken": 2}

    resumed = PromptBatchStream(_epoch_loader)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng_state)  # what the Trainer restores from the checkpoint
    assert [next(resumed).tolist() for _ in range(5)] == expected
    assert torch.equal(torch.get_rng_state(), expected_rng_state)


@pytest.mark.parametrize(
    "state", [{"epoch": 1}, {"epoch": 1, "batches_taken": 2, "seed": 3}, {"epoch": -1, "batches_taken": 0}, [1, 2]]
)
def test_prompt_stream_refuses_a_malformed_position(state):
    stream = PromptBatchStream(_epoch_loader)
    with pytest.raises(ValueError, match="PromptBatchStream"):
        stream.load_state_dict(state)
    assert stream.state_dict() == {"epoch": 0, "batches_taken": 0}


# ---------------------------------------------------------------------------------------------------------------------
# Config and trainer validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1])
def test_max_num_gen_batches_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match="max_num_gen_batches"):
        ds_config(tmp_path, max_num_gen_batches=value)


def test_dynamic_sampling_rejects_an_iterable_dataset(tmp_path, tiny_model_path):
    dataset = IterableDataset.from_generator(lambda: iter({"prompt": p} for p in PROMPTS))
    with pytest.raises(ValueError, match=r"dynamic_sampling.*map-style"):
        GRPOTrainer(
            model=tiny_model_path,
            reward_funcs=signal_reward,
            args=ds_config(tmp_path, max_steps=1),
            train_dataset=dataset,
        )
    # the same dataset without dynamic sampling is accepted: the error is about dynamic sampling
    GRPOTrainer(
        model=tiny_model_path,
        reward_funcs=signal_reward,
        args=ds_config(tmp_path, dynamic_sampling=False, max_steps=1),
        train_dataset=dataset,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Training: filtered batches, constant shapes, the surplus buffer, checkpoints
# ---------------------------------------------------------------------------------------------------------------------

NUM_STEPS = 4


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """4 on-policy steps (16 rows = 4 groups per generation, 2 micro-batches of 8), a checkpoint after every step."""
    output_dir = tmp_path_factory.mktemp("dynamic-sampling")
    args = ds_config(output_dir, max_steps=NUM_STEPS, save_strategy="steps", save_steps=1)
    assert args.steps_per_generation == 2 and args.generation_batch_size == 16
    assert not args.has_old_log_probs  # on-policy: the trainer itself must give buffered rows their old log-probs
    trainer = on_prompts(tiny_model_path, args)
    trainer.train()
    assert len(trainer.steps) == NUM_STEPS
    return trainer, output_dir


def test_trained_batches_have_no_zero_variance_group(trained):
    trainer, _ = trained
    tokenizer = trainer.processing_class
    for step in trainer.steps:
        batch = step["batch"]
        assert step["metrics"]["groups_kept"] == 4 and step["metrics"]["groups_masked"] == 0
        for group_index, group in enumerate(groups_of(decode_rows(tokenizer, batch))):
            assert len({prompt for prompt, _ in group}) == 1, f"group {group_index} mixes prompts: {group}"
            rewards = signal_reward(*zip(*group, strict=True))
            assert max(rewards) > min(rewards), f"zero-variance group trained: {group} -> {rewards}"
        # equivalently: no group's advantages are all 0
        assert (batch["advantages"].view(-1, GROUP_SIZE).abs().amax(dim=1) > 0).all()
        tokens_per_group = batch["completion_mask"].view(-1, GROUP_SIZE, batch["completion_mask"].size(1)).sum((1, 2))
        assert (tokens_per_group > 0).all()  # no group is masked out of the loss
    # the filter had work to do: about half the generated groups were zero-variance, so extra rounds ran
    assert sum(step["metrics"]["groups_generated"] for step in trainer.steps) > 4 * NUM_STEPS
    assert any(step["metrics"]["rounds"] >= 2 for step in trainer.steps)


def test_trained_batch_shapes_are_constant(trained):
    trainer, _ = trained
    rows_per_generation = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    for step in trainer.steps:
        batch = step["batch"]
        assert {key for key, value in batch.items() if value.dim() > 0} >= {
            "prompt_ids",
            "prompt_mask",
            "completion_ids",
            "completion_mask",
            "advantages",
        }
        for key, value in batch.items():
            if value.dim() > 0:
                assert value.size(0) == rows_per_generation == 16, key
        assert batch["prompt_mask"].shape == batch["prompt_ids"].shape
        assert batch["completion_mask"].shape == batch["completion_ids"].shape
        if "old_per_token_logps" in batch:
            assert batch["old_per_token_logps"].shape == batch["completion_ids"].shape
        # rows from different rounds were re-padded: prompts on the left (mask 0..0 1..1), completions on the right
        assert (batch["prompt_mask"].diff(dim=1) >= 0).all() and (batch["prompt_mask"][:, -1] == 1).all()
        assert (batch["completion_mask"].diff(dim=1) <= 0).all() and (batch["completion_mask"][:, 0] == 1).all()
        pad_id = trainer.processing_class.pad_token_id
        assert (batch["prompt_ids"][batch["prompt_mask"] == 0] == pad_id).all()
        assert (batch["completion_ids"][batch["completion_mask"] == 0] == pad_id).all()
        # the loss normalizer counts exactly the loss tokens of the batch
        assert batch["num_items_in_batch"].item() == batch["completion_mask"].sum().item()
    # every micro-batch trained on has per_device_train_batch_size rows; 2 per optimizer step
    assert trainer.micro_batch_rows == [trainer.args.per_device_train_batch_size] * (2 * NUM_STEPS)
    assert all(math.isfinite(loss) for loss in trainer.micro_batch_losses)


def test_surplus_groups_are_trained_in_the_next_step(trained):
    trainer, _ = trained
    tokenizer = trainer.processing_class
    steps_with_surplus = [index for index in range(NUM_STEPS - 1) if trainer.steps[index]["buffer"]]
    assert steps_with_surplus, "this seed should leave surplus groups after some step"
    assert trainer.steps[0]["metrics"]["groups_from_buffer"] == 0
    for index in range(NUM_STEPS):
        step = trainer.steps[index]
        assert step["metrics"]["buffer_size"] * GROUP_SIZE == len(step["buffer"])
        previous_buffer = trainer.steps[index - 1]["buffer"] if index else []
        assert step["metrics"]["groups_from_buffer"] * GROUP_SIZE == len(previous_buffer)
    for index in steps_with_surplus:
        surplus = trainer.steps[index]["buffer"]
        # the surplus groups are valid groups that were NOT trained this step ...
        trained_now = {row_key(row) for row in split_rows(trainer.steps[index]["batch"], 16)}
        assert not trained_now & {row_key(row) for row in surplus}
        for group in groups_of(decode_rows(tokenizer, stack_rows(surplus, trainer._pad_values))):
            rewards = signal_reward(*zip(*group, strict=True))
            assert max(rewards) > min(rewards)
        # ... and are the first rows of the next step's batch, unchanged (tokens, advantages, old log-probs)
        next_rows = split_rows(trainer.steps[index + 1]["batch"], 16)[: len(surplus)]
        assert_rows_equal(next_rows, surplus, ROW_KEYS)
    logged = [entry["dynamic_sampling/groups_from_buffer"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [step["metrics"]["groups_from_buffer"] for step in trainer.steps]
    assert max(logged) > 0


def test_buffered_rows_keep_the_sampling_policys_log_probs(trained):
    trainer, _ = trained
    checked = 0
    for index in range(NUM_STEPS - 1):
        step, next_step = trainer.steps[index], trainer.steps[index + 1]
        if not step["buffer"]:
            continue
        checked += 1
        surplus = stack_rows(step["buffer"], trainer._pad_values)
        mask = surplus["completion_mask"].bool()
        # stored when sampled: the log-probs of the policy that generated them (before this step's update)
        assert_close(surplus["old_per_token_logps"][mask], step["buffer_policy_log_probs"][mask], atol=1e-5, rtol=0)
        # in the next step: still those, not the updated policy's (that would make the ratio 1: no correction) ...
        num_buffered = len(step["buffer"])
        batch, current = next_step["batch"], next_step["batch_policy_log_probs"]
        mask = batch["completion_mask"].bool()
        mask[num_buffered:] = False
        assert (batch["old_per_token_logps"][mask] - current[mask]).abs().max() > 1e-3
        # ... while the fresh rows of that batch carry the current policy's (ratio 1, as on-policy TRL)
        mask = batch["completion_mask"].bool()
        mask[:num_buffered] = False
        assert_close(batch["old_per_token_logps"][mask], current[mask], atol=1e-5, rtol=0)
    assert checked > 0


def test_completions_log_pairs_each_advantage_with_its_own_completion(trained):
    trainer, _ = trained
    for step in trainer.steps:
        trained_advantages = {}
        rows = decode_rows(trainer.processing_class, step["batch"])
        for row, advantage in zip(rows, step["batch"]["advantages"].tolist(), strict=True):
            trained_advantages.setdefault(row, []).append(advantage)
        if step["buffer"]:  # surplus rows of the last round show the advantage they will be trained with
            surplus = stack_rows(step["buffer"], {"prompt_ids": PAD, "completion_ids": PAD})
            surplus_rows = decode_rows(trainer.processing_class, surplus)
            for row, advantage in zip(surplus_rows, surplus["advantages"].tolist(), strict=True):
                trained_advantages.setdefault(row, []).append(advantage)
        logged = step["logged"]
        assert len(logged["prompt"]) == len(logged["completion"]) == len(logged["advantages"]) == 16
        for prompt, completion, advantage in zip(
            logged["prompt"], logged["completion"], logged["advantages"], strict=True
        ):
            # a trained or surplus row shows its advantage; any other row belongs to a dropped zero-variance
            # group, whose advantage is 0
            expected = trained_advantages.get((prompt, completion), [0.0])
            assert any(abs(advantage - value) < 1e-6 for value in expected), (prompt, completion, advantage, expected)


def test_checkpoints_hold_the_surplus_buffer_and_the_prompt_stream_position(trained):
    trainer, output_dir = trained
    batches_per_epoch = len(PROMPTS) // 4  # 4 prompts (16 rows) per batch
    batches_taken = 0
    for index, step in enumerate(trainer.steps):
        path = output_dir / f"checkpoint-{index + 1}" / SURPLUS_BUFFER_FILE
        assert path.exists(), path
        saved = torch.load(path, weights_only=True)
        assert set(saved) == {"surplus_buffer", "prompt_stream"}
        rows = saved["surplus_buffer"]["rows"]
        assert len(rows) == len(step["buffer"]) == step["metrics"]["buffer_size"] * GROUP_SIZE
        assert_rows_equal(rows, step["buffer"], list(step["buffer"][0]) if step["buffer"] else [])
        # every round after a step's first takes one batch of the stream; an epoch ends after its last batch is taken
        batches_taken += step["metrics"]["rounds"] - 1
        epoch = max(batches_taken - 1, 0) // batches_per_epoch
        assert saved["prompt_stream"] == {"epoch": epoch, "batches_taken": batches_taken - epoch * batches_per_epoch}
    assert batches_taken > 0


def _checkpoint_with_surplus(trainer, output_dir):
    index = next(index for index in range(NUM_STEPS - 1) if trainer.steps[index]["buffer"])
    return index, str(output_dir / f"checkpoint-{index + 1}")


def test_load_optimizer_and_scheduler_restores_the_buffer(trained, tiny_model_path, tmp_path):
    trainer, output_dir = trained
    index, checkpoint = _checkpoint_with_surplus(trainer, output_dir)
    saved = trainer.steps[index]["buffer"]
    fresh = on_prompts(tiny_model_path, ds_config(tmp_path, max_steps=NUM_STEPS), trainer_class=GRPOTrainer)
    fresh.create_optimizer_and_scheduler(num_training_steps=NUM_STEPS)
    assert fresh._sampler.surplus.num_groups == 0
    fresh._load_optimizer_and_scheduler(checkpoint)
    assert fresh._sampler.surplus.num_groups == len(saved) // GROUP_SIZE > 0
    assert_rows_equal(fresh._sampler.surplus.rows, saved, list(saved[0]))  # every key, bookkeeping included


def test_resume_trains_the_restored_buffer_first(trained, tiny_model_path, tmp_path):
    trainer, output_dir = trained
    index, checkpoint = _checkpoint_with_surplus(trainer, output_dir)
    saved = trainer.steps[index]["buffer"]
    resumed = on_prompts(tiny_model_path, ds_config(tmp_path, max_steps=index + 2))  # one step past the checkpoint
    resumed.train(resume_from_checkpoint=checkpoint)
    assert len(resumed.steps) == 1
    step = resumed.steps[0]
    assert step["metrics"]["groups_from_buffer"] * GROUP_SIZE == len(saved) > 0
    assert_rows_equal(split_rows(step["batch"], 16)[: len(saved)], saved, ROW_KEYS)
    # the restored rows were not regenerated: same tokens the original run trained at this step
    original_next = split_rows(trainer.steps[index + 1]["batch"], 16)[: len(saved)]
    assert_rows_equal(original_next, saved, ["prompt_ids", "completion_ids"])


def damage_file(path, damage):
    """Delete `path`, or cut it to half its bytes (a write interrupted by a crash)."""
    if damage == "missing":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["missing", "truncated", "old format"])
def test_resume_refuses_a_checkpoint_without_a_usable_dynamic_sampling_state(
    trained, tiny_model_path, tmp_path, damage
):
    """Without the surplus groups and the prompt stream's position the run would silently diverge from the saved one;
    the resume stops before anything is generated, naming the file. 'old format': a file of trl_plus before the stream
    position was saved (the buffer's rows only)."""
    trainer, output_dir = trained
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(output_dir / "checkpoint-2", checkpoint)
    path = checkpoint / SURPLUS_BUFFER_FILE
    if damage == "old format":
        torch.save(torch.load(path, weights_only=True)["surplus_buffer"], path)
    else:
        damage_file(path, damage)
    resumed = on_prompts(tiny_model_path, ds_config(tmp_path / "out", max_steps=3))
    error, words = (
        (MissingCheckpointFileError, "is missing")
        if damage == "missing"
        else (UnreadableCheckpointFileError, "cannot be used")
    )
    prefix = f"Cannot resume from {checkpoint}: `{SURPLUS_BUFFER_FILE}` (dynamic sampling's surplus groups"
    with pytest.raises(error, match=re.escape(prefix) + ".*" + words) as raised:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    if damage == "old format":
        assert "it holds the sections ['rows'], expected ['prompt_stream', 'surplus_buffer']" in str(raised.value)
    assert resumed.steps == [] and resumed._sampler.surplus.num_groups == 0


def logged(trainer, key):
    """`key` at every logged step (logging_steps=1); a resumed run's history starts with the checkpoint's."""
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def dapo_trainer(model, output_dir, **overrides):
    """A DAPO trainer (dynamic sampling on) on PROMPTS, 16 rows (4 groups) per generation. Overlong filtering is off:
    the tiny model rarely ends a completion within 8 tokens, so it would mask nearly every row out of the loss."""
    settings = dict(gradient_accumulation_steps=2, mask_truncated_completions=False)
    settings.update(overrides)
    args = make_config(DAPOConfig, output_dir, **settings)
    return DAPOTrainer(
        model=model, reward_funcs=signal_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS})
    )


def test_dapo_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_path, tmp_path):
    """6 DAPO steps with a checkpoint every 3, against 3 steps resumed from checkpoint-3 (same seed): the same loss at
    every step after the checkpoint and the same final weights. At the checkpoint the surplus buffer holds a group and
    the extra-prompt stream is inside its first epoch; after it the stream moves on to its second epoch."""
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3)
    uninterrupted = dapo_trainer(tiny_model_path, tmp_path / "a", **settings)
    uninterrupted.train()
    stream_batches = [int(rounds) - 1 for rounds in logged(uninterrupted, "dynamic_sampling/rounds")]  # rounds 2, 3..
    batches_per_epoch = len(PROMPTS) // 4  # 4 prompts per batch, one process
    assert sum(stream_batches[:3]) % batches_per_epoch != 0 and sum(stream_batches) > batches_per_epoch
    assert logged(uninterrupted, "dynamic_sampling/buffer_size")[2] > 0

    resumed = dapo_trainer(tiny_model_path, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    resumed_losses, losses = logged(resumed, "loss"), logged(uninterrupted, "loss")
    assert len(resumed_losses) == len(losses) == 6
    assert max(abs(a - b) for a, b in zip(resumed_losses[3:], losses[3:], strict=True)) <= 1e-6
    expected = dict(uninterrupted.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert (param - expected[name]).abs().max().item() <= 1e-6, name
    assert logged(resumed, "dynamic_sampling/rounds")[3:] == logged(uninterrupted, "dynamic_sampling/rounds")[3:]


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp_baseline"])
def test_other_estimators_see_the_filtered_batch(estimator, tiny_model_path, tmp_path):
    """Group estimators run per round (on whole groups); REINFORCE++-baseline's global whitening runs on the batch
    that is trained, after filtering and buffering, so its statistics are those of the trained tokens."""
    args = ds_config(tmp_path, max_steps=2, advantage_estimator=estimator)
    trainer = on_prompts(tiny_model_path, args)
    trainer.train()
    assert sum(step["metrics"]["rounds"] for step in trainer.steps) > len(trainer.steps)  # filtering happened
    for step in trainer.steps:
        batch = step["batch"]
        rewards = torch.tensor(signal_reward(*zip(*decode_rows(trainer.processing_class, batch), strict=True)))
        centered = rewards.view(-1, GROUP_SIZE) - rewards.view(-1, GROUP_SIZE).mean(dim=1, keepdim=True)
        assert (centered.abs().amax(dim=1) > 0).all()  # no zero-variance group
        if estimator == "rloo":
            # A_i = r_i - mean of the 3 others = 4/3 (r_i - mean_g r), from the row's own (re-scored) reward
            assert_close(batch["advantages"], (4 / 3 * centered).flatten(), atol=1e-5, rtol=0)
        else:
            # token advantages: r_i - mean_g r on every valid token, z-scored over the valid tokens of THIS batch
            mask = batch["completion_mask"].float()
            tokens = centered.flatten().unsqueeze(1) * mask
            mean = tokens.sum() / mask.sum()
            std = (((tokens - mean) ** 2 * mask).sum() / mask.sum()).sqrt()
            assert_close(batch["advantages"], (tokens - mean) / std * mask, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Exhaustion of max_num_gen_batches
# ---------------------------------------------------------------------------------------------------------------------


def test_exhaustion_trains_nothing_with_every_group_masked(tiny_model_path, tmp_path, caplog):
    reward = ConstantReward()
    trainer = on_prompts(tiny_model_path, ds_config(tmp_path, max_steps=1, max_num_gen_batches=2), reward=reward)
    weights_before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        trainer.train()
    assert reward.calls == 2  # exactly max_num_gen_batches rounds, then it stops
    (step,) = trainer.steps
    assert step["metrics"]["rounds"] == 2
    assert step["metrics"]["groups_generated"] == 8
    assert step["metrics"]["groups_kept"] == 0
    assert step["metrics"]["groups_masked"] == 4
    assert step["metrics"]["zero_std_fraction"] == 1.0
    assert step["batch"]["completion_ids"].size(0) == 16  # still a full batch
    assert step["batch"]["completion_mask"].sum().item() == 0
    assert step["batch"]["num_items_in_batch"].item() == 0
    assert trainer.micro_batch_losses == [0.0, 0.0]
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["loss"] == 0.0 and log["dynamic_sampling/groups_masked"] == 4.0
    # a fully masked batch leaves the model as it was (no weight decay by default)
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value.detach(), weights_before[name]), name
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("max_num_gen_batches" in message and "masked" in message for message in warnings), warnings


def test_exhaustion_masks_only_the_missing_groups(tiny_model_path, tmp_path):
    # one round per generation, off-policy (TRL computes the old log-probs): about half the 4 groups are valid
    args = ds_config(
        tmp_path, max_steps=4, max_num_gen_batches=1, gradient_accumulation_steps=1, steps_per_generation=2
    )
    assert args.has_old_log_probs and args.generation_batch_size == 16
    trainer = on_prompts(tiny_model_path, args)
    trainer.train()
    assert len(trainer.steps) == 2  # 4 optimizer steps, 2 micro-batches per generation
    partly_masked = 0
    for step in trainer.steps:
        metrics, batch = step["metrics"], step["batch"]
        assert metrics["rounds"] == 1
        assert metrics["groups_kept"] + metrics["groups_masked"] == 4
        assert batch["completion_ids"].size(0) == 16
        partly_masked += 0 < metrics["groups_masked"] < 4
        group_masks = batch["completion_mask"].view(4, GROUP_SIZE, -1).sum(dim=(1, 2))
        num_kept = metrics["groups_kept"]
        # valid groups first, then the masked (filler) groups
        assert (group_masks[:num_kept] > 0).all() and (group_masks[num_kept:] == 0).all()
        for group_index, group in enumerate(groups_of(decode_rows(trainer.processing_class, batch))):
            rewards = signal_reward(*zip(*group, strict=True))
            # kept groups have signal; masked groups are the zero-variance ones (no valid group was thrown away)
            assert (max(rewards) > min(rewards)) == (group_index < num_kept), (group_index, group, rewards)
        assert batch["num_items_in_batch"].item() == batch["completion_mask"].sum().item() > 0
        assert batch["old_per_token_logps"].shape == batch["completion_ids"].shape
    assert partly_masked > 0
    assert trainer.micro_batch_rows == [8] * 4
    assert all(math.isfinite(loss) for loss in trainer.micro_batch_losses)


def test_exhaustion_raises_when_strict(tiny_model_path, tmp_path):
    reward = ConstantReward()
    trainer = on_prompts(
        tiny_model_path,
        ds_config(tmp_path, max_steps=1, max_num_gen_batches=2, dynamic_sampling_strict=True),
        reward=reward,
        trainer_class=GRPOTrainer,
    )
    with pytest.raises(RuntimeError, match="max_num_gen_batches"):
        trainer.train()
    assert reward.calls == 2


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU)
# ---------------------------------------------------------------------------------------------------------------------

TIMEOUT_S = 240  # a normal run takes ~20 s on 2 CPU cores; running past this means a deadlock


@pytest.fixture(scope="module")
def two_process_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic-sampling-2proc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(CHECK_SCRIPT), "--model", tiny_model_path, "--out", str(out)]
    returncode, output = run_isolated(command, TIMEOUT_S)
    assert returncode == 0, output[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _check_global_rows(step, num_groups):
    rows = step["global_rows"]
    assert len(rows) == num_groups * GROUP_SIZE
    assert [row["rank"] for row in rows] == [0] * 6 + [1] * 6  # rank 0's slice, then rank 1's
    groups = groups_of(rows)
    assert {row["rank"] for row in groups[1]} == {0, 1}  # group 1 straddles the two processes
    masked_groups = 0
    for group in groups:
        assert len({row["prompt"] for row in group}) == 1, group  # a group's rows belong together
        masks = {row["masked"] for row in group}
        assert len(masks) == 1, group  # a group is masked whole or not at all
        rewards = [row["reward"] for row in group]
        if masks == {True}:
            masked_groups += 1
            assert max(rewards) == min(rewards), group  # only zero-variance groups fill a short batch
        else:
            assert max(rewards) > min(rewards), f"zero-variance group trained: {group}"
    assert masked_groups == step["metrics"]["groups_masked"]


def test_two_processes_filter_identically(two_process_run):
    rank0, rank1 = two_process_run
    assert rank0["world_size"] == rank1["world_size"] == 2
    run0, run1 = rank0["signal"], rank1["signal"]
    assert run0["error"] is None and run1["error"] is None
    assert len(run0["steps"]) == len(run1["steps"]) == 3
    for step0, step1 in zip(run0["steps"], run1["steps"], strict=True):
        assert step0["num_rows"] == step1["num_rows"] == 6  # per_device_train_batch_size * steps_per_generation
        # each process pads its own rows (widths may differ), but every per-row tensor has the same row count
        assert all(shape[0] == 6 for shape in [*step0["shapes"].values(), *step1["shapes"].values()])
        assert step0["shapes"].keys() == step1["shapes"].keys()
        assert step0["metrics"] == step1["metrics"]  # rounds, kept, from buffer, ... decided from gathered data
        assert step0["global_rows"] == step1["global_rows"]
        assert step0["metrics"]["groups_masked"] == 0 and step0["metrics"]["groups_kept"] == 3
        assert step0["num_items_in_batch"] == step1["num_items_in_batch"] == step0["global_loss_tokens"]
        _check_global_rows(step0, num_groups=3)
    assert any(step["metrics"]["rounds"] > 1 for step in run0["steps"])
    assert any(step["metrics"]["groups_from_buffer"] > 0 for step in run0["steps"])
    assert run0["micro_batch_rows"] == run1["micro_batch_rows"] == [6] * 3
    assert all(math.isfinite(loss) for loss in run0["micro_batch_losses"] + run1["micro_batch_losses"])


def test_two_processes_exhaustion_masks_every_group(two_process_run):
    for rank in two_process_run:
        run = rank["exhausted"]
        assert run["error"] is None
        (step,) = run["steps"]
        assert step["metrics"]["rounds"] == 2 and step["metrics"]["groups_masked"] == 3
        assert step["num_rows"] == 6 and step["num_items_in_batch"] == 0
        _check_global_rows(step, num_groups=3)
        assert run["micro_batch_losses"] == [0.0]


def test_two_processes_strict_exhaustion_raises_on_both(two_process_run):
    for rank in two_process_run:
        run = rank["strict"]
        assert run["error"] is not None and "max_num_gen_batches" in run["error"]
        assert run["steps"] == []


def test_two_processes_resume_continues_exactly_like_an_uninterrupted_run(two_process_run):
    """The extra-prompt stream is sharded like the training dataloader; every process takes the same number of its
    batches, so its position, saved once by the main process, is every process's."""
    for rank in two_process_run:
        run = rank["resume"]
        uninterrupted, resumed = run["uninterrupted"], run["resumed"]
        assert len(uninterrupted["losses"]) == len(resumed["losses"]) == 4  # the resumed history starts with 2 saved
        assert max(abs(a - b) for a, b in zip(resumed["losses"][2:], uninterrupted["losses"][2:], strict=True)) <= 1e-6
        assert run["max_weight_difference"] <= 1e-6
        assert resumed["rounds"] == uninterrupted["rounds"]
        assert resumed["stream"] == uninterrupted["stream"]
        batches_taken = int(sum(uninterrupted["rounds"][:2])) - 2  # every round after a step's first takes a batch
        assert 0 < batches_taken < 5  # the checkpoint is inside the stream's first epoch (5 batches of 3 prompts)
        assert run["saved_stream"] == {"epoch": 0, "batches_taken": batches_taken}
    assert two_process_run[0]["resume"]["resumed"]["stream"] == two_process_run[1]["resume"]["resumed"]["stream"]


# ---------------------------------------------------------------------------------------------------------------------
# Selective rollout on one and two processes (the `selective` scenario of check_dynamic_sampling.py)
# ---------------------------------------------------------------------------------------------------------------------

SELECTIVE_STEPS = 8
SELECTIVE_OUTCOMES = {"a": UNSOLVED, "b": SIGNAL, "c": SOLVED}  # by the prompt's first letter (`selective_reward`)


@pytest.fixture(scope="module")
def selective_runs(tiny_model_path, tmp_path_factory):
    """{"single": [rank 0], "two": [rank 0, rank 1]}: each rank's `selective` results (its json) with the states of
    its selective-rollout generator after every step (its .pt) under "generator_states"."""
    root = tmp_path_factory.mktemp("selective-rollout-2proc")
    script = [str(CHECK_SCRIPT), "--model", tiny_model_path, "--scenarios", "selective", "--out"]
    commands = {
        "single": [sys.executable, *script, str(root / "single")],
        "two": [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *script,
            str(root / "two"),
        ],
    }
    runs = {}
    for name, command in commands.items():
        returncode, output = run_isolated(command, TIMEOUT_S)
        assert returncode == 0, f"{name} run exited {returncode}:\n{output[-6000:]}"
        num_ranks = 1 if name == "single" else 2
        runs[name] = []
        for rank in range(num_ranks):
            summary = json.loads((root / name / f"rank{rank}.json").read_text())
            tensors = torch.load(root / name / f"rank{rank}.pt", weights_only=True)
            assert summary["world_size"] == num_ranks and summary["failures"] == []
            runs[name].append({**summary["selective"], **tensors["selective"]})
    return runs


def _skipped(run):
    return [step["metrics"]["selective_rollout/prompts_skipped"] for step in run["steps"]]


@requires_gloo
def test_two_processes_selective_rollout_state_is_identical_on_every_process(selective_runs):
    """History, exploration probabilities, reward range and the decision generator's state are the same on both
    processes after every step; so are the skip counts, the generated rounds, and the rows each process trains on."""
    rank0, rank1 = selective_runs["two"]
    assert (rank0["rank"], rank1["rank"]) == (0, 1) and rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["steps"]) == len(rank1["steps"]) == SELECTIVE_STEPS
    for step0, step1 in zip(rank0["steps"], rank1["steps"], strict=True):
        assert step0["state"] == step1["state"]
        assert step0["metrics"] == step1["metrics"]  # prompts_skipped, exploration_*, zero_variance_fraction ...
        assert step0["rounds"] == step1["rounds"]  # gathered prompts of every round: the same global batch
        assert step0["num_rows"] == step1["num_rows"] == 6  # 12 rows, 3 groups of 4, halved
    assert torch.equal(rank0["generator_states"], rank1["generator_states"])  # same draws: same skip decisions
    assert len(rank0["generator_states"]) == SELECTIVE_STEPS
    assert not torch.equal(rank0["generator_states"][0], rank0["generator_states"][-1])  # it drew along the way
    # not vacuous: prompts were skipped (none in the first epoch, when no prompt has a history yet)
    assert _skipped(rank0) == _skipped(rank1)
    assert _skipped(rank0)[:3] == [0, 0, 0] and sum(_skipped(rank0)) > 0
    final = rank0["steps"][-1]["state"]
    assert set(final["history"]) == {prompt_key(prompt) for prompt in SELECTIVE_PROMPTS}
    assert final["reward_range"] == [0.0, 3.0]


@requires_gloo
def test_two_processes_selective_rollout_history_follows_the_generated_groups(selective_runs):
    """The recorded history is each generated prompt's streak of one zero-variance kind, replayed here from the
    gathered rounds; and the skipped prompts are zero-variance ones (the zero-variance share drops)."""
    rank0 = selective_runs["two"][0]
    history = {}
    for step in rank0["steps"]:
        (prompts,) = step["rounds"]  # no dynamic sampling: one round per step, its 12 prompts gathered
        assert len(prompts) == 12
        zero_variance = 0
        for group in groups_of(prompts, SELECTIVE_GROUP_SIZE):
            assert len(set(group)) == 1, group
            outcome = SELECTIVE_OUTCOMES[group[0][0]]
            previous, streak = history.get(prompt_key(group[0]), (SIGNAL, 0))
            streak = 0 if outcome == SIGNAL else (streak + 1 if previous == outcome else 1)
            history[prompt_key(group[0])] = [outcome, streak]
            zero_variance += outcome != SIGNAL
        assert step["state"]["history"] == history
        assert step["metrics"]["sampling/zero_variance_fraction"] == pytest.approx(zero_variance / 3)
    zero_variance_share = [step["metrics"]["sampling/zero_variance_fraction"] for step in rank0["steps"]]
    first_epoch, later = zero_variance_share[:3], zero_variance_share[3:]
    assert sum(first_epoch) / 3 == pytest.approx(6 / 9)  # every prompt once: 6 of the 9 are zero-variance
    assert sum(later) / len(later) < 6 / 9 - 0.2  # skipping shifts the generated groups to `b` prompts
    assert max(streak for _, streak in history.values()) >= 2


@requires_gloo
def test_two_processes_selective_rollout_decides_like_one_process(selective_runs):
    """Decisions are made on gathered keys and rewards with a generator seeded alike everywhere, and the rewards here
    depend only on the prompt and the row's global position, so 2 processes over the same global batches reproduce
    the 1-process run: the same rounds, history, exploration probabilities, skip counts and generator state."""
    (single,) = selective_runs["single"]
    rank0 = selective_runs["two"][0]
    assert single["world_size"] == 1 and len(single["steps"]) == SELECTIVE_STEPS
    for one, two in zip(single["steps"], rank0["steps"], strict=True):
        assert one["rounds"] == two["rounds"]
        assert one["state"] == two["state"]
        assert one["metrics"] == two["metrics"]
        assert one["num_rows"] == 12 == 2 * two["num_rows"]
    assert torch.equal(single["generator_states"], rank0["generator_states"])
    assert _skipped(single) == _skipped(rank0) and sum(_skipped(single)) > 0
