"""What trl_plus relies on from TRL 1.16's `GRPOTrainer`, pinned so that a TRL upgrade fails here, loudly.

trl_plus wraps private TRL methods through `super()` (DESIGN.md, "Hard facts about TRL 1.16 internals"): their names,
signatures, the attributes `__init__` sets and the keys of the batch dict are its contract with TRL.
"""

import collections
import inspect
import re

import pytest
import torch
import transformers
import trl
from conftest import digit_reward, make_config
from transformers import set_seed
from trl.rewards import get_soft_overlong_punishment
from trl.rewards.other_rewards import _SoftOverlongPunishment
from trl.trainer.utils import RepeatSampler

from trl_plus.trainer.grpo import _MODEL_INPUT_KEYS, TRL_CHOICES_CHECKED_LATE, TRL_LOSS_TYPES


def length_reward(completions, **kwargs):
    """Characters in the completion; None (unscorable) for an empty one."""
    return [float(len(completion)) if completion else None for completion in completions]


def _trl_trainer(model_path, dataset, output_dir, trainer_class=trl.GRPOTrainer, **overrides):
    args = make_config(trl.GRPOConfig, output_dir, **overrides)
    return trainer_class(model_path, reward_funcs=[digit_reward, length_reward], args=args, train_dataset=dataset)


def _generation_batch(trainer, seed=0):
    """One generation batch from the training dataloader: per_device_train_batch_size * steps_per_generation rows."""
    trainer.model.train()
    set_seed(seed)
    return next(iter(trainer.get_train_dataloader()))


def _parameter_names(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_trl_version():
    assert trl.__version__.startswith("1.16")


# ---------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("_generate_and_score_completions", ["self", "inputs"]),
        ("_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
        ("_compute_loss", ["self", "model", "inputs"]),
        ("compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
        ("_prepare_inputs", ["self", "generation_batch"]),
        ("_generate", ["self", "prompts"]),  # generation accounting wraps it
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_load_optimizer_and_scheduler", ["self", "checkpoint"]),
        # transformers' Trainer, through TRL: the non-finite step guard wraps these.
        ("training_step", ["self", "model", "inputs", "num_items_in_batch"]),
        ("_get_grad_norm", ["self", "model", "grad_norm"]),
        ("log", ["self", "logs", "start_time"]),
        ("_save", ["self", "output_dir", "state_dict"]),
    ],
)
def test_private_method_signatures(method, parameters):
    assert _parameter_names(getattr(trl.GRPOTrainer, method)) == parameters


def test_get_per_token_logps_and_entropies_signature():
    signature = inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies)
    names = list(signature.parameters)
    assert names[:8] == [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ]
    # trl_plus forwards every multimodal input by keyword.
    assert set(_MODEL_INPUT_KEYS) <= set(names[8:])
    for name in ["batch_size", "compute_entropy", "compute_aux_loss", *_MODEL_INPUT_KEYS]:
        assert signature.parameters[name].default in (None, False)


def test_init_positional_order():
    # trl_plus.GRPOTrainer.__init__(model, reward_funcs, args, *positional, **kwargs) forwards positionals unchanged.
    assert _parameter_names(trl.GRPOTrainer.__init__)[:7] == [
        "self",
        "model",
        "reward_funcs",
        "args",
        "train_dataset",
        "eval_dataset",
        "processing_class",
    ]


def test_repeat_sampler_signature():
    # Dynamic sampling draws extra prompts with its own RepeatSampler.
    assert _parameter_names(RepeatSampler.__init__) == [
        "self",
        "data_source",
        "mini_repeat_count",
        "batch_size",
        "repeat_count",
        "shuffle",
        "seed",
    ]


def test_init_binds_the_datasets_and_environment_by_name():
    # trl_plus.GRPOTrainer binds its arguments to TRL's signature to check the datasets before the model loads.
    assert {"train_dataset", "eval_dataset", "environment_factory"} <= set(_parameter_names(trl.GRPOTrainer.__init__))


