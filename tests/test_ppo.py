"""PPO with a critic and VAPO (`trl_plus.trainer.ppo`): configs, the LoRA critic's plumbing, rollouts, training runs,
checkpoints and a 2-process run. The pure GAE / value-loss / KL-controller math is tested in `test_value.py`.

The policy is the tiny Qwen2 of `conftest.py` with LoRA on q_proj and v_proj. The prompts are a letter repeated
three times and "=" ("aaa=" ... "hhh="), and unless a test says otherwise the reward is deterministic from the prompt
alone (`letter_reward`: the letter's index over 7), so a critic that reads the prompt can predict the return exactly
and its explained variance must rise as it learns (a repeated letter is easy to read from the hidden states; with
"a+b=" prompts the tiny critic learns too slowly for a short test). All prompts have 4 characters, so rows carry no
left padding and a prefix can be re-run alone to check a value independently.
"""

import inspect
import json
import logging
import math
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from conftest import make_config, requires_gloo, run_one_and_two_processes
from datasets import Dataset
from peft import LoraConfig
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback, set_seed

import trl_plus
from trl_plus.algos import masked_whiten
from trl_plus.algos.value import AdaptiveKLController, gae, kl_shaped_token_rewards, length_adaptive_lambda
from trl_plus.scripts.algorithms import ALGORITHMS, Algorithm
from trl_plus.trainer.checkpoints import MissingCheckpointFileError, UnreadableCheckpointFileError
from trl_plus.trainer.ppo import PPO_STATE_FILE, VALUE_HEAD_FILE, PPOConfig, PPOTrainer, VAPOConfig, VAPOTrainer

LETTERS = "abcdefgh"
PROMPTS = [f"{letter * 3}=" for letter in LETTERS for _ in range(8)]  # 64 rows: 4 training steps stay in one epoch
CHECK_SCRIPT = Path(__file__).parent / "distributed" / "check_ppo.py"
PPO_METRICS = (
    "value/loss",
    "value/clipfrac",
    "value/explained_variance",
    "value/mean",
    "kl/beta",
    "ppo/approx_kl",
    "ppo/clipfrac",
    "kl",
    "reward",
    "entropy",
    "loss",
)


def letter_reward(prompts, completions, **kwargs):
    """The prompt letter's index in "abcdefgh" over 7, in [0, 1]: deterministic from the prompt."""
    return [LETTERS.index(prompt[0]) / 7 for prompt in prompts]


def centered_letter_reward(prompts, completions, **kwargs):
    """`letter_reward` - 0.5: positive for e-h (VAPO's positive examples), negative for a-d."""
    return [LETTERS.index(prompt[0]) / 7 - 0.5 for prompt in prompts]


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, **kwargs)


@pytest.fixture
def dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


def make_trainer(
    model_path, dataset, output_dir, config_class=PPOConfig, reward=letter_reward, peft_config=None, **overrides
):
    """A PPO (or VAPO) trainer on the tiny model, one completion per prompt unless overridden, LoRA critic."""
    overrides.setdefault("num_generations", 1)
    args = make_config(config_class, output_dir, **overrides)
    trainer_class = VAPOTrainer if isinstance(args, VAPOConfig) else PPOTrainer
    value_model = overrides.get("value_model")
    if peft_config is None and value_model is None:
        peft_config = lora()
    return trainer_class(model_path, reward_funcs=reward, args=args, train_dataset=dataset, peft_config=peft_config)


def roles(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the LoRA-critic model's parameters by role, from PEFT's names alone."""
    result = {"policy": {}, "critic": {}, "base": {}}
    for name, param in trainer.model.named_parameters():
        role = "critic" if ".critic." in name or name.startswith("value_head.") else "base"
        role = "policy" if ".default." in name else role
        result[role][name] = param.detach().clone()
    return result


def rollout(trainer, seed=0) -> dict:
    """One training-mode generation batch through TRL's generation and the PPO hooks."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    set_seed(seed)
    return trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))


def completion_log_probs(model, batch) -> torch.Tensor:
    """log pi(token | prefix) of every completion token, `(B, T)`, from the model's plain logits."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    num_tokens = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -num_tokens - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def kl_free_gae(batch, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (gamma 1) with the score as the last token's reward and no KL: the rollout's (advantages, returns)."""
    mask = batch["completion_mask"].float()
    token_rewards = kl_shaped_token_rewards(batch["scores"], torch.zeros_like(mask), mask, 0.0)
    return gae(token_rewards, batch["old_values"], mask, 1.0, lam)


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


# ---------------------------------------------------------------------------------------------------------- configs


def test_config_allows_one_sample_per_prompt_and_grpo_still_refuses(tmp_path):
    args = make_config(PPOConfig, tmp_path, num_generations=1, per_device_train_batch_size=3)
    assert type(args.num_generations) is int and args.num_generations == 1
    assert args.generation_batch_size == 3  # odd: the G=1 pass through TRL's checks still divides by 1
    with pytest.raises(ValueError, match="at least 2 generations"):
        make_config(trl_plus.GRPOConfig, tmp_path, num_generations=1)
    defaults = PPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert defaults.num_generations == 1
    assert (defaults.beta, defaults.kl_in_reward, defaults.kl_estimator) == (0.05, True, "k1")
    assert (defaults.kl_target, defaults.gamma, defaults.lam) == (None, 1.0, 0.95)
    assert (defaults.lam_critic, defaults.length_adaptive_alpha) == (None, None)
    assert (defaults.whiten_advantages, defaults.vf_coef, defaults.cliprange_value) == (True, 0.1, 0.2)
    assert (defaults.value_model, defaults.value_pretrain_steps, defaults.positive_lm_coef) == (None, 0, 0.0)
    assert (defaults.value_pretrain_threshold, defaults.value_pretrain_window, defaults.value_pretrain_strict) == (
        0.5,
        5,
        False,
    )
    assert (defaults.critic_learning_rate, defaults.critic_learning_rate_ratio) == (None, None)
    assert defaults.length_adaptive_min_lambda is None  # the floor is `lam`
    assert defaults.registry_policy_loss == "ppo_clip"  # KL in the reward: the registry's PPO clip, no loss KL


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"lam_critic": 2.0}, "lam_critic"),
        ({"length_adaptive_alpha": 0.0}, "length_adaptive_alpha"),
        ({"vf_coef": -1.0}, "vf_coef"),
        ({"cliprange_value": 0.0}, "cliprange_value"),
        ({"critic_learning_rate": 0.0}, "critic_learning_rate"),
        ({"kl_target": 1.0, "beta": 0.0}, "kl_target"),
        ({"kl_target": -1.0}, "kl_target"),
        ({"kl_horizon": 0.0}, "kl_horizon"),
        ({"value_pretrain_steps": -1}, "value_pretrain_steps"),
        ({"value_pretrain_threshold": 1.5}, r"`value_pretrain_threshold` is 1.5; valid: an explained variance in \["),
        ({"value_pretrain_threshold": -0.1}, "`value_pretrain_threshold` is -0.1; valid"),
        ({"value_pretrain_window": 0}, "`value_pretrain_window` is 0; valid: a number of rollouts >= 1"),
        ({"length_adaptive_min_lambda": 1.5}, r"`length_adaptive_min_lambda` is 1.5; valid: a lambda in \[0, 1\]"),
        ({"critic_learning_rate_ratio": 0.0}, "`critic_learning_rate_ratio` is 0.0; valid: a finite number > 0"),
        ({"critic_learning_rate_ratio": float("inf")}, "`critic_learning_rate_ratio` is inf; valid"),
        ({"positive_lm_coef": -0.1}, "positive_lm_coef"),
        ({"critic_lora_r": 0}, "critic_lora_r"),
        ({"advantage_estimator": "rloo", "num_generations": 2}, "GAE"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "sum_then_normalize"),
        ({"dynamic_sampling": True}, "num_generations >= 2"),
        ({"ddp_find_unused_parameters": True}, "`ddp_find_unused_parameters` is True; valid: False or None"),
        ({"kl_estimator": "k9"}, "kl_estimator"),
    ],
)
def test_invalid_config_raises(tmp_path, overrides, words):
    with pytest.raises(ValueError, match=words):
        make_config(PPOConfig, tmp_path, **{"num_generations": 1, **overrides})


