"""Classic RLHF in `PPOTrainer`: a reward model trained by TRL's `RewardTrainer` as the reward and as the critic's
initialization (its own LoRA adapter when the policy is LoRA), reward normalization and clipping, and PPO-ptx.

The policy is the tiny Qwen2 of `conftest.py`; prompts and helpers come from `test_ppo.py`.
"""

import json
import math
import re
import runpy
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_config, requires_gloo, run_one_and_two_processes
from datasets import Dataset
from peft import PeftModel
from test_ppo import LETTERS, letter_reward, lora, rollout
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from trl_plus.algos.running_stats import batch_moments, merge_moments
from trl_plus.trainer import lora_value_model
from trl_plus.trainer.checkpoints import MissingCheckpointFileError, UnreadableCheckpointFileError
from trl_plus.trainer.ppo import PPO_STATE_FILE, VALUE_MODEL, PPOConfig, PPOTrainer
from trl_plus.trainer.ptx import PtxStream, lm_nll_sum

PTX_CHECK_SCRIPT = Path(__file__).parent / "distributed" / "check_ptx.py"

PTX_TEXTS = [f"{letter * (1 + i % 5)} {i}" for i, letter in enumerate(LETTERS * 8)]  # 64 texts of varied length


@pytest.fixture(scope="module")
def reward_model_path(tiny_model_path, tmp_path_factory):
    """A reward model trained for a few steps by TRL's RewardTrainer (Bradley-Terry) from the tiny model."""
    out = tmp_path_factory.mktemp("reward-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    pairs = Dataset.from_dict(
        {
            "prompt": [f"{letter * 3}=" for letter in LETTERS],
            "chosen": ["123"] * len(LETTERS),
            "rejected": ["abc"] * len(LETTERS),
        }
    )
    args = RewardConfig(
        output_dir=str(out / "run"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out / "model"))
    return str(out / "model")


@pytest.fixture
def dataset():
    return Dataset.from_dict({"prompt": [f"{letter * 3}=" for letter in LETTERS for _ in range(8)]})


def rlhf_trainer(model_path, reward, value_model, dataset, output_dir, ptx_dataset=None, peft=True, **overrides):
    overrides.setdefault("num_generations", 1)
    args = make_config(PPOConfig, output_dir, **overrides)
    return PPOTrainer(
        model_path,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        peft_config=lora() if peft else None,
        value_model=value_model,
        ptx_dataset=ptx_dataset,
    )