def test_train_sampler_draws_one_permutation_of_its_generator_per_pass():
    # trl_plus.trainer.epoch_order.EpochOrder rewinds `generator` to its seeded state and replays `epoch` of these
    # draws; transformers calls its `set_epoch` before each epoch (tests/test_epoch_order.py resumes through it).
    assert _parameter_names(trl.GRPOTrainer._get_train_sampler) == ["self", "dataset"]
    sampler = RepeatSampler(range(6), mini_repeat_count=2, batch_size=3, seed=1)
    assert sampler.shuffle and sampler.num_samples == 6
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert list(sampler)[::2] == torch.randperm(6, generator=generator).tolist()


def test_repeat_sampler_drops_a_partial_batch():
    # A dataset smaller than one batch of prompts gives no batch at all: trl_plus raises for it at construction.
    assert len(RepeatSampler(range(3), mini_repeat_count=4, batch_size=4)) == 0
    assert len(RepeatSampler(range(4), mini_repeat_count=4, batch_size=4)) == 16
    assert len(RepeatSampler(range(7), mini_repeat_count=4, batch_size=4)) == 16
    assert list(RepeatSampler(range(3), mini_repeat_count=4, batch_size=4, shuffle=False)) == []


def test_soft_overlong_punishment_is_an_instance_of_its_class():
    # trl_plus refuses `overlong_buffer_len` with TRL's penalty already in reward_funcs by this class.
    assert isinstance(get_soft_overlong_punishment(8, 2), _SoftOverlongPunishment)


def test_trl_checks_these_choices_only_where_it_reads_them():
    # trl_plus.GRPOConfig checks them at construction; each must be a value TRL's step code handles.
    generate_source = inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    loss_source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    sources = {
        "scale_rewards": generate_source,
        "multi_objective_aggregation": generate_source,
        "vllm_importance_sampling_mode": generate_source,
        "importance_sampling_level": loss_source,
    }
    for field, source in sources.items():
        for value in TRL_CHOICES_CHECKED_LATE[field]:
            if isinstance(value, str):
                assert f'"{value}"' in source, (field, value)


def test_trl_maps_the_boolean_scale_rewards(tmp_path):
    assert make_config(trl.GRPOConfig, tmp_path, scale_rewards=True).scale_rewards == "group"
    assert make_config(trl.GRPOConfig, tmp_path, scale_rewards=False).scale_rewards == "none"


def test_training_loop_takes_max_steps_from_set_initial_training_values():
    # PPOTrainer wraps `set_initial_training_values` to check value pretraining against the run's steps.
    assert _parameter_names(transformers.Trainer.set_initial_training_values) == ["self", "args", "dataloader"]
    source = inspect.getsource(transformers.Trainer._inner_training_loop)
    assert re.search(r"max_steps,\s*\) = self\.set_initial_training_values\(args, train_dataloader\)", source)


def test_loss_is_scaled_for_gradient_accumulation():
    # `_compute_loss` divides by the accumulation steps itself; trl_plus's registry loss does the same.
    assert trl.GRPOTrainer.loss_is_scaled_for_ga is True


def test_trl_loss_types_are_the_ones_trl_plus_keeps():
    help_text = {f.name: f for f in trl.GRPOConfig.__dataclass_fields__.values()}["loss_type"].metadata["help"]
    supported = re.search(r"Supported values are (.*?)\.", help_text).group(1)
    assert set(re.findall(r"'(\w+)'", supported)) == set(TRL_LOSS_TYPES)
    source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    for loss_type in TRL_LOSS_TYPES:
        assert f'"{loss_type}"' in source


@pytest.mark.parametrize(
    "field",
    [
        "epsilon",
        "epsilon_high",
        "beta",
        "loss_type",
        "scale_rewards",
        "importance_sampling_level",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "entropy_coef",
        "use_adaptive_entropy",
        "delta",
        "multi_objective_aggregation",
        "use_bias_correction_kl",
        "mask_truncated_completions",
        "steps_per_generation",
        "generation_batch_size",
        "num_iterations",
        "use_vllm",
        "vllm_importance_sampling_correction",
        "reward_weights",
        "num_generations_eval",
        "entropy_target",
        "entropy_coef_delta",
        "entropy_coef_min",
        "entropy_coef_max",
    ],
)
def test_config_fields_trl_plus_reads(field):
    assert field in trl.GRPOConfig.__dataclass_fields__


