"""PPO and VAPO with `use_vllm=True` (`trl_plus.trainer.vllm_sync`), without vLLM installed.

What runs for real: TRL's `GRPOTrainer.__init__` building its `VLLMGeneration`, TRL's weight sync
(`VLLMGeneration.sync_weights` / `_iter_named_params`: PEFT merge, names, unmerge) and, in the end-to-end runs, TRL's
generation call sites, its importance-sampling correction and our loss. What is stood in for: vLLM itself, i.e.
`VLLMGeneration._init_vllm` (which would start the engine) and `VLLMGeneration.generate` (vLLM's sampling). The
stand-in engine is a plain causal LM of the tiny model's architecture: vLLM's `load_weights` is a strict copy into its
parameters by name (an unknown name raises, as vLLM's Qwen2 loader does) and `generate` samples from it and returns its
log-probs, so the importance-sampling ratio compares the trained policy with exactly what the sync delivered.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_config
from datasets import Dataset
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, set_seed
from trl.generation.vllm_generation import VLLMGeneration

from trl_plus.trainer.ppo import PPOConfig, PPOTrainer, VAPOConfig, VAPOTrainer

LETTERS = "abcdefgh"
PROMPTS = [f"{letter * 3}=" for letter in LETTERS for _ in range(8)]


def letter_reward(prompts, completions, **kwargs):
    """The prompt letter's index over 7: deterministic from the prompt, so the critic has something to learn."""
    return [LETTERS.index(prompt[0]) / 7 for prompt in prompts]


def lora() -> LoraConfig:
    # init_lora_weights=False: B is random, so a merged adapter differs from the base weights
    return LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)


class StandInEngine:
    """vLLM's model as TRL's sync sees it (`load_weights`), holding a plain causal LM that generation samples from."""

    def __init__(self, model_path: str):
        self.causal_lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.received: list[tuple[str, torch.Tensor]] = []  # every (name, tensor) of every sync, in order

    def load_weights(self, weights):
        params = dict(self.causal_lm.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM's model has no parameter {name!r}")
            self.received.append((name, tensor.detach().clone()))
            params[name].data.copy_(tensor)


class StandInClient:
    """`VLLMClient` in server mode: records what `update_named_params` streams, loads it into the engine."""

    def __init__(self, engine: StandInEngine):
        self.engine = engine
        self.metadata = None

    def update_named_params(self, metadata, named_params):
        self.metadata = metadata
        self.engine.load_weights(named_params)

    def reset_prefix_cache(self):
        pass

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}


@pytest.fixture
def stand_in_vllm(monkeypatch, tiny_model_path):
    """Patch vLLM out of TRL's `VLLMGeneration`; yields the list of the engines it built."""
    engines = []

    def init_vllm(self):
        engine = StandInEngine(tiny_model_path)
        engines.append(engine)
        runner = SimpleNamespace(model=engine)
        self.llm = SimpleNamespace(
            llm_engine=SimpleNamespace(
                model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
            ),
            reset_prefix_cache=lambda: None,
        )
        if self.mode == "server":
            self.vllm_client = StandInClient(engine)

    def generate(self, prompts, images, num_generations, profiler=None):
        """One sampled completion per (already repeated) prompt, from the engine's weights, with its log-probs."""
        lm = engines[-1].causal_lm
        eos = lm.generation_config.eos_token_id
        completions, logprobs = [], []
        with torch.no_grad():
            for ids in prompts:
                input_ids = torch.tensor([ids])
                output = lm.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=self.temperature,
                    max_new_tokens=self.max_completion_length,
                    pad_token_id=lm.generation_config.pad_token_id,
                )
                completion = output[0, len(ids) :].tolist()
                if eos in completion:
                    completion = completion[: completion.index(eos) + 1]
                logits = lm(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1] / self.temperature
                token_logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])
                completions.append(completion)
                logprobs.append([[value] for value in token_logprobs.squeeze(-1).tolist()])
        return prompts, completions, logprobs, None

    monkeypatch.setattr(VLLMGeneration, "_init_vllm", init_vllm)
    monkeypatch.setattr(VLLMGeneration, "generate", generate)
    return engines