@pytest.mark.parametrize(
    ("config_class", "overrides", "pretrain_steps", "max_steps"),
    [(VAPOConfig, {"max_steps": 3}, 50, 3), (PPOConfig, {"max_steps": 4, "value_pretrain_steps": 4}, 4, 4)],
)
def test_value_pretraining_that_takes_every_step_raises_at_construction(
    tmp_path, config_class, overrides, pretrain_steps, max_steps
):
    with pytest.raises(ValueError) as excinfo:
        make_config(config_class, tmp_path, **overrides)
    assert str(excinfo.value) == (
        f"`value_pretrain_steps` is {pretrain_steps} and `max_steps` is {max_steps}: every optimizer step would train "
        "only the critic and the policy would never be updated. Set value_pretrain_steps below the number of steps "
        "(0 turns value pretraining off), or train for more steps."
    )
    assert make_config(config_class, tmp_path, **{**overrides, "value_pretrain_steps": max_steps - 1}) is not None
    assert make_config(config_class, tmp_path, **{**overrides, "max_steps": -1}).max_steps == -1  # known at train


def test_value_pretraining_that_takes_every_epoch_step_raises_when_training_starts(tiny_model_path, tmp_path):
    # 16 prompts, one completion each, 8 rows per generation batch and optimizer step: one epoch is 2 steps.
    dataset = Dataset.from_dict({"prompt": PROMPTS[:16]})
    trainer = make_trainer(
        tiny_model_path, dataset, tmp_path, max_steps=-1, num_train_epochs=1, value_pretrain_steps=2
    )
    with pytest.raises(ValueError) as excinfo:
        trainer.train()
    assert str(excinfo.value).startswith(
        "`value_pretrain_steps` is 2 and `num_train_epochs=1` makes 2 optimizer steps: every optimizer step would "
        "train only the critic"
    )
    assert trainer.state.global_step == 0
    trainer.args.value_pretrain_steps = 1  # one policy step left: the run's steps are returned as the Trainer's
    values = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    assert values[-1] == 2


def test_ddp_does_not_search_for_unused_parameters(tmp_path):
    """The critic forward runs outside DDP's forward, where DDP's unused-parameter search cannot see it."""
    assert make_config(PPOConfig, tmp_path, num_generations=1).ddp_find_unused_parameters is False
    assert make_config(trl_plus.GRPOConfig, tmp_path).ddp_find_unused_parameters is None  # GRPO: transformers decides


def test_beta_zero_turns_the_kl_off(tmp_path):
    args = make_config(PPOConfig, tmp_path, num_generations=1, beta=0.0)
    assert (args.kl_in_reward, args.kl_estimator, args.registry_policy_loss) == (False, "k3", None)


def test_vapo_config_has_the_papers_defaults_and_only_changes_defaults(tmp_path):
    args = VAPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert isinstance(args, PPOConfig)
    assert (args.lam_critic, args.lam, args.length_adaptive_alpha) == (1.0, 0.95, 0.05)
    assert (args.value_pretrain_steps, args.positive_lm_coef, args.positive_reward_threshold) == (50, 0.1, 0.0)
    # The critic warm-up: ready at explained variance 0.5 over 5 rollouts, at most the paper's 50 steps; the critic's
    # learning rate twice the actor's (arXiv 2504.05118: 1e-6 / 2e-6); short completions keep lambda >= lam.
    assert (args.value_pretrain_threshold, args.value_pretrain_window, args.value_pretrain_strict) == (0.5, 5, False)
    assert (args.critic_learning_rate, args.critic_learning_rate_ratio) == (None, 2.0)
    assert args.length_adaptive_min_lambda is None
    assert (args.epsilon, args.epsilon_high, args.loss_type, args.num_generations) == (0.2, 0.28, "dapo", 4)
    assert (args.beta, args.kl_in_reward) == (0.0, False)
    assert set(VAPOConfig.__dataclass_fields__) == set(PPOConfig.__dataclass_fields__)
    assert VAPOTrainer.config_class is VAPOConfig and issubclass(VAPOTrainer, PPOTrainer)


def test_vapo_warns_when_every_completion_is_too_short_for_the_bare_length_adaptive_lambda(tmp_path, caplog):
    # alpha = 0.05: 1 - 1 / (0.05 * l) <= 0 for every l <= 20 tokens; only without the floor (min lambda 0) does every
    # completion then get lambda_policy = 0.
    settings = {"value_pretrain_steps": 1}  # below make_config's max_steps=2, which VAPO's 50 would take whole
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(VAPOConfig, tmp_path, max_completion_length=20, length_adaptive_min_lambda=0.0, **settings)
    assert any("length_adaptive_alpha=0.05" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(VAPOConfig, tmp_path, max_completion_length=20, **settings)  # default floor: lambda = lam = 0.95
        make_config(VAPOConfig, tmp_path, max_completion_length=21, length_adaptive_min_lambda=0.0, **settings)
        make_config(VAPOConfig, tmp_path, max_completion_length=8, length_adaptive_alpha=None, **settings)
    assert not any("length_adaptive_alpha" in record.getMessage() for record in caplog.records)


def test_full_policy_without_value_model_gets_a_critic_copied_from_its_checkpoint(tiny_model_path, dataset, tmp_path):
    args = make_config(PPOConfig, tmp_path, num_generations=1)
    trainer = PPOTrainer(tiny_model_path, reward_funcs=letter_reward, args=args, train_dataset=dataset)
    critic = trainer.model.value_model
    assert type(critic).__name__ == "Qwen2ForTokenClassification" and critic.score.weight.shape == (1, 64)
    policy_state = AutoModelForCausalLM.from_pretrained(tiny_model_path).model.state_dict()
    for name, tensor in critic.model.state_dict().items():
        assert torch.equal(tensor, policy_state[name]), name
    assert critic.model.embed_tokens.weight.data_ptr() != trainer.model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(tiny_model_path, reward_funcs=letter_reward, args=make_config(trl_plus.GRPOConfig, tmp_path))


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("_save", ["self", "output_dir", "state_dict"]),
        ("_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
        ("_issue_warnings_after_load", ["self", "load_result"]),
        ("create_optimizer", ["self", "model"]),
        ("training_step", ["self", "model", "inputs", "num_items_in_batch"]),
    ],
)
def test_transformers_methods_ppo_overrides_keep_their_signatures(method, parameters):
    """The transformers.Trainer methods PPOTrainer wraps (critic checkpoints, param groups, pretraining gradients)."""
    assert list(inspect.signature(getattr(transformers.Trainer, method)).parameters) == parameters


# ---------------------------------------------------------------------------------------------- the LoRA critic


def test_lora_critic_shares_one_copy_of_the_base_weights(tiny_model_path, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, dataset, tmp_path)
    model = trainer.model
    assert set(model.peft_config) == {"default", "critic"}
    assert trainer.ref_model is None  # the reference is the base with every adapter disabled
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    parts = roles(trainer)
    assert sum(t.numel() for t in parts["base"].values()) == sum(p.numel() for p in base_model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in parts["base"])
    # Policy and critic adapters sit on the same 4 layers (2 layers x q_proj, v_proj), as distinct tensors.
    assert len(parts["policy"]) == len(parts["critic"]) - 2 == 8  # + value_head.weight, value_head.bias
    assert model.value_head.weight.shape == (1, model.config.hidden_size)
    # No module anywhere on the trainer holds parameters that the policy model does not.
    model_params = {id(p) for p in model.parameters()}
    for name, value in vars(trainer).items():
        if isinstance(value, torch.nn.Module):
            assert {id(p) for p in value.parameters()} <= model_params, name
    # Every base weight has one storage.
    base_storages = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n in parts["base"]}
    assert len(base_storages) == len(parts["base"])