# ---------------------------------------------------------------------------------------------- a built trainer


def test_attributes_set_in_init(tiny_model_path, prompt_dataset, tmp_path):
    trainer = _trl_trainer(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        beta=0.1,
        epsilon=0.25,
        epsilon_high=0.3,
        reward_weights=[1.0, 0.5],
        per_device_train_batch_size=4,
        steps_per_generation=2,
    )
    assert trainer.epsilon_low == 0.25 and trainer.epsilon_high == 0.3
    assert trainer.beta == 0.1 and trainer.ref_model is not None
    assert trainer.num_generations == 4 and trainer.num_generations_eval == 4  # defaults to num_generations
    torch.testing.assert_close(trainer.reward_weights, torch.tensor([1.0, 0.5]))
    assert trainer.max_completion_length == 8
    assert trainer.aux_loss_enabled is False
    assert trainer.use_vllm is False
    assert trainer.vllm_importance_sampling_correction is True  # TRL's default; only read with use_vllm
    assert set(trainer._metrics) == {"train", "eval"}
    assert isinstance(trainer._metrics["train"], collections.defaultdict)
    assert trainer._metrics["train"]["anything"] == []
    assert isinstance(trainer._logs["advantages"], collections.deque)
    assert trainer._logs["advantages"].maxlen == 8  # the generation batch: 4 rows x 2 steps per generation
    assert trainer._tokenizer.pad_token_id == 0
    assert trainer._train_batch_size == 4
    assert trainer.shuffle_dataset is True
    assert trainer._name == "GRPO"
    assert trainer.reward_func_names == ["digit_reward", "length_reward"]  # parallel to `reward_funcs`
    assert callable(trainer._get_dataloader)
    assert trainer.environment_factories is None and trainer.tools == []  # ttrl_num_votes refuses either

    trainer_without_kl = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path / "no-kl")
    assert trainer_without_kl.ref_model is None
    torch.testing.assert_close(trainer_without_kl.reward_weights, torch.ones(2))
    assert trainer_without_kl.epsilon_high == trainer_without_kl.epsilon_low == 0.2  # epsilon_high None -> epsilon


def test_current_gradient_accumulation_steps_is_set_by_the_training_loop(tiny_model_path, prompt_dataset, tmp_path):
    # Not an __init__ attribute: transformers' training loop sets it before each optimizer step, and TRL's
    # `_compute_loss` (and trl_plus's) reads it in train mode.
    trainer = _trl_trainer(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
    )
    trainer.train()
    assert trainer.current_gradient_accumulation_steps == 2


def test_generate_and_score_output_keys_on_policy(tiny_model_path, prompt_dataset, tmp_path):
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path)
    output = trainer._generate_and_score_completions(_generation_batch(trainer))
    assert set(output) == {
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "advantages",
        "num_items_in_batch",
    }
    batch_size, length = output["completion_ids"].shape
    assert batch_size == 8 and 1 <= length <= 8
    assert output["prompt_ids"].shape == output["prompt_mask"].shape and output["prompt_ids"].size(0) == 8
    assert output["completion_mask"].shape == (8, length)
    assert output["advantages"].shape == (8,)
    assert output["num_items_in_batch"].dim() == 0
    assert output["num_items_in_batch"].item() == output["completion_mask"].sum().item()
    # Groups of num_generations: GRPO advantages sum to ~0 within each group.
    torch.testing.assert_close(output["advantages"].view(2, 4).sum(1), torch.zeros(2), atol=1e-4, rtol=0)