def reward_model_scores(path: str, prompt_ids, completion_ids, tokenizer) -> torch.Tensor:
    """The reward model's score of every (prompt, completion) text, one text at a time (no padding)."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    texts = [
        tokenizer.decode(p, skip_special_tokens=True) + tokenizer.decode(c, skip_special_tokens=True)
        for p, c in zip(prompt_ids, completion_ids, strict=True)
    ]
    with torch.no_grad():
        return torch.tensor([model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts])


# ------------------------------------------------------------------------------------- reward model and critic


def test_reward_model_scores_the_rollout_and_initializes_a_lora_critic_of_its_own(
    reward_model_path, tiny_model_path, dataset, tmp_path
):
    trainer = rlhf_trainer(tiny_model_path, reward_model_path, reward_model_path, dataset, tmp_path, max_steps=2)
    value_model = getattr(trainer.model, VALUE_MODEL)
    assert isinstance(value_model, PeftModel) and list(value_model.peft_config) == [lora_value_model.ADAPTER_NAME]
    critic_names = {
        name for name, p in trainer.model.named_parameters() if any(p is c for c in trainer._critic_params)
    }
    # Only the value model's LoRA matrices (q_proj and v_proj of 2 layers, A and B) and its score head train; the
    # reward model's path loads as token classification, whose head has a bias the reward model lacks (set to 0).
    assert len(critic_names) == 2 * 2 * 2 + 2 and all(n.startswith(f"{VALUE_MODEL}.") for n in critic_names)
    assert all(".lora_" in n or n.endswith(("score.weight", "score.bias")) for n in critic_names)
    frozen_base = {n: p.detach().clone() for n, p in value_model.named_parameters() if not p.requires_grad}
    assert frozen_base  # the reward model's body stays frozen

    batch = rollout(trainer)
    expected = reward_model_scores(
        reward_model_path, batch["prompt_ids"], batch["completion_ids"], trainer.processing_class
    )
    assert batch["scores"] == pytest.approx(expected, abs=1e-4)
    assert batch["scores"].dtype == torch.float32 and batch["old_values"].shape == batch["completion_ids"].shape
    # At initialization (LoRA B = 0) V(s_t) is the reward model's score of the prefix that predicts token t.
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    for row, t in [(0, 0), (1, 3)]:
        prefix = torch.cat([batch["prompt_ids"][row], batch["completion_ids"][row, :t]]).unsqueeze(0)
        with torch.no_grad():
            score = reward_model(input_ids=prefix).logits[0, 0].item()
        assert batch["old_values"][row, t].item() == pytest.approx(score, abs=1e-5)

    head_before = value_model.get_base_model().score.weight.detach().clone()
    trainer.train()
    assert (value_model.get_base_model().score.weight - head_before).abs().max() > 0
    lora_b = [p for n, p in value_model.named_parameters() if "lora_B" in n]
    assert max(p.abs().max().item() for p in lora_b) > 0
    for name, param in value_model.named_parameters():
        if name in frozen_base:
            assert torch.equal(param, frozen_base[name]), name


def test_lora_value_model_is_saved_apart_from_the_policy_adapters_and_resumed(
    reward_model_path, tiny_model_path, dataset, tmp_path
):
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1)
    first = rlhf_trainer(tiny_model_path, reward_model_path, reward_model_path, dataset, tmp_path / "a", **settings)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    saved = safetensors.torch.load_file(checkpoint / VALUE_MODEL / lora_value_model.STATE_FILE)
    assert len(saved) == 10 and not (checkpoint / VALUE_MODEL / "adapter_model.safetensors").exists()

    resumed = rlhf_trainer(tiny_model_path, reward_model_path, reward_model_path, dataset, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = lora_value_model.trainable_state(getattr(resumed.model, VALUE_MODEL))
    expected = lora_value_model.trainable_state(getattr(first.model, VALUE_MODEL))
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5, msg=name)

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / VALUE_MODEL / lora_value_model.STATE_FILE).unlink()
    third = rlhf_trainer(tiny_model_path, reward_model_path, reward_model_path, dataset, tmp_path / "c", **settings)
    with pytest.raises(MissingCheckpointFileError, match=re.escape(f"`{VALUE_MODEL}/{lora_value_model.STATE_FILE}`")):
        third.train(resume_from_checkpoint=str(damaged))


# ------------------------------------------------------------------------------ reward normalization and clipping


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(reward_clip=0.0), "`reward_clip` is 0.0; valid: a finite number > 0"),
        (dict(reward_clip=float("inf")), "`reward_clip` is inf; valid"),
        (dict(ptx_coef=-1.0), "`ptx_coef` is -1.0; valid: a finite number >= 0"),
        (dict(ptx_batch_size=0), "`ptx_batch_size` is 0; valid"),
        (dict(ptx_max_length=1), "`ptx_max_length` is 1; valid"),
    ],
)
def test_invalid_rlhf_options_raise_at_construction(tmp_path, overrides, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make_config(PPOConfig, tmp_path, num_generations=1, **overrides)


def spread_reward(prompts, completions, **kwargs):
    """10 * the letter's index + 3: a wide, shifted score, as a reward model's raw logits can be."""
    return [10.0 * LETTERS.index(prompt[0]) + 3.0 for prompt in prompts]


def test_reward_normalization_uses_running_moments_clips_and_resumes(tiny_model_path, dataset, tmp_path):
    clip = 1.2
    trainer = rlhf_trainer(
        tiny_model_path, spread_reward, None, dataset, tmp_path, normalize_reward=True, reward_clip=clip
    )
    raw_batches = []
    for seed in (0, 1):
        batch = rollout(trainer, seed=seed)
        raw = torch.tensor(spread_reward([trainer.processing_class.decode(p) for p in batch["prompt_ids"]], None))
        raw_batches.append(raw)
        moments = (0, 0.0, 0.0)
        for seen in raw_batches:  # every training score so far, this batch included
            moments = merge_moments(moments, batch_moments(seen))
        count, mean, m2 = moments
        expected = ((raw - mean) / (math.sqrt(m2 / count) + 1e-8)).clamp(-clip, clip)
        assert batch["scores"] == pytest.approx(expected, abs=1e-5)
        assert trainer._metrics["train"]["reward_norm/mean"][-1] == pytest.approx(mean)
        assert trainer._metrics["train"]["reward_norm/clipfrac"][-1] == pytest.approx(
            (expected.abs() >= clip).float().mean().item()
        )
    assert 0 < (batch["scores"].abs() == clip).sum() < len(batch["scores"])  # the clip acted, not everywhere
    assert trainer._score_normalizer.moments.count == 16

    settings = dict(normalize_reward=True, reward_clip=clip, max_steps=2, save_strategy="steps", save_steps=1)
    run = rlhf_trainer(tiny_model_path, spread_reward, None, dataset, tmp_path / "a", **settings)
    run.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    state = json.loads((checkpoint / PPO_STATE_FILE).read_text())["reward_normalizer"]
    assert state["count"] == 8
    resumed = rlhf_trainer(tiny_model_path, spread_reward, None, dataset, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed._score_normalizer.state_dict() == pytest.approx(run._score_normalizer.state_dict())

    without = rlhf_trainer(tiny_model_path, spread_reward, None, dataset, tmp_path / "c", **settings)
    (checkpoint / PPO_STATE_FILE).write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads((checkpoint / PPO_STATE_FILE).read_text()).items()
                if k != "reward_normalizer"
            }
        )
    )
    with pytest.raises(UnreadableCheckpointFileError, match="reward_normalizer"):
        without.train(resume_from_checkpoint=str(checkpoint))


# --------------------------------------------------------------------------------------------------------- PPO-ptx


def test_ptx_arguments_must_come_together_and_need_a_text_column(tiny_model_path, dataset, tmp_path):
    with pytest.raises(ValueError, match=re.escape("`ptx_coef` is 0.5 and no `ptx_dataset` was given")):
        rlhf_trainer(tiny_model_path, letter_reward, None, dataset, tmp_path, ptx_coef=0.5)
    texts = Dataset.from_dict({"text": PTX_TEXTS})
    with pytest.raises(ValueError, match=re.escape("`ptx_coef` is 0.0, so it would never be used")):
        rlhf_trainer(tiny_model_path, letter_reward, None, dataset, tmp_path, ptx_dataset=texts)
    with pytest.raises(ValueError, match=re.escape("`ptx_dataset` has no `text` column; its columns are ['body']")):
        rlhf_trainer(
            tiny_model_path,
            letter_reward,
            None,
            dataset,
            tmp_path,
            ptx_coef=0.5,
            ptx_dataset=texts.rename_column("text", "body"),
        )


def test_ptx_stream_shards_disjointly_covers_every_text_once_per_epoch_and_resumes(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    streams = [PtxStream(PTX_TEXTS[:30], tokenizer, 4, 2, rank, seed=3) for rank in range(2)]
    assert streams[0].batches_per_epoch == 3  # 30 // 8: the last partial global batch is dropped
    epoch = [[stream.next_texts() for _ in range(3)] for stream in streams]
    for step in range(3):
        assert not set(epoch[0][step]) & set(epoch[1][step])  # the two processes never see the same text
    seen = [text for rank in epoch for batch in rank for text in batch]
    assert len(seen) == len(set(seen)) == 24
    resumed = PtxStream(PTX_TEXTS[:30], tokenizer, 4, 2, 0, seed=3)
    resumed.load_state_dict(streams[0].state_dict())  # at the end of epoch 0
    assert resumed.next_texts() == streams[0].next_texts()  # epoch 1's first batch, a new order
    assert streams[0].state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="global_batch_size=8 and this run has global_batch_size=4"):
        PtxStream(PTX_TEXTS[:30], tokenizer, 4, 1, 0, seed=3).load_state_dict(streams[1].state_dict())
    batch = PtxStream(["ab", "abcd"], tokenizer, 2, 1, 0, seed=0).next_batch()
    assert batch["attention_mask"].sum(-1).tolist() in ([2, 4], [4, 2])  # right-padded, no special tokens added


def independent_nll(model, batch) -> torch.Tensor:
    """Mean token NLL of right-padded text from the plain logits, token by token."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits.float(), -1)
    total, count = 0.0, 0
    for row in range(batch["input_ids"].size(0)):
        length = int(batch["attention_mask"][row].sum())
        for t in range(1, length):
            total -= log_probs[row, t - 1, batch["input_ids"][row, t]].item()
            count += 1
    return torch.tensor(total / count)