def test_critic_values_are_read_where_each_token_is_predicted(tiny_model_path, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, peft_config=lora(init_lora_weights=False))
    batch = rollout(trainer)
    values = trainer._critic_values(batch)
    model = trainer.model
    checked = 0
    for row in range(3):
        length = int(batch["completion_mask"][row].sum())
        for t in sorted({0, length // 2, length - 1}):
            prefix = torch.cat([batch["prompt_ids"][row], batch["completion_ids"][row, :t]]).unsqueeze(0)
            with torch.no_grad():  # V(s_t): the state before token t is the prompt and the first t tokens
                model.set_adapter("critic")
                hidden = model(input_ids=prefix, output_hidden_states=True).hidden_states[-1][0, -1]
                expected = model.value_head(hidden).item()
                model.set_adapter("default")
                with_policy_adapter = model.value_head(
                    model(input_ids=prefix, output_hidden_states=True).hidden_states[-1][0, -1]
                ).item()
            assert values[row, t].item() == pytest.approx(expected, abs=1e-5)
            assert abs(with_policy_adapter - expected) > 1e-4  # the critic adapter, not the policy's, was active
            checked += 1
    assert checked >= 6
    assert model.active_adapter == "default"


def reference_gradients(trainer, batch) -> dict[str, torch.Tensor]:
    """The gradients of the two-backward implementation (trl_plus before one backward), from its math: the critic
    forward and vf_coef * value loss back-propagated while the critic adapter is active (so that a checkpointed layer
    recomputes with it), then TRL's policy loss (`trl_plus.GRPOTrainer._compute_loss`) back-propagated with the
    policy adapter active. Positive LM loss off (VAPO's only other term)."""
    from trl_plus.algos.value import clipped_value_loss

    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._restore_trainable()
    mask = batch["completion_mask"].float() * batch["scored"].unsqueeze(1)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with trainer._critic_active(model):
        values = trainer._critic_forward(model, input_ids, attention_mask, batch["completion_ids"].size(1))
        loss_sum, _ = clipped_value_loss(
            values,
            batch["old_values"],
            batch["returns"],
            mask,
            trainer.args.cliprange_value,
            num_tokens=torch.ones(()),
        )
        value_loss = loss_sum / trainer._token_mean_normalizer(batch["num_items_in_batch"], "train")
        (trainer.args.vf_coef * value_loss).backward()
    trl_plus.GRPOTrainer._compute_loss(trainer, model, batch).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def test_the_returned_loss_back_propagates_into_policy_and_critic_at_once(tiny_model_path, dataset, tmp_path):
    """One backward: `_compute_loss` back-propagates nothing itself; the backward of the loss it returns (policy +
    vf_coef * value) gives the policy adapter, the critic adapter and the value head the gradients of the two
    separate backwards, and the base none."""
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, peft_config=lora(init_lora_weights=False), vf_coef=0.5)
    batch = rollout(trainer)
    model = trainer.model
    expected = reference_gradients(trainer, batch)
    loss = trainer._compute_loss(model, batch)
    assert all(p.grad is None for p in model.parameters())  # nothing back-propagated yet
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    parts = roles(trainer)
    assert grads.keys() == expected.keys() == {*parts["policy"], *parts["critic"]}
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)
    # Both adapters stay trainable, whatever PEFT's set_adapter / disable_adapter did to requires_grad.
    assert all(p.requires_grad for n, p in model.named_parameters() if n in parts["policy"] or n in parts["critic"])
    assert model.active_adapter == "default"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_each_forward_with_its_own_adapter(
    tiny_model_path, dataset, tmp_path, use_reentrant
):
    """Checkpointing re-runs layer forwards during the one backward, and a PEFT layer reads the adapter active then;
    `adapter_checkpointing` re-activates the adapter of each layer's forward, so the gradients of the single
    backward equal those of the two separate backwards (each run with its adapter active) with and without
    checkpointing. Without the binding the critic's layers recompute with the policy adapter: wrong gradients."""
    gradients = {}
    for checkpointing in (False, True):
        kwargs = {"use_reentrant": use_reentrant}
        trainer = make_trainer(
            tiny_model_path,
            dataset,
            tmp_path / str(checkpointing),
            peft_config=lora(init_lora_weights=False),
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=kwargs,
        )
        if checkpointing:  # what `Trainer.train` does
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert trainer.model.get_base_model().model.layers[0].gradient_checkpointing
        batch = rollout(trainer)
        reference = reference_gradients(trainer, batch)
        trainer._compute_loss(trainer.model, batch).backward()
        gradients[checkpointing] = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        assert gradients[checkpointing].keys() == reference.keys()
        for name, grad in reference.items():
            assert_close(gradients[checkpointing][name], grad, atol=1e-6, rtol=0, msg=f"{checkpointing} {name}")
    assert gradients[True].keys() == gradients[False].keys()
    assert len(gradients[False]) == 8 + 10  # policy LoRA + critic LoRA and head
    for name, grad in gradients[False].items():
        assert grad.abs().sum() > 0, name
        assert_close(gradients[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)

    # The same single backward with transformers' plain checkpoint function (what the binding wraps).
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # new, unbound functions
    trainer.model.zero_grad(set_to_none=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("trl_plus.trainer.ppo.bind_adapters_to_checkpoints", lambda model: 0)
        trainer._compute_loss(trainer.model, batch).backward()
    naive = {n: p.grad for n, p in trainer.model.named_parameters() if ".critic." in n}
    wrong = [n for n, g in naive.items() if g is None or (g - gradients[False][n]).abs().max() > 1e-4]
    assert len(naive) == 8 and wrong, "the critic adapter's gradients are right even without the binding"


def test_binding_records_each_layers_adapter_and_leaves_requires_grad_alone(tiny_model_path, dataset, tmp_path):
    """`bind_adapters_to_checkpoints` wraps each decoder layer once (idempotent) and keeps every flag as it was."""
    from trl_plus.trainer.adapter_checkpointing import bind_adapters_to_checkpoints

    trainer = make_trainer(tiny_model_path, dataset, tmp_path, gradient_checkpointing=True)
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert bind_adapters_to_checkpoints(model) == bind_adapters_to_checkpoints(model) == 2  # the tiny model's layers
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    layer = model.get_base_model().model.layers[0]
    seen = []
    hidden = torch.zeros(1, 3, model.config.hidden_size, requires_grad=True)

    def run(hidden_states):
        seen.append(layer.self_attn.q_proj.active_adapters)
        return hidden_states**2  # saves its input: the backward recomputes it

    model.set_adapter("critic")
    out = layer._gradient_checkpointing_func(run, hidden)
    model.set_adapter("default")
    trainer._restore_trainable()
    out.sum().backward()  # the recompute runs `run` again, with the critic adapter re-activated
    assert seen == [["critic"], ["critic"]]
    assert layer.self_attn.q_proj.active_adapters == ["default"]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


# --------------------------------------------------------------------------------------------------- rollouts


def test_rollout_advantages_are_whitened_gae_of_kl_shaped_rewards(tiny_model_path, dataset, tmp_path):
    """From independent pieces: the reference's log-probs from a fresh copy of the base model (so TRL's reference
    forward disabled the critic adapter too), the policy's from plain logits, the values from the critic, then
    k1 KL in the reward, GAE (gamma 0.9, lambda 0.8) and global whitening."""
    gamma, lam, beta = 0.9, 0.8, 0.1
    trainer = make_trainer(
        tiny_model_path, dataset, tmp_path, peft_config=lora(init_lora_weights=False), gamma=gamma, lam=lam, beta=beta
    )
    batch = rollout(trainer)
    mask = batch["completion_mask"].float()
    ref_log_probs = completion_log_probs(AutoModelForCausalLM.from_pretrained(tiny_model_path), batch)
    assert_close(batch["ref_per_token_logps"] * mask, ref_log_probs * mask, atol=1e-5, rtol=0)
    policy_log_probs = completion_log_probs(trainer.model, batch)
    kl = (policy_log_probs - ref_log_probs) * mask
    assert kl.abs().max() > 0.05  # the policy adapter starts non-zero: the KL term matters

    prompts = trainer.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    scores = torch.tensor(letter_reward(prompts, None))
    assert_close(batch["scores"], scores)
    values = trainer._critic_values(batch)
    assert_close(batch["old_values"], values)
    advantages, returns = gae(kl_shaped_token_rewards(scores, kl, mask, beta), values, mask, gamma, lam)
    assert_close(batch["returns"], returns, atol=1e-5, rtol=1e-5)
    assert_close(batch["advantages"], masked_whiten(advantages, mask), atol=1e-4, rtol=1e-4)
    valid = batch["advantages"][mask.bool()]
    assert valid.mean().abs() < 1e-5 and (valid.var(unbiased=False) - 1).abs() < 1e-4
    metrics = trainer._metrics["train"]
    assert metrics["kl/beta"] == [beta]
    assert metrics["kl"][-1] == pytest.approx((kl.sum() / mask.sum()).item(), abs=1e-5)


@pytest.mark.parametrize("min_lambda", [0.0, 0.6])
def test_vapo_gae_is_decoupled_and_length_adaptive(tiny_model_path, dataset, tmp_path, min_lambda):
    """Value targets use lambda_critic = 1 (Monte-Carlo: with gamma 1 and no KL, the score on every token); policy
    advantages use lambda = max(1 - 1/(alpha * length), min_lambda) per completion (alpha 0.5 here, so 8 tokens give
    0.75, 4 give 0.5 and 2 give 0; the floor 0.6 lifts the last two)."""
    alpha = 0.5
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        VAPOConfig,
        num_generations=2,
        value_pretrain_steps=0,
        length_adaptive_alpha=alpha,
        length_adaptive_min_lambda=min_lambda,
        whiten_advantages=False,
        mask_truncated_completions=False,
    )
    batch = rollout(trainer)
    mask = batch["completion_mask"].float()
    scores = batch["scores"]
    assert_close(batch["returns"], scores.unsqueeze(1) * mask, atol=1e-6, rtol=0)
    lambdas = (1 - 1 / (alpha * mask.sum(-1))).clamp(min=min_lambda, max=1.0)
    assert_close(length_adaptive_lambda(mask.sum(-1), alpha, min_lambda), lambdas)
    assert ((lambdas > min_lambda) & (lambdas < 1)).any()
    advantages, _ = kl_free_gae(batch, lambdas)
    assert_close(batch["advantages"], advantages, atol=1e-6, rtol=1e-6)
    single_lambda, _ = kl_free_gae(batch, 0.95)
    assert (single_lambda - advantages).abs().max() > 1e-3  # length-adaptive differs from the plain 0.95
    assert trainer._metrics["train"]["value/lambda_policy"][-1] == pytest.approx(lambdas.mean().item(), abs=1e-6)


def test_vapo_default_floor_keeps_short_completions_at_lam(tiny_model_path, dataset, tmp_path):
    """At VAPO's alpha = 0.05, completions of at most 8 tokens get 1 - 1/(0.05 * l) <= -1.5: the default floor
    (`lam` = 0.95) gives them GAE with 0.95, not one-step TD errors."""
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        VAPOConfig,
        num_generations=2,
        value_pretrain_steps=0,
        whiten_advantages=False,
    )
    batch = rollout(trainer)
    advantages, _ = kl_free_gae(batch, 0.95)
    assert_close(batch["advantages"], advantages, atol=1e-6, rtol=1e-6)
    assert trainer._metrics["train"]["value/lambda_policy"] == [pytest.approx(0.95)]