def test_generate_and_score_output_keys_off_policy_with_kl(tiny_model_path, prompt_dataset, tmp_path):
    # gradient_accumulation_steps (1) % (steps_per_generation * num_iterations) (2) != 0: TRL computes the sampling
    # policy's log-probs, the rule `trl_plus.GRPOConfig.has_old_log_probs` mirrors.
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path, beta=0.1, num_iterations=2)
    output = trainer._generate_and_score_completions(_generation_batch(trainer))
    assert {"old_per_token_logps", "ref_per_token_logps"} <= set(output)
    shape = output["completion_ids"].shape
    assert output["old_per_token_logps"].shape == shape and output["ref_per_token_logps"].shape == shape
    # The policy has not been updated and is the reference model's copy: both log-probs coincide on valid tokens.
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(output["old_per_token_logps"][mask], output["ref_per_token_logps"][mask])
    assert (output["old_per_token_logps"][mask] < 0).all()


def test_generate_returns_completion_ids_and_tool_mask_third(tiny_model_path, prompt_dataset, tmp_path):
    # trl_plus counts generated completions and tokens from `_generate`'s 2nd (completion ids, one list per row) and
    # 3rd (tool mask, None without tools) items; TRL's `completions/mean_length` is their mean length.
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path)
    prompts = [row["prompt"] for row in _generation_batch(trainer)]
    generated = trainer._generate(prompts)
    assert len(generated) == 8
    completion_ids, tool_mask = generated[1], generated[2]
    assert tool_mask is None and len(completion_ids) == len(prompts) == 8
    assert all(isinstance(ids, list) and 1 <= len(ids) <= 8 for ids in completion_ids)
    mean_length = trainer._metrics["eval" if not trainer.model.training else "train"]["completions/mean_length"][-1]
    assert mean_length == pytest.approx(sum(map(len, completion_ids)) / 8)


def test_generate_returns_decoded_completions_fourth(tiny_model_path, prompt_dataset, tmp_path):
    # TTRL's vote-only completions (`ttrl_num_votes`) are `_generate`'s 4th item: one decoded text per row, in the
    # rows' order (strings for text prompts), the decoding of the 2nd item.
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path)
    prompts = [row["prompt"] for row in _generation_batch(trainer)]
    generated = trainer._generate(prompts)
    completion_ids, completions = generated[1], generated[3]
    assert completions == trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    assert len(completions) == len(prompts) and all(isinstance(text, str) for text in completions)