@pytest.mark.parametrize("critic", ["lora", "value_model"])
def test_ptx_loss_is_ppo_loss_plus_coef_times_the_text_nll(tiny_model_path, dataset, tmp_path, critic):
    coef = 0.7
    trainer = rlhf_trainer(
        tiny_model_path,
        letter_reward,
        tiny_model_path if critic == "value_model" else None,
        dataset,
        tmp_path,
        ptx_coef=coef,
        ptx_dataset=Dataset.from_dict({"text": PTX_TEXTS}),
        ptx_batch_size=3,
    )
    batch = rollout(trainer)
    position = trainer._ptx.state_dict()
    texts = PtxStream(PTX_TEXTS, trainer.processing_class, 3, 1, 0, seed=0)
    texts.load_state_dict(position)
    ptx_batch = texts.next_batch()
    expected_nll = independent_nll(trainer.model, ptx_batch)  # the policy adapter active (PEFT's default)

    with_ptx = trainer._compute_loss(trainer.model, batch).item()
    assert trainer._ptx.state_dict()["batch"] == position["batch"] + 1
    trainer._ptx.load_state_dict(position)
    trainer._ptx = None
    without_ptx = trainer._compute_loss(trainer.model, batch).item()
    assert with_ptx - without_ptx == pytest.approx(coef * expected_nll.item(), rel=1e-4)
    assert trainer._metrics["train"]["ptx/loss"][-1] == pytest.approx(expected_nll.item(), rel=1e-4)
    nll_sum, count = lm_nll_sum(
        trainer.model(**ptx_batch).logits.detach(), ptx_batch["input_ids"], ptx_batch["attention_mask"]
    )
    assert (nll_sum / count).item() == pytest.approx(expected_nll.item(), rel=1e-4)