def make_trainer(model_path, output_dir, config_class=PPOConfig, peft=True, **overrides):
    overrides.setdefault("num_generations", 1)
    args = make_config(config_class, output_dir, use_vllm=True, **overrides)
    trainer_class = VAPOTrainer if config_class is VAPOConfig else PPOTrainer
    return trainer_class(
        model_path,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=lora() if peft else None,
    )


def policy_only_merge(model_path, policy_state: dict) -> dict[str, torch.Tensor]:
    """What vLLM must hold, computed without the trainer: a fresh base with only the policy adapter, merged."""
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), lora())
    set_peft_model_state_dict(fresh, policy_state)
    merged = fresh.merge_and_unload()
    return {name: param.detach() for name, param in merged.named_parameters()}  # tied weights once, as vLLM takes


def snapshot(model) -> dict[str, tuple[torch.Tensor, bool]]:
    return {name: (param.detach().clone(), param.requires_grad) for name, param in model.named_parameters()}


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("active_during_sync", ["default", "critic"])
def test_sync_sends_only_the_policy_merged_into_the_base(
    stand_in_vllm, tiny_model_path, tmp_path, mode, active_during_sync
):
    trainer = make_trainer(tiny_model_path, tmp_path, vllm_mode=mode)
    model = trainer.model
    with torch.no_grad():  # a critic head that is not a fresh init, so that leaking it would show
        model.value_head.weight.normal_()
    model.set_adapter(active_during_sync)
    trainer._restore_trainable()
    before = snapshot(model)
    policy_state = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
    critic_state = get_peft_model_state_dict(model, adapter_name="critic")
    assert all(not torch.equal(critic_state[name], policy_state[name]) for name in policy_state)

    trainer.vllm_generation.sync_weights()

    engine = stand_in_vllm[-1]
    expected = policy_only_merge(tiny_model_path, policy_state)
    received = dict(engine.received)
    assert len(engine.received) == len(received)  # each name once
    assert list(received) == list(expected)  # the base model's names, in its order: no value head, no LoRA
    for name, tensor in expected.items():
        assert_close(received[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    if mode == "server":  # the names announced to the server before streaming
        assert [entry[0] for entry in trainer.vllm_generation.vllm_client.metadata] == list(expected)
    # The trained model is as it was: same modules, same active adapter and trainable flags, the critic untouched.
    assert model.active_adapter == active_during_sync
    after = snapshot(model)
    assert list(after) == list(before)
    for name, (tensor, requires_grad) in before.items():
        assert after[name][1] == requires_grad, name
        if ".base_layer." in name:  # merged then unmerged: TRL's sync leaves float round-off in the base
            assert_close(after[name][0], tensor, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(after[name][0], tensor), name


def test_sync_of_a_full_policy_leaves_the_value_model_out(stand_in_vllm, tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, peft=False, value_model=tiny_model_path)
    model = trainer.model
    shift = {}
    with torch.no_grad():  # move the policy and the value model away from the checkpoint, each differently
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            delta = 0.01 * torch.randn(param.shape, generator=generator)
            param.add_(delta)
            shift[name] = delta
    before = snapshot(model)

    trainer.vllm_generation.sync_weights()

    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    expected = {name: param.detach() + shift[name] for name, param in checkpoint.named_parameters()}
    received = dict(stand_in_vllm[-1].received)
    assert list(received) == list(expected)
    assert not any(name.startswith("value_model.") for name in received)
    for name, tensor in expected.items():
        assert_close(received[name], tensor, msg=name)
    after = snapshot(model)
    assert list(after) == list(before)
    for name, (tensor, requires_grad) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == requires_grad, name


@pytest.mark.parametrize(
    ("config_class", "overrides"),
    [
        (PPOConfig, {}),  # k1 KL in the reward: the registry's PPO clip loss
        (VAPOConfig, {"value_pretrain_steps": 0, "num_generations": 4}),  # no KL: TRL's "dapo" loss, positive LM
    ],
)
def test_ppo_trains_end_to_end_on_vllm_completions(stand_in_vllm, tiny_model_path, tmp_path, config_class, overrides):
    """Two optimizer steps on the stand-in engine's completions, each after a sync: the importance-sampling ratio
    between the trained policy and the engine's log-probs is 1 at every step (the engine held exactly the policy,
    also after the first update), the loss is finite and policy and critic both move."""
    set_seed(0)
    trainer = make_trainer(tiny_model_path, tmp_path, config_class=config_class, max_steps=2, **overrides)
    start = snapshot(trainer.model)
    trainer.train()

    engine = stand_in_vllm[-1]
    num_names = len(list(engine.causal_lm.named_parameters()))
    assert len(engine.received) == 2 * num_names  # one sync per optimizer step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        assert abs(entry["sampling/importance_sampling_ratio/min"] - 1) < 1e-4
        assert abs(entry["sampling/importance_sampling_ratio/max"] - 1) < 1e-4
        assert entry["sampling/sampling_logp_difference/max"] < 1e-4
    second_sync = dict(engine.received[num_names:])
    first_sync = dict(engine.received[:num_names])
    assert max((second_sync[n] - first_sync[n]).abs().max().item() for n in first_sync) > 1e-4  # step 1 moved it
    end = snapshot(trainer.model)
    moved = {name for name in start if not torch.equal(start[name][0], end[name][0])}
    assert any(".default." in name for name in moved)
    assert any(".critic." in name for name in moved) and any(name.startswith("value_head.") for name in moved)


def test_importance_sampling_ratio_weights_each_token_of_the_policy_loss(stand_in_vllm, tiny_model_path, tmp_path):
    """TRL's correction multiplies the per-token policy loss by the ratio, also with PPO's `(B, T)` advantages; the
    value loss is not reweighted. Two checks on one rollout: a ratio of 0.5 everywhere halves every policy gradient
    and leaves the critic's; a ratio that is 1 on row 0 and 0 elsewhere gives the policy gradient of row 0 alone (the
    other rows masked out of the loss, the same token normalizer)."""
    trainer = make_trainer(
        tiny_model_path, tmp_path, vllm_importance_sampling_mode="token_truncate", per_device_train_batch_size=4
    )
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    set_seed(0)
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert batch["importance_sampling_ratio"].shape == batch["completion_ids"].shape
    assert batch["advantages"].shape == batch["completion_ids"].shape

    def gradients(ratio, completion_mask=None):
        inputs = {**batch, "importance_sampling_ratio": ratio}
        if completion_mask is not None:
            inputs["completion_mask"] = completion_mask
        model.zero_grad(set_to_none=True)
        trainer._compute_loss(model, inputs).backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        policy = {name: grad for name, grad in grads.items() if ".default." in name}
        critic = {name: grad for name, grad in grads.items() if name not in policy}
        return policy, critic

    ones = torch.ones_like(batch["advantages"])
    policy, critic = gradients(ones)
    assert len(policy) == 8 and len(critic) == 10  # LoRA A/B on 2 modules x 2 layers; + the value head
    half_policy, half_critic = gradients(0.5 * ones)
    for name, grad in policy.items():
        assert grad.abs().sum() > 0, name
        assert_close(half_policy[name], 0.5 * grad, rtol=1e-5, atol=1e-8, msg=name)
    for name, grad in critic.items():
        assert_close(half_critic[name], grad, rtol=1e-6, atol=1e-9, msg=name)

    row0 = torch.zeros_like(ones)
    row0[0] = 1.0
    row0_policy, _ = gradients(row0)
    alone_policy, _ = gradients(ones, completion_mask=batch["completion_mask"] * row0.int())
    for name, grad in alone_policy.items():
        assert_close(row0_policy[name], grad, rtol=1e-5, atol=1e-8, msg=name)
    assert any(not torch.allclose(row0_policy[name], policy[name]) for name in policy)