def test_calculate_rewards_passes_input_columns_as_keywords(tiny_model_path, prompt_dataset, tmp_path):
    # TTRL's vote-only completions reach the reward functions as an input column (`ttrl_votes`): TRL passes every
    # input key but prompt / completion / completion_ids as a keyword list, one value per row.
    seen = {}

    def recording_reward(completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    args = make_config(trl.GRPOConfig, tmp_path)
    trainer = trl.GRPOTrainer(tiny_model_path, reward_funcs=recording_reward, args=args, train_dataset=prompt_dataset)
    inputs = [{**row, "ttrl_votes": [f"vote {index}"]} for index, row in enumerate(_generation_batch(trainer))]
    prompts = [row["prompt"] for row in inputs]
    trainer._calculate_rewards(inputs, prompts, ["1"] * len(inputs), [[4]] * len(inputs))
    assert seen["ttrl_votes"] == [[f"vote {index}"] for index in range(len(inputs))]
    assert seen["prompts"] == prompts


def test_calculate_rewards_shape_and_unscorable_nan(tiny_model_path, prompt_dataset, tmp_path):
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path)
    trainer.model.train()
    inputs = _generation_batch(trainer)
    prompts = [example["prompt"] for example in inputs]
    completions = ["12", "", "a1b2c3", "x", "", "9", "zz", "1"]
    completion_ids = [[3 + int(ch, 36) for ch in completion] for completion in completions]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, completion_ids)
    # (num_processes * local batch, num reward functions), gathered from every process.
    assert rewards.shape == (trainer.accelerator.num_processes * len(inputs), 2)
    expected_digits = torch.tensor([2.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(rewards[:, 0], expected_digits)
    nan = float("nan")
    torch.testing.assert_close(rewards[:, 1], torch.tensor([2.0, nan, 6.0, 1.0, nan, 1.0, 2.0, 1.0]), equal_nan=True)


def test_hooks_are_called_through_self(tiny_model_path, prompt_dataset, tmp_path):
    # trl_plus overrides `_calculate_rewards`, `_generate_and_score_completions`, `_compute_loss` and (transformers')
    # `_get_grad_norm`; TRL and transformers must keep calling them through `self` (not a module function or a
    # name-mangled copy) for the overrides to take effect.
    calls = collections.Counter()

    class Recording(trl.GRPOTrainer):
        def _calculate_rewards(self, *args):
            calls["_calculate_rewards"] += 1
            return super()._calculate_rewards(*args)

        def _generate_and_score_completions(self, inputs):
            calls["_generate_and_score_completions"] += 1
            return super()._generate_and_score_completions(inputs)

        def _compute_loss(self, model, inputs):
            calls["_compute_loss"] += 1
            return super()._compute_loss(model, inputs)

        def _get_grad_norm(self, model, grad_norm=None):
            # Once per optimizer step, with the accumulated gradients still on the parameters.
            assert any(param.grad is not None for param in model.parameters())
            calls["_get_grad_norm"] += 1
            return super()._get_grad_norm(model, grad_norm=grad_norm)

    trainer = _trl_trainer(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        trainer_class=Recording,
        per_device_train_batch_size=4,
        steps_per_generation=2,
        max_steps=3,
    )
    trainer.train()
    # 3 optimizer steps of one micro-batch each; a generation batch serves steps_per_generation = 2 micro-batches.
    assert calls == {
        "_calculate_rewards": 2,
        "_generate_and_score_completions": 2,
        "_compute_loss": 3,
        "_get_grad_norm": 3,
    }


def test_prepare_inputs_splits_generation_batch(tiny_model_path, prompt_dataset, tmp_path):
    trainer = _trl_trainer(
        tiny_model_path, prompt_dataset, tmp_path, per_device_train_batch_size=4, steps_per_generation=2
    )
    trainer._step, trainer._buffered_inputs = 0, None
    micro_batch = trainer._prepare_inputs(_generation_batch(trainer))
    assert len(trainer._buffered_inputs) == 2  # steps_per_generation slices of per_device_train_batch_size rows
    assert micro_batch is trainer._buffered_inputs[0]
    assert all(piece["completion_ids"].size(0) == 4 for piece in trainer._buffered_inputs)
    # num_items_in_batch is a per-generation-batch scalar shared by the slices.
    total = sum(piece["completion_mask"].sum() for piece in trainer._buffered_inputs)
    assert micro_batch["num_items_in_batch"].item() == total.item()


def test_mask_truncated_completions_zeroes_completion_mask(tiny_model_path, prompt_dataset, tmp_path):
    # trl_plus's losses and estimators read the loss mask from `completion_mask`: TRL's overlong filtering must
    # act there.
    trainer = _trl_trainer(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        mask_truncated_completions=True,
        generation_kwargs={"suppress_tokens": [0, 1]},  # no <pad>, no <eos>: every completion is truncated
    )
    output = trainer._generate_and_score_completions(_generation_batch(trainer))
    assert output["completion_ids"].shape == (8, 8)
    assert output["completion_mask"].sum().item() == 0
    assert output["num_items_in_batch"].item() == 0


# ---------------------------------------------------------------------------------------------- vLLM weight sync


def test_vllm_sync_walks_the_named_parameters_of_the_model_it_was_given():
    """`trl_plus.trainer.vllm_sync` hides the critic's modules from `VLLMGeneration.model` and wraps the instance's
    `sync_weights`: TRL must build the generation object with the trainer's own model, call `sync_weights` through
    the instance from every place it syncs, and read the weights only from `model.named_parameters()` (merging the
    active PEFT adapter). `tests/test_ppo_vllm.py` stands in for vLLM at `_init_vllm` and `generate`."""
    from trl.generation.vllm_generation import VLLMGeneration

    init_source = inspect.getsource(trl.GRPOTrainer.__init__)
    assert re.search(r"self\.vllm_generation = VLLMGeneration\(\s*model=self\.model,", init_source)
    sync_sites = [
        inspect.getsource(trl.GRPOTrainer._generate_single_turn),
        inspect.getsource(trl.GRPOTrainer._generate),
        inspect.getsource(VLLMGeneration.generate),
    ]
    assert all(re.search(r"self(\.vllm_generation)?\.sync_weights\(\)", source) for source in sync_sites)
    iter_source = inspect.getsource(VLLMGeneration._iter_named_params)
    assert "model = self.model" in iter_source and "model.merge_adapter()" in iter_source
    assert iter_source.count("model.named_parameters()") == 2  # PEFT and plain; FSDP walks the module in its helpers
    sync_source = inspect.getsource(VLLMGeneration.sync_weights)
    assert "model_runner.model.load_weights([(name, param)])" in sync_source  # colocate
    assert "self.vllm_client.update_named_params(self._weight_metadata, self._iter_named_params())" in sync_source
    assert _parameter_names(VLLMGeneration._init_vllm) == ["self"]
    assert _parameter_names(VLLMGeneration.generate) == ["self", "prompts", "images", "num_generations", "profiler"]


def test_loss_option_helpers_and_entropy_controller_state(tiny_model_path, prompt_dataset, tmp_path):
    # The registry loss path calls TRL's mask helpers and keeps the entropy controller in TRL's attributes, which
    # TRL's `_save_checkpoint` / `_load_optimizer_and_scheduler` write to and read from entropy_ctrl_state.json.
    assert _parameter_names(trl.GRPOTrainer.get_high_entropy_mask) == ["self", "entropies", "mask", "threshold"]
    assert _parameter_names(trl.GRPOTrainer.get_off_policy_mask) == [
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ]
    trainer = _trl_trainer(
        tiny_model_path,
        prompt_dataset,
        tmp_path,
        use_adaptive_entropy=True,
        entropy_coef=0.05,
        top_entropy_quantile=0.5,
    )
    assert trainer._entropy_bonus_enabled is True and trainer.use_adaptive_entropy is True
    assert trainer.entropy_coef == 0.05
    assert trainer._last_world_entropy == float("inf") and trainer._entropy_window_stats is None
    assert trainer.top_entropy_quantile == 0.5 and trainer.off_policy_mask_threshold is None
    assert trainer.importance_sampling_level == "token"
    source = inspect.getsource(trl.GRPOTrainer._save_checkpoint)
    assert "entropy_ctrl_state.json" in source and "_last_world_entropy" in source


# ---------------------------------------------------------------------------------------------- RLHF pipeline


def test_trainer_resume_loads_checkpoint_subfolders_holding_adapter_weights_as_adapters():
    """Why `trl_plus.trainer.lora_value_model` saves a LoRA value model as `value_model/critic.safetensors` and not
    PEFT's `adapter_model.safetensors`: the Trainer's resume loads every checkpoint subfolder holding that file as an
    adapter of the (PEFT) policy."""
    source = inspect.getsource(transformers.Trainer._load_from_checkpoint)
    assert "os.listdir(resume_from_checkpoint)" in source
    assert "ADAPTER_SAFE_WEIGHTS_NAME" in source and "load_adapter" in source


def test_reward_trainer_appends_eos_to_plain_text_pairs_and_keeps_pre_tokenized_ones(tiny_model_path, tmp_path):
    """`trl_plus.scripts.rlhf.pairs_tokenized_as_ppo_scores` relies on both: plain-text pairs get an eos that GRPO's
    reward-model scoring (`prompt + completion`, no special tokens) never shows the reward model, and pairs given as
    `chosen_ids` / `rejected_ids` are used as they are."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    args = trl.RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    text = Dataset.from_dict({"prompt": ["ab="], "chosen": ["1"], "rejected": ["x"]})
    ids = Dataset.from_dict({"chosen_ids": [[5, 6]], "rejected_ids": [[7]]})
    for dataset, chosen in [(text, tokenizer("ab=1")["input_ids"] + [tokenizer.eos_token_id]), (ids, [5, 6])]:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        assert trainer.train_dataset[0]["chosen_ids"] == chosen


def test_sampling_temperature_attributes_and_entropy_metric(tiny_model_path, prompt_dataset, tmp_path):
    # AEPO samples its regularizer at another temperature by setting the temperature TRL's generation reads at each
    # call (`generation_config` for transformers' generate, `generation_kwargs` for continuous batching,
    # `VLLMGeneration.temperature` for vLLM) while `temperature`, which scales the log-probs' logits, stays; and it
    # reads the update's entropy from TRL's global `entropy` metric, one value per `_compute_loss` call.
    trainer = _trl_trainer(tiny_model_path, prompt_dataset, tmp_path, temperature=0.9)
    assert trainer.temperature == 0.9
    assert trainer.generation_config.temperature == 0.9 and trainer.generation_kwargs["temperature"] == 0.9
    generate_source = inspect.getsource(trl.generation.vllm_generation.VLLMGeneration.generate)
    assert "temperature = self.temperature" in generate_source
    single_turn_source = inspect.getsource(trl.GRPOTrainer._generate_single_turn)
    assert "generation_config=self.generation_config" in single_turn_source
    assert "generation_kwargs=self.generation_kwargs" in single_turn_source
    loss_source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    assert 'self._metrics[mode]["entropy"].append(global_masked_mean(entropies))' in loss_source


def test_sharded_saves_pass_the_gathered_state_dict_and_resumes_load_after_prepare():
    """PPO's critic under FSDP2 / DeepSpeed (`PPOTrainer._save`, `_load_critic_weights`): `Trainer.save_model` gathers
    the full state dict (accelerate's `get_state_dict`: torch's full `get_model_state_dict` under FSDP2, ZeRO-3's
    consolidated one) and passes it to `_save`, where the critic's tensors are taken from it; a resume loads the
    weights after `accelerate.prepare`, through `_load_from_checkpoint` under FSDP (with the prepared model) and
    through DeepSpeed's own engine checkpoint, not `_load_from_checkpoint`, under DeepSpeed."""
    import accelerate
    from accelerate.utils import fsdp_utils

    save_source = inspect.getsource(transformers.Trainer.save_model)
    fsdp_branch = save_source[
        save_source.index("elif self.is_fsdp_enabled:") : save_source.index("elif self.is_deepspeed")
    ]
    assert "state_dict = self.accelerator.get_state_dict(self.model)" in fsdp_branch
    assert "self._save(output_dir, state_dict=state_dict)" in fsdp_branch
    deepspeed_branch = save_source[save_source.index("elif self.is_deepspeed_enabled:") :]
    assert deepspeed_branch.count("self._save(output_dir, state_dict=state_dict)") == 1
    state_source = inspect.getsource(accelerate.Accelerator.get_state_dict)
    assert (
        "options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)" in state_source
    )
    assert "state_dict = get_model_state_dict(model, options=options)" in state_source

    prepare_source = inspect.getsource(transformers.Trainer._prepare_for_training)
    assert re.search(r"if self\.is_deepspeed_enabled:\s*deepspeed_load_checkpoint\(", prepare_source)
    assert re.search(
        r"elif is_sagemaker_mp_enabled\(\) or self\.is_fsdp_enabled:\s*"
        r"self\._load_from_checkpoint\(resume_from_checkpoint, self\.model_wrapped\)",
        prepare_source,
    )
    # Without an `optimizer` section in the DeepSpeed config, DeepSpeed wraps the Trainer's own optimizer (PPO's critic
    # parameter groups); `sharding.check_deepspeed_optimizer` refuses the section with a separate critic rate.
    from transformers.integrations.deepspeed import deepspeed_optim_sched

    optim_source = inspect.getsource(deepspeed_optim_sched)
    assert re.search(r'if "optimizer" in config:\s*optimizer = DummyOptim\(', optim_source)
    assert "optimizer = trainer.create_optimizer()" in optim_source
    # tests/distributed/check_ppo_fsdp.py shards the model with accelerate's own FSDP2 preparation.
    assert _parameter_names(fsdp_utils.fsdp2_prepare_model) == ["accelerator", "model"]