def test_ptx_trains_logs_and_resumes_the_streams_position(tiny_model_path, dataset, tmp_path):
    settings = dict(
        ptx_coef=0.5, ptx_batch_size=2, max_steps=3, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2
    )
    texts = Dataset.from_dict({"text": PTX_TEXTS})
    run = rlhf_trainer(tiny_model_path, letter_reward, None, dataset, tmp_path / "a", ptx_dataset=texts, **settings)
    run.train()
    logged = [entry["ptx/loss"] for entry in run.state.log_history if "ptx/loss" in entry]
    assert len(logged) == 3 and all(0 < value < 10 for value in logged)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = json.loads((checkpoint / PPO_STATE_FILE).read_text())["ptx"]
    assert (saved["epoch"], saved["batch"]) == (0, 4)  # 2 steps x 2 micro-batches
    resumed = rlhf_trainer(
        tiny_model_path, letter_reward, None, dataset, tmp_path / "b", ptx_dataset=texts, **settings
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed._ptx.state_dict() == run._ptx.state_dict() == {**saved, "batch": 6}

    state = json.loads((checkpoint / PPO_STATE_FILE).read_text())
    del state["ptx"]
    (checkpoint / PPO_STATE_FILE).write_text(json.dumps(state))
    again = rlhf_trainer(tiny_model_path, letter_reward, None, dataset, tmp_path / "c", ptx_dataset=texts, **settings)
    with pytest.raises(UnreadableCheckpointFileError, match=r"expected \[[^]]*'ptx'"):
        again.train(resume_from_checkpoint=str(checkpoint))


@requires_gloo
def test_two_process_ptx_streams_are_disjoint_shards_and_reward_moments_are_global(tiny_model_path, tmp_path):
    runs = run_one_and_two_processes(PTX_CHECK_SCRIPT, tiny_model_path, tmp_path)
    ((single, _),) = runs["single"]
    (rank0, weights0), (rank1, weights1) = runs["two"]
    assert len(single["texts"]) == len(rank0["texts"]) == len(rank1["texts"]) == 2  # one micro-batch per step
    for step, texts in enumerate(single["texts"]):
        assert len(texts) == 6 and len(rank0["texts"][step]) == len(rank1["texts"][step]) == 3
        assert not set(rank0["texts"][step]) & set(rank1["texts"][step])
        assert rank0["texts"][step] + rank1["texts"][step] == texts  # the same global batch, split by rank
    assert rank0["ptx_loss"] == pytest.approx(rank1["ptx_loss"]) and len(rank0["ptx_loss"]) == 2
    # Reward normalization's moments are global: the 12 fixed rewards of each of the 2 steps, on every process.
    rewards = torch.tensor(runpy.run_path(str(PTX_CHECK_SCRIPT.parent / "fixed_batch.py"))["REWARDS"]).double()
    for moments in (single["reward_moments"], rank0["reward_moments"], rank1["reward_moments"]):
        assert moments["count"] == 24 and moments["mean"] == pytest.approx(rewards.mean().item())
        assert moments["m2"] == pytest.approx(2 * ((rewards - rewards.mean()) ** 2).sum().item())
    for name, tensor in weights0.items():  # DDP reduced the ptx gradients with the PPO ones: one model
        torch.testing.assert_close(weights1[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_ptx_with_gradient_checkpointing_gives_the_gradients_without_it(tiny_model_path, dataset, tmp_path):
    """The ptx forward runs with the policy adapter active; under gradient checkpointing its layers must recompute
    with it too, beside the critic's layers recomputing with the critic adapter (`adapter_checkpointing`)."""
    gradients = {}
    for checkpointing in (False, True):
        trainer = PPOTrainer(
            tiny_model_path,
            reward_funcs=letter_reward,
            args=make_config(
                PPOConfig,
                tmp_path / str(checkpointing),
                num_generations=1,
                ptx_coef=2.0,
                gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            ),
            train_dataset=dataset,
            peft_config=lora(init_lora_weights=False),
            ptx_dataset=Dataset.from_dict({"text": PTX_TEXTS}),
        )
        if checkpointing:  # what `Trainer.train` does
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = rollout(trainer)
        trainer._compute_loss(trainer.model, batch).backward()
        gradients[checkpointing] = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
    assert gradients[True].keys() == gradients[False].keys() and len(gradients[False]) == 8 + 10
    for name, grad in gradients[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(gradients[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)