def test_rollout_logs_the_critics_readiness(tiny_model_path, dataset, tmp_path):
    """value/td_error_std is the spread of the one-step TD errors delta_t = r_t + V_{t+1} - V_t, value/advantage_std
    that of the GAE advantages before whitening, both population stds over the valid tokens."""
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, beta=0.0, lam=0.5)
    batch = rollout(trainer)
    valid = batch["completion_mask"].bool()
    td_errors, _ = kl_free_gae(batch, 0.0)
    advantages, _ = kl_free_gae(batch, 0.5)
    metrics = trainer._metrics["train"]
    assert metrics["value/td_error_std"] == [pytest.approx(td_errors[valid].std(unbiased=False).item(), abs=1e-5)]
    assert metrics["value/advantage_std"] == [pytest.approx(advantages[valid].std(unbiased=False).item(), abs=1e-5)]
    assert metrics["value/advantage_std"][0] > 0.01  # the whitened advantages (std 1) are not what is logged
    assert metrics["value/lambda_policy"] == [0.5]
    # The global std by hand: the valid values 1 and 3 have mean 2 and population std 1 (9 is padding).
    std = trainer._global_masked_std(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert std == pytest.approx(1.0)


def test_value_pretraining_fits_monte_carlo_returns(tiny_model_path, dataset, tmp_path):
    """During value pretraining the value targets are Monte-Carlo returns (lambda 1), afterwards GAE with `lam`."""
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, beta=0.0, lam=0.5, value_pretrain_steps=1)
    batch = rollout(trainer)
    mask = batch["completion_mask"].float()
    assert_close(batch["returns"], batch["scores"].unsqueeze(1) * mask, atol=1e-6, rtol=0)
    trainer.state.global_step = 1  # pretraining is over
    batch = rollout(trainer)
    _, returns = kl_free_gae(batch, 0.5)
    assert_close(batch["returns"], returns, atol=1e-6, rtol=0)
    mask = batch["completion_mask"].float()
    assert (returns - batch["scores"].unsqueeze(1) * mask).abs().max() > 1e-3


def test_unscored_completions_stay_out_of_every_statistic(tiny_model_path, dataset, tmp_path):
    def reward(prompts, completions, **kwargs):  # None (unscorable) for the letters a and b
        return [None if prompt[0] in "ab" else LETTERS.index(prompt[0]) / 7 for prompt in prompts]

    trainer = make_trainer(tiny_model_path, dataset, tmp_path, reward=reward, per_device_train_batch_size=16)
    batch = rollout(trainer)
    prompts = trainer.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    unscored = torch.tensor([prompt[0] in "ab" for prompt in prompts])
    assert 0 < unscored.sum() < len(prompts)
    assert torch.equal(batch["scored"], (~unscored).float())
    assert (batch["advantages"][unscored] == 0).all() and (batch["returns"][unscored] == 0).all()
    mask = batch["completion_mask"].bool() & ~unscored.unsqueeze(1)
    valid = batch["advantages"][mask]
    assert valid.mean().abs() < 1e-5 and (valid.var(unbiased=False) - 1).abs() < 1e-4


def test_adaptive_kl_controller_follows_the_rollout_kl(tiny_model_path, dataset, tmp_path):
    """beta <- beta * (1 + clip(KL / target - 1, +-0.2) * n / horizon), KL per sequence (summed over its tokens)."""
    beta, target, horizon = 0.1, 0.01, 100.0
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        peft_config=lora(init_lora_weights=False),
        beta=beta,
        kl_target=target,
        kl_horizon=horizon,
    )
    batch = rollout(trainer)
    mask = batch["completion_mask"].float()
    ref_log_probs = batch["ref_per_token_logps"]
    kl_per_sequence = ((completion_log_probs(trainer.model, batch) - ref_log_probs) * mask).sum(-1)
    expected = AdaptiveKLController(beta, target, horizon)
    expected.update(kl_per_sequence.mean().item(), n_steps=len(kl_per_sequence))
    assert trainer._kl_controller.value == pytest.approx(expected.value, rel=1e-6)
    assert trainer.beta == pytest.approx(expected.value, rel=1e-6)
    assert abs(expected.value - beta) > 1e-3  # the KL is far above the target: beta moved
    assert trainer._metrics["train"]["kl/beta"] == [beta]  # the beta that shaped this rollout


@pytest.mark.parametrize(
    ("config_class", "overrides", "critic_lr"),
    [
        (VAPOConfig, {}, 2e-3),  # VAPO: twice the actor's
        (VAPOConfig, {"critic_learning_rate": 5e-3}, 5e-3),  # an explicit rate wins over the ratio
        (PPOConfig, {"critic_learning_rate_ratio": 3.0}, 3e-3),
        (PPOConfig, {}, 1e-3),  # PPO: the actor's
    ],
)
def test_critic_learning_rate_ratio(tiny_model_path, dataset, tmp_path, config_class, overrides, critic_lr):
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        config_class,
        num_generations=2,
        learning_rate=1e-3,
        value_pretrain_steps=1,  # below max_steps=2 (VAPO's 50 would train only the critic, which is refused)
        **overrides,
    )
    optimizer = trainer.create_optimizer()
    critic_ids = {id(param) for param in trainer._critic_params}
    rates = {(id(param) in critic_ids, group["lr"]) for group in optimizer.param_groups for param in group["params"]}
    assert sorted(rates) == [(False, 1e-3), (True, pytest.approx(critic_lr))]


def test_critic_learning_rate_gets_its_own_parameter_groups(tiny_model_path, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, learning_rate=1e-3, critic_learning_rate=5e-3)
    optimizer = trainer.create_optimizer()
    parts = roles(trainer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], []).extend(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 5e-3}
    assert sorted(by_lr[1e-3]) == sorted(parts["policy"])
    assert sorted(by_lr[5e-3]) == sorted(parts["critic"])


# ------------------------------------------------------------------------------------------------ training runs


class PolicyRecorder(TrainerCallback):
    """The policy adapter's weights after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n})


def test_value_pretraining_trains_only_the_critic(tiny_model_path, dataset, tmp_path):
    steps = 8
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        VAPOConfig,
        num_generations=2,
        per_device_train_batch_size=16,
        value_pretrain_steps=steps,
        max_steps=steps + 1,  # value pretraining must leave the policy at least one step
    )
    recorder = PolicyRecorder()
    trainer.add_callback(recorder)
    before = roles(trainer)
    trainer.train()
    after = roles(trainer)
    for name, tensor in before["policy"].items():  # after the last pretraining step
        assert torch.equal(recorder.steps[steps - 1][name], tensor), name
    for name, tensor in before["base"].items():
        assert torch.equal(after["base"][name], tensor), name
    assert all((after["critic"][name] - tensor).abs().max() > 1e-4 for name, tensor in before["critic"].items())
    value_loss = logged(trainer, "value/loss")[:steps]
    assert len(value_loss) == steps and all(math.isfinite(x) for x in value_loss)
    assert sum(value_loss[-3:]) / 3 < 0.7 * sum(value_loss[:3]) / 3
    assert logged(trainer, "value/pretraining") == [1.0] * steps + [0.0]
    assert "ppo/clipfrac" not in trainer.state.log_history[0]  # no policy forward during pretraining


def test_ppo_run_logs_every_metric_and_the_critic_learns(tiny_model_path, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, max_steps=12, kl_target=0.1, kl_horizon=100.0)
    before = roles(trainer)
    trainer.train()
    after = roles(trainer)
    history = [entry for entry in trainer.state.log_history if "train_runtime" not in entry]
    assert len(history) == 12
    for entry in history:
        for key in PPO_METRICS:
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    explained_variance = logged(trainer, "value/explained_variance")
    assert sum(explained_variance[-4:]) / 4 > sum(explained_variance[:4]) / 4 + 0.3
    betas = logged(trainer, "kl/beta")
    assert betas[0] == 0.05 and betas[-1] != betas[0]  # adaptive
    for role in ("policy", "critic"):
        assert all((after[role][n] - t).abs().max() > 1e-4 for n, t in before[role].items()), role
    assert all(torch.equal(after["base"][n], t) for n, t in before["base"].items())


def test_vapo_run_freezes_the_policy_until_pretraining_ends(tiny_model_path, dataset, tmp_path):
    pretrain_steps, steps = 3, 10
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        VAPOConfig,
        reward=centered_letter_reward,
        num_generations=2,
        per_device_train_batch_size=16,
        value_pretrain_steps=pretrain_steps,
        max_steps=steps,
    )
    recorder = PolicyRecorder()
    trainer.add_callback(recorder)
    initial = roles(trainer)["policy"]
    trainer.train()
    assert len(recorder.steps) == steps
    for step, weights in enumerate(recorder.steps, start=1):
        changed = max((weights[n] - t).abs().max().item() for n, t in initial.items())
        assert (changed == 0.0) == (step <= pretrain_steps), (step, changed)
    assert logged(trainer, "value/pretraining") == [1.0] * pretrain_steps + [0.0] * (steps - pretrain_steps)
    policy_entries = trainer.state.log_history[pretrain_steps:steps]
    for entry in policy_entries:
        for key in (*PPO_METRICS, "positive_lm/loss", "positive_lm/fraction"):
            if key != "kl":  # VAPO has no KL
                assert key in entry and math.isfinite(entry[key]), (key, entry)
    fractions = [entry["positive_lm/fraction"] for entry in policy_entries]
    assert all(0 <= f <= 1 for f in fractions) and any(0 < f < 1 for f in fractions)
    explained_variance = logged(trainer, "value/explained_variance")
    assert sum(explained_variance[-3:]) / 3 > sum(explained_variance[:3]) / 3 + 0.3


class ScriptedCriticPPOTrainer(PPOTrainer):
    """Reports `script[global_step]` as the explained variance of each training rollout (the readiness check's input;
    one rollout per optimizer step here), so the step where the critic gets ready is known in advance. Keyed by the
    step, a resumed run sees the same values as an uninterrupted one."""

    script: tuple[float, ...] = ()

    def _global_explained_variance(self, values, returns, mask):
        measured = super()._global_explained_variance(values, returns, mask)
        if not self.model.training:
            return measured
        return self.script[min(self.state.global_step, len(self.script) - 1)]


def scripted_trainer(model_path, dataset, output_dir, script, config_class=VAPOConfig, peft_config=None, **overrides):
    settings = dict(num_generations=2, per_device_train_batch_size=16, reward=centered_letter_reward)
    settings.update(overrides)
    reward = settings.pop("reward")
    args = make_config(config_class, output_dir, **settings)
    trainer_class = type("Scripted", (ScriptedCriticPPOTrainer,), {"script": tuple(script)})
    return trainer_class(
        model_path, reward_funcs=reward, args=args, train_dataset=dataset, peft_config=peft_config or lora()
    )


@pytest.mark.parametrize(
    ("threshold", "pretraining_steps", "window_mean"),
    [
        # Window 2 over the scripted 0.1, 0.6, 0.7, 0.9: means -, 0.35, 0.65, 0.8. At 0.5 the rollout of step 3
        # (global step 2) makes the critic ready: 2 critic-only steps, the policy trains from step 3 on.
        (0.5, 2, 0.65),
        (0.66, 3, 0.8),  # 0.65 is not enough: one more step of pretraining
    ],
)
def test_value_pretraining_ends_when_the_critic_is_ready(
    tiny_model_path, dataset, tmp_path, threshold, pretraining_steps, window_mean
):
    steps = 6
    trainer = scripted_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        [0.1, 0.6, 0.7, 0.9],
        value_pretrain_steps=5,
        value_pretrain_threshold=threshold,
        value_pretrain_window=2,
        max_steps=steps,
    )
    recorder = PolicyRecorder()
    trainer.add_callback(recorder)
    initial = roles(trainer)["policy"]
    trainer.train()
    assert logged(trainer, "value/pretraining") == [1.0] * pretraining_steps + [0.0] * (steps - pretraining_steps)
    for step, weights in enumerate(recorder.steps, start=1):
        changed = max((weights[n] - t).abs().max().item() for n, t in initial.items())
        assert (changed == 0.0) == (step <= pretraining_steps), (step, changed)
    # Logged once, in the step whose rollout made the critic ready (the first policy step).
    assert logged(trainer, "value/pretraining_steps") == [pretraining_steps]
    assert logged(trainer, "value/pretraining_explained_variance") == [pytest.approx(window_mean)]
    assert "value/pretraining_steps" in trainer.state.log_history[pretraining_steps]
    schedule = trainer._value_pretraining
    assert (schedule.end_step, schedule.ready) == (pretraining_steps, True)


def test_value_pretraining_cap_warns_when_the_critic_is_not_ready(tiny_model_path, dataset, tmp_path, caplog):
    trainer = scripted_trainer(
        tiny_model_path, dataset, tmp_path, [0.1], value_pretrain_steps=2, value_pretrain_window=2, max_steps=3
    )
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        trainer.train()
    assert logged(trainer, "value/pretraining") == [1.0, 1.0, 0.0]  # the cap: the policy starts anyway
    warnings = [record.getMessage() for record in caplog.records if "not ready" in record.getMessage()]
    assert len(warnings) == 1 and "value_pretrain_steps=2" in warnings[0] and "averages 0.100" in warnings[0]
    assert logged(trainer, "value/pretraining_steps") == [2]
    assert (trainer._value_pretraining.end_step, trainer._value_pretraining.ready) == (2, False)


def test_value_pretraining_strict_raises_at_the_cap(tiny_model_path, dataset, tmp_path):
    trainer = scripted_trainer(
        tiny_model_path, dataset, tmp_path, [0.1], value_pretrain_steps=2, value_pretrain_strict=True, max_steps=3
    )
    recorder = PolicyRecorder()
    trainer.add_callback(recorder)
    with pytest.raises(RuntimeError, match="not ready.*value_pretrain_strict=True"):
        trainer.train()
    assert len(recorder.steps) == 2  # raised before the first policy update


def test_fixed_value_pretraining_without_a_threshold_does_not_warn(tiny_model_path, dataset, tmp_path, caplog):
    trainer = scripted_trainer(
        tiny_model_path, dataset, tmp_path, [0.9], value_pretrain_steps=2, value_pretrain_threshold=None, max_steps=3
    )
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        trainer.train()
    assert logged(trainer, "value/pretraining") == [1.0, 1.0, 0.0]  # 0.9 would have been ready: a fixed count
    assert not any("not ready" in record.getMessage() for record in caplog.records)
    assert logged(trainer, "value/pretraining_steps") == [2]


def test_policy_on_a_critic_worse_than_none_warns_once(tiny_model_path, dataset, tmp_path, caplog):
    """Explained variance < 0 at every rollout of a 4-step PPO run: one warning (then at most one every 100 steps)."""
    trainer = scripted_trainer(tiny_model_path, dataset, tmp_path, [-0.4], PPOConfig, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        trainer.train()
    warnings = [record.getMessage() for record in caplog.records if "worse than their mean" in record.getMessage()]
    assert len(warnings) == 1 and "-0.400 < 0" in warnings[0] and warnings[0].startswith("Step 1:")
    for key in ("value/td_error_std", "value/advantage_std", "value/lambda_policy"):
        assert len(logged(trainer, key)) == 4 and all(math.isfinite(x) for x in logged(trainer, key)), key


def test_resume_restores_the_value_pretraining_state(tiny_model_path, dataset, tmp_path):
    """The critic is ready at the rollout of step 2 (scripted 0.9): steps 2-4 train the policy. Resumed from
    checkpoint-2 the run continues with the policy training, although the scripted explained variance of steps 3 and 4
    (0.1) would keep a restarted readiness check in pretraining until the cap (3 steps)."""
    settings = dict(
        value_pretrain_steps=3,
        value_pretrain_window=1,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        peft_config=lora(init_lora_weights=False),
    )
    script = [0.1, 0.9, 0.1, 0.1]
    uninterrupted = scripted_trainer(tiny_model_path, dataset, tmp_path / "a", script, **settings)
    uninterrupted.train()
    assert logged(uninterrupted, "value/pretraining") == [1.0, 0.0, 0.0, 0.0]
    state = json.loads((tmp_path / "a" / "checkpoint-2" / PPO_STATE_FILE).read_text())
    assert state["value_pretraining"] == {
        "explained_variances": [0.9],
        "end_step": 1,
        "ready": True,
        "end_explained_variance": 0.9,
    }
    assert set(state) == {"kl_controller", "value_pretraining"}

    resumed = scripted_trainer(tiny_model_path, dataset, tmp_path / "b", script, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert logged(resumed, "value/pretraining")[-2:] == [0.0, 0.0]
    assert (resumed._value_pretraining.end_step, resumed._value_pretraining.ready) == (1, True)
    final, expected = roles(resumed), roles(uninterrupted)
    for role in ("policy", "critic"):
        for name, tensor in expected[role].items():
            assert_close(final[role][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


class RecordingPPOTrainer(PPOTrainer):
    """Records each generation batch and each mini-batch the loss is computed on."""

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.generations.append(batch)
        return batch

    def _compute_loss(self, model, inputs):
        if self.model.training:
            self.mini_batches.append(inputs)
        return super()._compute_loss(model, inputs)


def test_ppo_epochs_and_mini_batches_reuse_one_whitened_generation_batch(tiny_model_path, dataset, tmp_path):
    """num_iterations = 2 PPO epochs over steps_per_generation = 2 mini-batches: one generation every 4 optimizer
    steps, whitened as a whole; the second epoch is off-policy, so the ratio and the value clipping come into play."""
    args = make_config(
        PPOConfig,
        tmp_path,
        num_generations=1,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        num_iterations=2,
        max_steps=8,
        learning_rate=5e-2,
    )
    trainer = RecordingPPOTrainer(
        tiny_model_path, reward_funcs=letter_reward, args=args, train_dataset=dataset, peft_config=lora()
    )
    trainer.generations, trainer.mini_batches = [], []
    trainer.train()
    assert len(trainer.generations) == 2 and len(trainer.mini_batches) == 8
    for generation in trainer.generations:
        assert generation["completion_ids"].size(0) == 8 and "old_per_token_logps" in generation
        valid = generation["advantages"][generation["completion_mask"].bool()]
        assert valid.mean().abs() < 1e-5 and (valid.var(unbiased=False) - 1).abs() < 1e-4
    for index, mini_batch in enumerate(trainer.mini_batches):  # 4 rows each, sliced from the right generation
        generation = trainer.generations[index // 4]
        rows = [
            next(i for i in range(8) if torch.equal(generation["completion_ids"][i], ids))
            for ids in mini_batch["completion_ids"]
        ]
        assert len(set(rows)) == 4
        assert torch.equal(mini_batch["advantages"], generation["advantages"][rows])
        assert torch.equal(mini_batch["old_values"], generation["old_values"][rows])
    approx_kl, value_clipfrac = logged(trainer, "ppo/approx_kl"), logged(trainer, "value/clipfrac")
    assert approx_kl[0] == 0.0 and max(approx_kl) > 1e-4  # the first mini-batch is on-policy, later ones are not
    assert max(value_clipfrac) > 0 and max(logged(trainer, "ppo/clipfrac")) >= 0


def test_dynamic_sampling_keeps_each_rows_targets_and_whitens_the_kept_batch(tiny_model_path, dataset, tmp_path):
    """VAPO with DAPO's dynamic sampling: groups without reward variance are dropped and more rounds generated; the
    per-row critic targets travel with their rows, and the whitening covers the batch actually trained on."""

    def reward(prompts, completions, **kwargs):  # a-d: varies with the completion; e-h: 1.0 (no signal)
        pairs = zip(prompts, completions, strict=True)
        return [float(sum(map(ord, c)) % 3) if p[0] in "abcd" else 1.0 for p, c in pairs]

    args = make_config(
        VAPOConfig,
        tmp_path,
        num_generations=2,
        value_pretrain_steps=0,
        max_steps=2,
        dynamic_sampling=True,
        max_num_gen_batches=6,
    )
    trainer = RecordingPPOTrainer(
        tiny_model_path, reward_funcs=reward, args=args, train_dataset=dataset, peft_config=lora()
    )
    trainer.generations, trainer.mini_batches = [], []
    trainer.train()
    assert max(logged(trainer, "dynamic_sampling/rounds")) > 1
    for batch in trainer.generations:
        mask = batch["completion_mask"].float()
        groups = batch["scores"].view(-1, 2)
        assert (groups[:, 0] != groups[:, 1]).all()  # only groups with a reward signal were kept
        assert_close(batch["returns"], batch["scores"].unsqueeze(1) * mask, atol=1e-6, rtol=0)  # lambda_critic = 1
        valid = batch["advantages"][mask.bool()]
        assert valid.mean().abs() < 1e-5 and (valid.var(unbiased=False) - 1).abs() < 1e-4


def test_evaluation_computes_the_value_loss_without_training(tiny_model_path, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, dataset, tmp_path, per_device_eval_batch_size=8)
    before = roles(trainer)
    metrics = trainer.evaluate(eval_dataset=dataset.select(range(0, 64, 8)))
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_value/loss"])
    assert "eval_value/explained_variance" in metrics and "eval_kl/beta" not in metrics
    after = roles(trainer)
    assert all(torch.equal(after[role][n], t) for role in before for n, t in before[role].items())
    assert trainer._kl_controller.value == 0.05


def test_positive_example_lm_loss_adds_mu_times_the_nll_of_positive_completions(tiny_model_path, dataset, tmp_path):
    mu = 0.1
    trainer = make_trainer(
        tiny_model_path,
        dataset,
        tmp_path,
        VAPOConfig,
        reward=centered_letter_reward,
        num_generations=2,
        value_pretrain_steps=0,
        positive_lm_coef=mu,
    )
    batch = rollout(trainer)
    positive = batch["scores"] > 0
    assert 0 < positive.sum() < len(positive)
    mask = batch["completion_mask"].float() * positive.unsqueeze(1)
    assert batch["num_positive_tokens"] == mask.sum()
    log_probs = completion_log_probs(trainer.model, batch)
    expected_nll = -(log_probs * mask).sum() / mask.sum()  # one process, one micro-batch: the global token mean

    with_nll = trainer._compute_loss(trainer.model, batch).item()
    trainer.args.positive_lm_coef = 0.0
    without_nll = trainer._compute_loss(trainer.model, batch).item()
    assert with_nll - without_nll == pytest.approx(mu * expected_nll.item(), rel=1e-4)
    assert trainer._metrics["train"]["positive_lm/loss"][-1] == pytest.approx(expected_nll.item(), rel=1e-4)


# -------------------------------------------------------------------------------------------------- checkpoints


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_path, dataset, tmp_path):
    """4 steps with a checkpoint every 2, against 2 steps resumed from checkpoint-2 (same seed): same policy, critic,
    value head, optimizer-driven updates and adaptive beta. The critic's lr differs from the policy's, so the
    optimizer's param groups must be restored too."""
    settings = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        kl_target=0.01,
        kl_horizon=100.0,
        critic_learning_rate=2e-2,
        peft_config=lora(init_lora_weights=False),
    )
    uninterrupted = make_trainer(tiny_model_path, dataset, tmp_path / "a", **settings)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "critic" / "adapter_model.safetensors").exists()
    head = safetensors.torch.load_file(checkpoint / "critic" / VALUE_HEAD_FILE)
    assert set(head) == {"weight", "bias"}
    kl_state = json.loads((checkpoint / PPO_STATE_FILE).read_text())["kl_controller"]
    assert kl_state["target"] == 0.01 and kl_state["value"] != 0.05
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == 8 + 10  # Adam moments of the policy LoRA, critic LoRA and head

    resumed = make_trainer(tiny_model_path, dataset, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, expected = roles(resumed), roles(uninterrupted)
    for role in ("policy", "critic"):
        for name, tensor in expected[role].items():
            assert_close(final[role][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert resumed._kl_controller.value == pytest.approx(uninterrupted._kl_controller.value, rel=1e-9)
    assert logged(resumed, "value/loss")[2:] == pytest.approx(logged(uninterrupted, "value/loss")[2:], rel=1e-5)
    assert logged(resumed, "loss")[2:] == pytest.approx(logged(uninterrupted, "loss")[2:], rel=1e-5, abs=1e-7)
    assert {group["initial_lr"] for group in resumed.optimizer.param_groups} == {1e-2, 2e-2}
    assert {group["lr"] for group in optimizer_state["param_groups"]} == {0.5e-2, 1e-2}  # halfway through the decay


def test_separate_value_model_trains_saves_and_resumes(tiny_model_path, dataset, tmp_path):
    """A full policy (no PEFT: TRL loads a reference copy) and a separate critic from a path: its `score` head reads
    every token. The critic is saved in `value_model/`, kept out of the policy's weights, and restored on resume."""
    settings = dict(value_model=tiny_model_path, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-3)
    trainer = make_trainer(tiny_model_path, dataset, tmp_path / "a", **settings)
    assert trainer.ref_model is not None and type(trainer.model.value_model).__name__ == "Qwen2ForTokenClassification"
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    final = dict(trainer.model.named_parameters())
    critic = [n for n in final if n.startswith("value_model.")]
    policy = [n for n in final if not n.startswith("value_model.")]
    assert len(critic) > 20 and all((final[n] - initial[n]).abs().max() > 0 for n in critic)
    assert any((final[n] - initial[n]).abs().max() > 0 for n in policy)
    assert all(math.isfinite(x) for x in logged(trainer, "value/loss"))

    checkpoint = tmp_path / "a" / "checkpoint-1"
    policy_keys = safetensors.torch.load_file(checkpoint / "model.safetensors").keys()
    assert policy_keys and not any("value_model" in key or "score" in key for key in policy_keys)
    saved_critic = safetensors.torch.load_file(tmp_path / "a" / "checkpoint-2" / "value_model" / "model.safetensors")
    assert_close(saved_critic["score.weight"], final["value_model.score.weight"].detach())

    resumed = make_trainer(tiny_model_path, dataset, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, param in resumed.model.named_parameters():
        assert_close(param, final[name], atol=1e-6, rtol=1e-5, msg=name)


class CountingReward:
    """`letter_reward`, counting its calls: 0 calls means nothing was generated, so no step was trained."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        return letter_reward(prompts, completions)


LORA_CRITIC_RUN = dict(max_steps=1, save_strategy="steps", save_steps=1, kl_target=0.01, kl_horizon=100.0)
VALUE_MODEL_RUN = dict(max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def saved_checkpoints(tiny_model_path, tmp_path_factory):
    """checkpoint-1 of a 1-step run with the LoRA critic (adaptive beta), and of one with a separate value model."""
    checkpoints = {}
    for name, settings in (("lora", LORA_CRITIC_RUN), ("value_model", VALUE_MODEL_RUN)):
        output_dir = tmp_path_factory.mktemp(f"ppo-{name}")
        value_model = {"value_model": tiny_model_path} if name == "value_model" else {}
        dataset = Dataset.from_dict({"prompt": PROMPTS})
        make_trainer(tiny_model_path, dataset, output_dir, **settings, **value_model).train()
        checkpoints[name] = output_dir / "checkpoint-1"
    return checkpoints


def damaged_copy(checkpoint: Path, tmp_path: Path, name: str, damage: str) -> Path:
    """A copy of `checkpoint` whose file (or folder) `name` is missing, cut to half its bytes (a write interrupted by a
    crash) or, for a safetensors file, rewritten without its first tensor."""
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    path = copy / name
    if damage == "missing":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        tensors = safetensors.torch.load_file(path)
        del tensors[sorted(tensors)[0]]
        safetensors.torch.save_file(tensors, path)
    return copy


def expected_error(checkpoint: Path, name: str, holds: str, damage: str) -> tuple[type, str]:
    """The error and the start of its message; `holds` is the start of what the file holds (a section added to
    `ppo_state.json` is appended to its description)."""
    error, words = (
        (MissingCheckpointFileError, "is missing")
        if damage == "missing"
        else (UnreadableCheckpointFileError, "cannot be used")
    )
    return error, re.escape(f"Cannot resume from {checkpoint}: `{name}` ({holds}") + r"[^)]*\) " + words


LORA_CRITIC_FILES = [
    ("critic/adapter_model.safetensors", "the critic's LoRA adapter weights"),
    ("critic/value_head.safetensors", "the LoRA critic's value head"),
    ("ppo_state.json", "PPO's state: kl_controller"),
]


@pytest.mark.parametrize(
    ("name", "holds", "damage"),
    [
        (name, holds, damage)
        for name, holds in LORA_CRITIC_FILES
        for damage in ("missing", "truncated", "incomplete")
        if damage != "incomplete" or name.endswith(".safetensors")  # JSON has no tensors to leave out
    ],
)
def test_resume_refuses_a_lora_critic_checkpoint_with_a_missing_or_unusable_file(
    saved_checkpoints, tiny_model_path, dataset, tmp_path, name, holds, damage
):
    """Today's failure modes: without the critic adapter's weights the Trainer skipped `critic/` and the critic
    resumed as initialized while its value head was restored; without `ppo_state.json` beta went back to its initial
    value; without the head, a bare FileNotFoundError. Now each stops the resume, naming the file, before any step; the
    critic's files are checked before the Trainer loads any weight."""
    checkpoint = damaged_copy(saved_checkpoints["lora"], tmp_path, name, damage)
    reward = CountingReward()
    trainer = make_trainer(tiny_model_path, dataset, tmp_path / "out", reward=reward, **LORA_CRITIC_RUN)
    initial = {key: param.detach().clone() for key, param in trainer.model.named_parameters()}
    error, message = expected_error(checkpoint, name, holds, damage)
    with pytest.raises(error, match=message):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert reward.calls == 0
    assert trainer._kl_controller.value == trainer.beta == 0.05
    unchanged = [torch.equal(param, initial[key]) for key, param in trainer.model.named_parameters()]
    # ppo_state.json is read after the Trainer loaded the weights (not before training continues)
    assert all(unchanged) if name.startswith("critic/") else not all(unchanged)


@pytest.mark.parametrize(
    ("name", "damage", "holds"),
    [
        ("value_model", "missing", "the value model, saved by `save_pretrained`"),
        ("value_model/config.json", "missing", "the value model's config"),
        ("value_model/model.safetensors", "missing", "the value model's weights"),
        ("value_model/model.safetensors", "truncated", "the value model's weights"),
        ("value_model/", "incomplete", "the value model"),  # readable, but a weight is not in it
    ],
)
def test_resume_refuses_a_checkpoint_with_a_missing_or_unusable_value_model(
    saved_checkpoints, tiny_model_path, dataset, tmp_path, name, damage, holds
):
    target = "value_model/model.safetensors" if damage == "incomplete" else name
    checkpoint = damaged_copy(saved_checkpoints["value_model"], tmp_path, target, damage)
    reward = CountingReward()
    trainer = make_trainer(
        tiny_model_path, dataset, tmp_path / "out", reward=reward, value_model=tiny_model_path, **VALUE_MODEL_RUN
    )
    initial = {key: param.detach().clone() for key, param in trainer.model.named_parameters()}
    error, message = expected_error(checkpoint, name, holds, damage)
    with pytest.raises(error, match=message) as raised:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert reward.calls == 0
    unchanged = [torch.equal(param, initial[key]) for key, param in trainer.model.named_parameters()]
    if damage == "incomplete":  # found when the value model is loaded, after the policy's weights
        assert "{'missing_keys': {'model.embed_tokens.weight'}}" in str(raised.value) and not all(unchanged)
    else:  # found before the Trainer loads any weight
        assert all(unchanged)


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({}, "it holds the sections [], expected ['kl_controller'"),
        (
            {"kl_controller": {"value": 0.06, "target": 0.01, "horizon": 100.0}, "unknown": {}},
            "it holds the sections ['kl_controller', 'unknown', 'value_pretraining'], expected ['kl_controller', "
            "'value_pretraining']",
        ),
        ({"kl_controller": {"value": 0.06}}, "AdaptiveKLController.load_state_dict expects the keys"),
        ({"kl_controller": {"value": -1.0, "target": 0.01, "horizon": 100.0}}, "value must be"),
    ],
)
def test_resume_refuses_a_ppo_state_without_exactly_its_sections(
    saved_checkpoints, tiny_model_path, dataset, tmp_path, state, words
):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(saved_checkpoints["lora"], checkpoint)
    if state:  # each damaged state keeps the saved value-pretraining section, so only its own damage is found
        state = {
            **state,
            "value_pretraining": json.loads((checkpoint / PPO_STATE_FILE).read_text())["value_pretraining"],
        }
    (checkpoint / PPO_STATE_FILE).write_text(json.dumps(state))
    trainer = make_trainer(tiny_model_path, dataset, tmp_path / "out", **LORA_CRITIC_RUN)
    with pytest.raises(
        UnreadableCheckpointFileError,
        match=re.escape(f"`{PPO_STATE_FILE}` (PPO's state: kl_controller") + r"[^)]*\) cannot be used",
    ) as raised:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert words in str(raised.value)
    assert trainer._kl_controller.value == 0.05


def test_reward_model_object_as_the_critic(tiny_model_path, dataset, tmp_path):
    """A sequence-classification reward model as `value_model`: V(s_t) is its score of the prefix up to t."""
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    args = make_config(PPOConfig, tmp_path, num_generations=1, max_steps=1)
    trainer = PPOTrainer(
        tiny_model_path,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=dataset,
        peft_config=lora(),
        value_model=reward_model,
    )
    batch = rollout(trainer)
    values = trainer._critic_values(batch)
    for row, t in [(0, 0), (1, 3), (2, 7)]:
        prefix = torch.cat([batch["prompt_ids"][row], batch["completion_ids"][row, :t]]).unsqueeze(0)
        with torch.no_grad():
            assert values[row, t].item() == pytest.approx(reward_model(input_ids=prefix).logits[0, 0].item(), abs=1e-5)
    score_before = reward_model.score.weight.detach().clone()
    trainer.train()
    assert (reward_model.score.weight - score_before).abs().max() > 0


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.fixture(scope="module")
def ppo_runs(tiny_model_path, tmp_path_factory):
    return run_one_and_two_processes(CHECK_SCRIPT, tiny_model_path, tmp_path_factory.mktemp("ppo-distributed"))


@requires_gloo
def test_two_process_ppo_whitens_globally_and_trains_like_one_process(ppo_runs):
    ((single, single_tensors),) = ppo_runs["single"]
    assert single["num_processes"] == 1
    for summary, tensors in ppo_runs["two"]:
        assert summary["num_processes"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
        # each process checked its rows against the full-batch definitions (GAE, KL shaping, global whitening)
        assert summary["failures"] == [] and len(summary["checks"]) == 6
        reference = tensors["reference"]
        assert reference["kl_max"] > 0.05 and reference["advantages"].abs().max() > 1.0
        for layout, result in tensors["rollout"].items():
            for key in ("advantages", "returns", "old_values"):
                expected = single_tensors["rollout"][layout][key]
                assert_close(result[key], expected, atol=1e-5, rtol=0, msg=f"{layout} {key}")
    # Training: both processes hold the same weights (DDP reduces policy and critic gradients in the one backward),
    # equal to the single process's, and every trainable tensor moved.
    (_, rank0), (_, rank1) = (run for run in ppo_runs["two"])
    assert rank0["trained"].keys() == single_tensors["trained"].keys()
    assert len(rank0["trained"]) == 8 + 10
    for name, tensor in rank0["trained"].items():
        assert torch.equal(tensor, rank1["trained"][name]), name
        assert_close(tensor, single_tensors["trained"][name], atol=1e-5, rtol=1e-4, msg=name)
        assert (tensor - rank0["initial"][name]).abs().max() > 1e-4, name
    losses = [[e["value/loss"] for e in summary["log_history"] if "value/loss" in e] for summary, _ in ppo_runs["two"]]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@requires_gloo
def test_two_process_single_backward_reduces_policy_and_critic_gradients_with_and_without_checkpointing(ppo_runs):
    """The first step's gradients after DDP's reduction, with no ignore list and no manual averaging: the policy
    adapter's, the critic adapter's and the value head's are the same on both processes and equal the single
    process's, with and without gradient checkpointing (whose recomputes must each use their own adapter)."""
    ((_, single),) = ppo_runs["single"]
    (_, rank0), (_, rank1) = ppo_runs["two"]
    reference = single["gradients"]["off"]
    assert len(reference) == 8 + 10 and all(grad.abs().sum() > 0 for grad in reference.values())
    assert any(name.startswith("value_head.") for name in reference)
    for checkpointing in ("off", "on"):
        assert single["gradients"][checkpointing].keys() == reference.keys()
        for name, grad in reference.items():
            assert_close(single["gradients"][checkpointing][name], grad, atol=1e-6, rtol=0, msg=name)
            assert torch.equal(rank0["gradients"][checkpointing][name], rank1["gradients"][checkpointing][name])
            assert_close(rank0["gradients"][checkpointing][name], grad, atol=1e-6, rtol=0, msg=name)
    # Value pretraining: the critic's gradients are reduced too (a zero-weighted policy forward arms DDP), and the
    # frozen policy's zero gradients are dropped before the optimizer step, as on one process where there are none.
    critic = {name: grad for name, grad in single["gradients"]["pretraining"].items()}
    assert critic.keys() == {name for name in reference if ".critic." in name or name.startswith("value_head.")}
    for name, grad in critic.items():
        assert grad.abs().sum() > 0, name
        assert rank0["gradients"]["pretraining"].keys() == critic.keys()
        assert torch.equal(rank0["gradients"]["pretraining"][name], rank1["gradients"]["pretraining"][name])
        assert_close(rank0["gradients"]["pretraining"][name], grad, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------- examples

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("algorithm", ["ppo", "vapo"])
def test_example_script_trains_with_the_lora_critic(tiny_model_path, tmp_path, monkeypatch, algorithm):
    """`python examples/<algorithm>.py ... --use_peft` on the tiny model and a local JSONL file: the policy adapter,
    the critic adapter and its value head are saved. (`tests/test_examples.py` runs every example without LoRA.)"""
    config_class, trainer_class = (PPOConfig, PPOTrainer) if algorithm == "ppo" else (VAPOConfig, VAPOTrainer)
    row = Algorithm(algorithm, config_class, trainer_class, f"{algorithm} (test row)", "https://arxiv.org")
    monkeypatch.setitem(ALGORITHMS, algorithm, row)  # the same classes as the table's row
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS[::4]))
    output_dir = tmp_path / "out"
    argv = [
        *("--model_name_or_path", tiny_model_path, "--dataset_name", str(data)),
        *("--reward_funcs", f"{__name__}.letter_reward", "--output_dir", str(output_dir)),
        *("--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "4"),
        *("--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2"),
        *("--max_completion_length", "4", "--value_pretrain_steps", "1", "--logging_steps", "1"),
        *("--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none"),
        *("--disable_tqdm", "true"),
    ]
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{algorithm}.py"), *argv])
    runpy.run_path(str(EXAMPLES / f"{algorithm}.py"), run_name="__main__")
    assert (output_dir / "adapter_model.safetensors").exists()
    assert (output_dir / "critic" / "adapter_model.safetensors").exists()
    assert (output_dir / "critic" / VALUE_HEAD_FILE).exists()
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    value_losses = [entry["value/loss"] for entry in state["log_history"] if "value/loss" in entry]
    assert len(value_losses) == 2 and all(math.isfinite(x) for x in value_losses)
