"""`trl_plus.GRPOConfig` and the preset configs: validation at construction, routing properties, defaults.

Every invalid setting must fail when the config is built (not steps into training), with a message that names the
field; the valid choices listed in messages and help text come from the registries in `trl_plus.algos`.
"""

import dataclasses
import logging
import math
import re

import pytest
import trl
from conftest import make_config

import trl_plus
from trl_plus.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from trl_plus.trainer.field_types import _simple_fields, check_field_types
from trl_plus.trainer.grpo import NEW_LOSS_TYPES, TRL_CHOICES_CHECKED_LATE, TRL_LOSS_TYPES, loss_types_reading

# ---------------------------------------------------------------------------------------------- unknown choices


@pytest.mark.parametrize(
    ("field", "value", "registry_names"),
    [
        ("advantage_estimator", "gae", ADVANTAGES.names()),
        ("kl_estimator", "k4", KL_ESTIMATORS.names()),
        ("loss_aggregation", "sum", AGGREGATIONS.names()),
    ],
)
def test_unknown_choice_names_field_and_lists_registry_choices(tmp_path, field, value, registry_names):
    with pytest.raises(ValueError) as excinfo:
        make_config(trl_plus.GRPOConfig, tmp_path, **{field: value})
    message = str(excinfo.value)
    assert f"`{field}`" in message
    assert repr(value) in message
    # The listed choices are exactly the registry's names, so messages cannot drift from what is implemented.
    assert f"valid choices: {registry_names}" in message


@pytest.mark.parametrize("loss_type", ["ppo", "ppo_clip", "GRPO"])
def test_unknown_loss_type_lists_trl_and_trl_plus_loss_types(tmp_path, loss_type):
    # "ppo_clip" is a registered policy loss but not a loss_type: TRL's grpo/dapo/dr_grpo already name PPO-clip.
    with pytest.raises(ValueError) as excinfo:
        make_config(trl_plus.GRPOConfig, tmp_path, loss_type=loss_type)
    message = str(excinfo.value)
    assert "`loss_type`" in message
    listed = re.search(r"valid choices: (\[.*\])", message).group(1)
    expected = [*TRL_LOSS_TYPES, *(name for name in POLICY_LOSSES.names() if name != "ppo_clip")]
    assert listed == str(expected)


def test_new_loss_types_are_the_registered_policy_losses_except_ppo_clip():
    assert set(NEW_LOSS_TYPES) == set(POLICY_LOSSES.names()) - {"ppo_clip"}
    assert {"aspo", "clip_cov", "kl_cov"} <= set(NEW_LOSS_TYPES)
    assert not set(NEW_LOSS_TYPES) & set(TRL_LOSS_TYPES)


@pytest.mark.parametrize(
    ("field", "registry"),
    [("advantage_estimator", ADVANTAGES), ("kl_estimator", KL_ESTIMATORS), ("loss_aggregation", AGGREGATIONS)],
)
def test_help_text_lists_registry_names(field, registry):
    help_text = {f.name: f for f in dataclasses.fields(trl_plus.GRPOConfig)}[field].metadata["help"]
    assert str(registry.names()) in help_text


# ---------------------------------------------------------------------------------------------- invalid values

# (overrides, words the message must contain)
INVALID_CONFIGS = {
    "beta<0": ({"beta": -0.1}, ["`beta` is -0.1; valid: >= 0"]),
    "epsilon<0": ({"epsilon": -0.1}, ["`epsilon`", "-0.1"]),
    "epsilon_high<0": ({"epsilon_high": -0.1}, ["`epsilon_high`", "-0.1"]),
    "dual_clip_c=1": ({"dual_clip_c": 1.0}, ["`dual_clip_c`", "> 1"]),
    "dual_clip_c<1": ({"dual_clip_c": 0.5}, ["`dual_clip_c`", "0.5"]),
    "aspo_neg_clip=1": ({"aspo_neg_clip": 1.0}, ["`aspo_neg_clip`", "> 1"]),
    "aspo_pos_clip<1": ({"aspo_pos_clip": 0.5}, ["`aspo_pos_clip`", "> 1"]),
    "clip_cov_ratio=0": ({"clip_cov_ratio": 0.0}, ["`clip_cov_ratio`", "(0, 1]"]),
    "clip_cov_ratio>1": ({"clip_cov_ratio": 1.5}, ["`clip_cov_ratio`", "1.5"]),
    "kl_cov_ratio=0": ({"kl_cov_ratio": 0.0}, ["`kl_cov_ratio`", "(0, 1]"]),
    "clip_cov_lb=ub": ({"clip_cov_lb": 5.0, "clip_cov_ub": 5.0}, ["`clip_cov_lb`", "`clip_cov_ub`"]),
    "kl_cov_coef<0": ({"kl_cov_coef": -1.0}, ["`kl_cov_coef`", "-1.0"]),
    # RLOO's baseline is the mean of the G - 1 other completions of the group.
    "rloo G=1": ({"advantage_estimator": "rloo", "num_generations": 1}, ["rloo", "num_generations >= 2", "got 1"]),
    "kl_in_reward beta=0": ({"kl_in_reward": True, "beta": 0.0}, ["`kl_in_reward=True`", "beta > 0"]),
    "kl_estimator k1 beta=0": ({"kl_estimator": "k1", "beta": 0.0}, ["`kl_estimator='k1'`", "beta > 0"]),
    "kl_estimator k2 beta=0": ({"kl_estimator": "k2", "beta": 0.0}, ["`kl_estimator='k2'`", "beta > 0"]),
    "rloo normalize_then_sum": (
        {"advantage_estimator": "rloo", "multi_objective_aggregation": "normalize_then_sum"},
        ["advantage_estimator='rloo'", "multi_objective_aggregation"],
    ),
    # trl_plus's loss options only modify the PPO-clip loss types (and its own loss types).
    "dual_clip cispo": ({"loss_type": "cispo", "dual_clip_c": 3.0}, ["loss_type='cispo'", "dual_clip_c"]),
    "dual_clip bnpo": ({"loss_type": "bnpo", "dual_clip_c": 3.0}, ["loss_type='bnpo'"]),
    "kl_estimator sapo": ({"loss_type": "sapo", "beta": 0.1, "kl_estimator": "k2"}, ["loss_type='sapo'"]),
    "loss_aggregation vespo": ({"loss_type": "vespo", "loss_aggregation": "token_mean"}, ["loss_type='vespo'"]),
    "kl_in_reward luspo": ({"loss_type": "luspo", "beta": 0.1, "kl_in_reward": True}, ["loss_type='luspo'"]),
    # TRL loss options whose meaning a trl_plus loss lacks are refused, saying why.
    "aspo + delta": (
        {"loss_type": "aspo", "delta": 2.0, "num_iterations": 2},
        ["`delta` is 2.0", "loss_type='aspo'", "aspo_neg_clip", "['ce_gppo', 'clip_cov', 'gppo', 'grpo'"],
    ),
    "kl_cov + delta": ({"loss_type": "kl_cov", "delta": 2.0, "num_iterations": 2}, ["loss_type='kl_cov'", "delta"]),
    "clip_cov + sequence IS": (
        {"loss_type": "clip_cov", "importance_sampling_level": "sequence"},
        ["importance_sampling_level='sequence'", "loss_type='clip_cov'", "token-level covariance"],
    ),
    "kl_cov + sequence IS": (
        {"loss_type": "kl_cov", "importance_sampling_level": "sequence", "num_iterations": 2},
        ["importance_sampling_level='sequence'", "loss_type='kl_cov'"],
    ),
    "entropy advantage + cispo": (
        {"loss_type": "cispo", "entropy_advantage_alpha": 0.4},
        ["entropy_advantage_alpha", "loss_type='cispo'"],
    ),
    "entropy advantage alpha < 0": ({"entropy_advantage_alpha": -0.1}, ["`entropy_advantage_alpha` is -0.1"]),
    "entropy advantage kappa <= 1": ({"entropy_advantage_kappa": 1.0}, ["`entropy_advantage_kappa` is 1.0", "> 1"]),
    "ce_gppo beta < 0": ({"loss_type": "ce_gppo", "ce_gppo_beta_low": -0.5}, ["`ce_gppo_beta_low` is -0.5"]),
    # KL-Cov penalizes |logp - old_logp|, identically 0 when every update is on-policy.
    "kl_cov on-policy": ({"loss_type": "kl_cov"}, ["loss_type='kl_cov'", "num_iterations > 1"]),
    "kl_cov aligned GA": (
        {"loss_type": "kl_cov", "gradient_accumulation_steps": 4, "steps_per_generation": 2},
        ["loss_type='kl_cov'"],
    ),
}


@pytest.mark.parametrize(("overrides", "expected_words"), INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys())
def test_invalid_config_raises_at_construction(tmp_path, overrides, expected_words):
    with pytest.raises(ValueError) as excinfo:
        make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    for word in expected_words:
        assert word in str(excinfo.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dual_clip_c": 1.0001},
        {"epsilon": 0.0, "epsilon_high": 0.0},
        {"clip_cov_ratio": 1.0, "kl_cov_ratio": 1.0},
        {"advantage_estimator": "rloo", "num_generations": 2, "per_device_train_batch_size": 2},
        {"kl_in_reward": True, "beta": 1e-3},
        {"kl_estimator": "k2", "beta": 1e-3},
        {"loss_type": "kl_cov", "num_iterations": 2},
        {"loss_type": "kl_cov", "gradient_accumulation_steps": 2, "steps_per_generation": 4},
        {"loss_type": "cispo", "importance_sampling_level": "sequence"},  # TRL path: TRL's options stay available
        {"loss_type": "dapo", "delta": 2.0, "top_entropy_quantile": 0.5, "entropy_coef": 0.01},
        # TRL's loss options compose with the registry path (tests/test_trainer.py checks their meaning).
        {"dual_clip_c": 3.0, "importance_sampling_level": "sequence", "delta": 2.0},
        {"loss_type": "aspo", "importance_sampling_level": "sequence", "num_iterations": 2},
        {"loss_aggregation": "token_mean", "top_entropy_quantile": 0.5, "use_adaptive_entropy": True},
        {"loss_type": "clip_cov", "off_policy_mask_threshold": 0.5, "entropy_coef": 0.01, "delta": 2.0},
        {"loss_type": "gppo", "importance_sampling_level": "sequence", "delta": 2.0, "entropy_advantage_alpha": 0.4},
        {"entropy_advantage_alpha": 0.4, "entropy_advantage_kappa": 1.0001},
    ],
)
def test_boundary_configs_are_accepted(tmp_path, overrides):
    config = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value


def test_negative_beta_raises_in_a_preset_that_puts_the_kl_in_the_reward(tmp_path):
    # REINFORCE++ folds -beta * KL into the reward: a negative beta would reward drifting from the reference.
    with pytest.raises(ValueError, match=re.escape("`beta` is -0.05; valid: >= 0")):
        make_config(trl_plus.ReinforcePPConfig, tmp_path, beta=-0.05)


def test_aspo_on_policy_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(trl_plus.GRPOConfig, tmp_path, loss_type="aspo")
    assert any("loss_type='aspo'" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(trl_plus.GRPOConfig, tmp_path, loss_type="aspo", steps_per_generation=2)
    assert not any("loss_type='aspo'" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("estimator", ADVANTAGES.names())
def test_every_registered_estimator_is_a_valid_choice(tmp_path, estimator):
    assert make_config(trl_plus.GRPOConfig, tmp_path, advantage_estimator=estimator).advantage_estimator == estimator


# ---------------------------------------------------------------------------------------------- TRL's late checks


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scale_rewards", "bogus"),
        ("scale_rewards", "True"),  # TRL maps the bools True / False, not their strings
        ("multi_objective_aggregation", "sum"),
        ("importance_sampling_level", "seq"),
        ("vllm_importance_sampling_mode", "token"),
    ],
)
def test_trl_fields_checked_only_at_the_first_step_raise_at_construction(tmp_path, field, value):
    with pytest.raises(ValueError) as excinfo:
        make_config(trl_plus.GRPOConfig, tmp_path, **{field: value})
    assert str(excinfo.value) == f"`{field}` is {value!r}; valid choices: {list(TRL_CHOICES_CHECKED_LATE[field])}."


def test_scale_rewards_choices_are_trls_with_its_boolean_aliases(tmp_path):
    assert TRL_CHOICES_CHECKED_LATE["scale_rewards"] == ("group", "batch", "none", True, False)
    for value, expected in [("batch", "batch"), (True, "group"), (False, "none")]:
        assert make_config(trl_plus.GRPOConfig, tmp_path, scale_rewards=value).scale_rewards == expected


# ---------------------------------------------------------------------------------------------- field types


@pytest.mark.parametrize(
    ("config_class", "field", "value", "error", "valid"),
    [
        # trl_plus's fields
        (trl_plus.GRPOConfig, "dual_clip_c", math.nan, ValueError, "a finite float or None"),
        (trl_plus.GRPOConfig, "kl_cov_coef", math.inf, ValueError, "a finite float"),
        (trl_plus.GRPOConfig, "kl_in_reward", "yes", TypeError, "True or False"),
        (trl_plus.GRPOConfig, "dynamic_sampling", 1, TypeError, "True or False"),
        (trl_plus.GRPOConfig, "max_num_gen_batches", 1.5, TypeError, "an int"),
        (trl_plus.GRPOConfig, "max_num_gen_batches", True, TypeError, "an int"),  # a bool is not an int here
        (trl_plus.GRPOConfig, "overlong_buffer_len", 2.0, TypeError, "an int or None"),
        (trl_plus.PPOConfig, "gamma", "0.9", TypeError, "a finite float"),  # before PPO's range checks compare it
        (trl_plus.PPOConfig, "kl_horizon", math.inf, ValueError, "a finite float"),
        (trl_plus.VAPOConfig, "value_pretrain_steps", 1.5, TypeError, "an int"),
        (trl_plus.DAPOConfig, "epsilon_high", math.nan, ValueError, "a finite float or None"),
        # TRL's and transformers' fields with a simple annotation
        (trl_plus.GRPOConfig, "temperature", math.nan, ValueError, "a finite float"),
        (trl_plus.GRPOConfig, "num_iterations", 2.0, TypeError, "an int"),
        (trl_plus.GRPOConfig, "mask_truncated_completions", "false", TypeError, "True or False"),
        (trl_plus.GRPOConfig, "learning_rate", "1e-6", TypeError, "a finite float"),
        (trl_plus.GRPOConfig, "max_steps", 1.5, TypeError, "an int"),
    ],
)
def test_a_value_of_the_wrong_type_raises_naming_the_field_and_the_valid_type(
    tmp_path, config_class, field, value, error, valid
):
    with pytest.raises(error) as excinfo:
        make_config(config_class, tmp_path, **{field: value})
    assert str(excinfo.value) == f"`{field}` is {value!r}; valid: {valid}."


@pytest.mark.parametrize(
    "overrides",
    [
        {"learning_rate": 1, "dual_clip_c": 3, "kl_cov_coef": 0},  # an int is a valid float
        {"epsilon_high": None, "max_completion_length": None, "dual_clip_c": None},  # `| None` fields
        {"num_generations": 2, "per_device_train_batch_size": 2, "steps_per_generation": 3, "kl_in_reward": False},
    ],
)
def test_values_of_the_annotated_types_are_accepted(tmp_path, overrides):
    config = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    assert {name: getattr(config, name) for name in overrides} == overrides


def test_field_type_check_covers_simple_annotations_of_every_layer_and_leaves_the_others():
    fields = _simple_fields(trl_plus.PPOConfig)
    assert fields["dual_clip_c"] == (float, True)  # trl_plus
    assert fields["gamma"] == (float, False)  # trl_plus's PPO
    assert fields["max_num_gen_batches"] == (int, False)
    assert fields["kl_in_reward"] == (bool, False)
    assert fields["temperature"] == (float, False) and fields["max_completion_length"] == (int, True)  # TRL
    assert fields["learning_rate"] == (float, False) and fields["bf16"] == (bool, True)  # transformers
    assert fields["max_steps"] == (int, False)
    # Unions with str, enums, lists and dicts are converted or checked by the code that reads them.
    for name in ("scale_rewards", "pad_to_multiple_of", "report_to", "lr_scheduler_type", "reward_weights", "fsdp"):
        assert name not in fields
    assert len(fields) > 150


CONFIG_CLASSES = [
    trl_plus.GRPOConfig,
    trl_plus.DAPOConfig,
    trl_plus.GSPOConfig,
    trl_plus.ASPOConfig,
    trl_plus.RLOOConfig,
    trl_plus.ReMaxConfig,
    trl_plus.ReinforcePPConfig,
    trl_plus.PPOConfig,
    trl_plus.VAPOConfig,
]


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_keeps_its_annotated_type_after_trl_and_transformers_post_init(tmp_path, config_class):
    # Defaults have their annotated types, and what TRL's and transformers' __post_init__ set (bf16 None -> bool,
    # steps_per_generation, generation_batch_size, ...) does too: a rebuilt or copied config passes the check again.
    config = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    check_field_types(config)


def test_command_line_values_have_the_annotated_types(tmp_path):
    from trl_plus.scripts.train import make_parser

    argv = [
        *("--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--use_cpu"),
        *("--bf16", "false", "--learning_rate", "1e-5", "--max_steps", "3", "--dual_clip_c", "3"),
        *("--kl_in_reward", "true", "--beta", "0.01", "--max_num_gen_batches", "4", "--overlong_buffer_len", "4"),
    ]
    _, config, _ = make_parser("grpo").parse_args_and_config(argv)
    assert (config.learning_rate, config.max_steps, config.dual_clip_c) == (1e-5, 3, 3.0)
    assert (config.kl_in_reward, config.max_num_gen_batches, config.overlong_buffer_len) == (True, 4, 4)


# ---------------------------------------------------------------------------------------------- loss hyperparameters


def test_loss_types_reading_each_hyperparameter_come_from_the_loss_signatures():
    assert loss_types_reading("dual_clip_c") == ["ce_gppo", "gppo", "grpo", "dapo", "dr_grpo"]
    assert loss_types_reading("delta") == ["ce_gppo", "clip_cov", "gppo", "grpo", "dapo", "dr_grpo"]
    assert loss_types_reading("ce_gppo_beta_low") == loss_types_reading("ce_gppo_beta_high") == ["ce_gppo"]
    assert loss_types_reading("aspo_neg_clip") == loss_types_reading("aspo_pos_clip") == ["aspo"]
    assert loss_types_reading("clip_cov_ratio") == loss_types_reading("clip_cov_ub") == ["clip_cov"]
    assert loss_types_reading("kl_cov_coef") == ["kl_cov"]
    assert loss_types_reading("beta") == []


@pytest.mark.parametrize("loss_type", ["aspo", "clip_cov", "kl_cov"])
def test_dual_clip_c_with_a_loss_that_does_not_read_it_raises(tmp_path, loss_type):
    # The registry loss is called with only the hyperparameters its signature names: dual_clip_c would be dropped.
    with pytest.raises(ValueError) as excinfo:
        make_config(trl_plus.GRPOConfig, tmp_path, loss_type=loss_type, dual_clip_c=3.0, num_iterations=2)
    assert str(excinfo.value) == (
        f"`dual_clip_c` is 3.0, which loss_type={loss_type!r} does not read; valid: loss_type in "
        "['ce_gppo', 'gppo', 'grpo', 'dapo', 'dr_grpo'], or dual_clip_c=None."
    )


def _no_effect_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "has no effect" in record.getMessage()]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"aspo_neg_clip": 2.0},
            "`aspo_neg_clip` is 2.0 but has no effect: only loss_type in ['aspo'] reads it, and loss_type is 'dapo'.",
        ),
        (
            {"loss_type": "aspo", "clip_cov_ratio": 1e-3, "steps_per_generation": 2},
            "`clip_cov_ratio` is 0.001 but has no effect: only loss_type in ['clip_cov'] reads it, and loss_type is "
            "'aspo'.",
        ),
        (
            {"loss_type": "grpo", "kl_cov_coef": 0.5},
            "`kl_cov_coef` is 0.5 but has no effect: only loss_type in ['kl_cov'] reads it, and loss_type is 'grpo'.",
        ),
        (
            {"dynamic_sampling_strict": True},
            "`dynamic_sampling_strict` is True but has no effect: dynamic_sampling is False.",
        ),
        ({"max_num_gen_batches": 3}, "`max_num_gen_batches` is 3 but has no effect: dynamic_sampling is False."),
        (
            {"overlong_penalty_factor": 0.5},
            "`overlong_penalty_factor` is 0.5 but has no effect: overlong_buffer_len is None (no overlong shaping).",
        ),
        (
            {"advantage_estimator": "rloo", "scale_rewards": "batch"},
            "`scale_rewards` is 'batch' but has no effect: only advantage_estimator='grpo' scales rewards, and it is "
            "'rloo'.",
        ),
        (
            {"scale_rewards": "none", "multi_objective_aggregation": "normalize_then_sum"},
            "`scale_rewards` is 'none' but has no effect: multi_objective_aggregation='normalize_then_sum' normalizes "
            "each reward itself.",
        ),
    ],
)
def test_an_option_without_effect_in_its_combination_warns(tmp_path, caplog, overrides, expected):
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    assert _no_effect_warnings(caplog) == [expected]


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "aspo", "aspo_neg_clip": 2.0, "steps_per_generation": 2},
        {"loss_type": "clip_cov", "clip_cov_ratio": 1e-3, "clip_cov_ub": 4.0},
        {"loss_type": "kl_cov", "kl_cov_coef": 0.5, "num_iterations": 2},
        {"dynamic_sampling": True, "dynamic_sampling_strict": True, "max_num_gen_batches": 3},
        {"overlong_buffer_len": 4, "overlong_penalty_factor": 0.5},
        {"scale_rewards": "batch"},
    ],
)
def test_options_that_take_effect_do_not_warn(tmp_path, caplog, overrides):
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    assert _no_effect_warnings(caplog) == []


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_presets_at_their_defaults_do_not_warn(tmp_path, caplog, config_class):
    # RLOOConfig / ReMaxConfig set scale_rewards='none' with an estimator that ignores it, PPO's GAE ignores it too:
    # a preset's own default is not a user's choice.
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert _no_effect_warnings(caplog) == []


def test_a_preset_warns_when_the_user_sets_an_option_it_ignores(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        make_config(trl_plus.RLOOConfig, tmp_path, scale_rewards="group")
        make_config(trl_plus.PPOConfig, tmp_path, scale_rewards="batch")
    assert _no_effect_warnings(caplog) == [
        "`scale_rewards` is 'group' but has no effect: only advantage_estimator='grpo' scales rewards, and it is "
        "'rloo'.",
        "`scale_rewards` is 'batch' but has no effect: PPO's advantages are GAE's, from the critic (see "
        "whiten_advantages).",
    ]


# ---------------------------------------------------------------------------------------------- routing properties


@pytest.mark.parametrize(
    ("overrides", "policy_loss", "aggregation"),
    [
        ({}, None, "token_mean"),  # TRL's default loss_type is "dapo"
        ({"loss_type": "grpo"}, None, "seq_mean_token_mean"),
        ({"loss_type": "dr_grpo"}, None, "seq_mean_token_sum_norm"),
        ({"loss_type": "cispo"}, None, "token_mean"),
        ({"beta": 0.1}, None, "token_mean"),  # k3 in the loss is TRL's own KL
        ({"advantage_estimator": "rloo"}, None, "token_mean"),  # estimators do not change the loss path
        ({"loss_type": "grpo", "loss_aggregation": "seq_mean_token_mean"}, "ppo_clip", "seq_mean_token_mean"),
        ({"loss_type": "grpo", "loss_aggregation": "token_mean"}, "ppo_clip", "token_mean"),
        ({"loss_type": "dr_grpo", "dual_clip_c": 3.0}, "ppo_clip", "seq_mean_token_sum_norm"),
        ({"beta": 0.1, "kl_estimator": "k1"}, "ppo_clip", "token_mean"),
        ({"beta": 0.1, "kl_in_reward": True}, "ppo_clip", "token_mean"),
        ({"loss_type": "aspo", "num_iterations": 2}, "aspo", "token_mean"),
        ({"loss_type": "clip_cov"}, "clip_cov", "token_mean"),
        ({"loss_type": "kl_cov", "num_iterations": 2}, "kl_cov", "token_mean"),
        ({"loss_type": "clip_cov", "loss_aggregation": "seq_mean_token_mean"}, "clip_cov", "seq_mean_token_mean"),
    ],
)
def test_registry_routing(tmp_path, overrides, policy_loss, aggregation):
    config = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    assert config.registry_policy_loss == policy_loss
    assert config.resolved_loss_aggregation == aggregation


@pytest.mark.parametrize(
    ("gradient_accumulation_steps", "steps_per_generation", "num_iterations", "expected"),
    [
        (1, 1, 1, False),
        (1, 1, 2, True),  # second pass over the same samples after an optimizer step
        (2, 4, 1, True),  # generate for 4 micro-steps, update every 2
        (4, 2, 1, False),  # two generations inside one accumulation window: both before the update
        (2, 2, 1, False),
        (3, 2, 1, True),
    ],
)
def test_has_old_log_probs_matches_trl_rule(
    tmp_path, gradient_accumulation_steps, steps_per_generation, num_iterations, expected
):
    # TRL computes old_per_token_logps iff gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0
    # (grpo_trainer.py, `_generate_and_score_completions`); trl_plus's validation must agree with it.
    config = make_config(
        trl_plus.GRPOConfig,
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
    )
    assert config.has_old_log_probs is expected


# ---------------------------------------------------------------------------------------------- defaults


def _defaults(config_class) -> dict:
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def test_grpo_config_keeps_every_trl_default():
    # The drop-in guarantee starts here: no TRL field changes its default or meaning.
    trl_defaults, plus_defaults = _defaults(trl.GRPOConfig), _defaults(trl_plus.GRPOConfig)
    assert len(trl_defaults) > 100
    assert {name: plus_defaults[name] for name in trl_defaults} == trl_defaults
    # The fields DESIGN.md names (more may be added; none may replace a TRL field).
    assert set(plus_defaults) - set(trl_defaults) >= {
        "advantage_estimator",
        "dual_clip_c",
        "kl_estimator",
        "kl_in_reward",
        "loss_aggregation",
        "dynamic_sampling",
        "max_num_gen_batches",
        "overlong_buffer_len",
        "overlong_penalty_factor",
    }


def test_trl_plus_field_defaults_are_the_papers():
    defaults = _defaults(trl_plus.GRPOConfig)
    assert defaults["advantage_estimator"] == "grpo"
    assert defaults["kl_estimator"] == "k3"  # TRL's and GRPO's (arXiv 2402.03300) estimator
    assert defaults["kl_in_reward"] is False
    assert defaults["dual_clip_c"] is None and defaults["loss_aggregation"] is None
    assert defaults["aspo_neg_clip"] == defaults["aspo_pos_clip"] == 3.0  # ASPO, arXiv 2510.06062
    # Clip-Cov / KL-Cov, arXiv 2505.22617: ratio ~2e-4 in (1, 5); KL-Cov ratio 2e-3, coefficient 1.
    assert (defaults["clip_cov_ratio"], defaults["clip_cov_lb"], defaults["clip_cov_ub"]) == (2e-4, 1.0, 5.0)
    assert (defaults["kl_cov_ratio"], defaults["kl_cov_coef"]) == (2e-3, 1.0)


# The values each preset's docstring cites from its paper.
PRESET_DEFAULTS = {
    # DAPO, arXiv 2503.14476: Clip-Higher 0.2 / 0.28, token-level loss, no KL, overlong filtering, dynamic sampling.
    trl_plus.DAPOConfig: {
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "loss_type": "dapo",
        "beta": 0.0,
        "mask_truncated_completions": True,
        "dynamic_sampling": True,
    },
    # GSPO, arXiv 2507.18071: sequence-level ratio, clip ranges 3e-4 / 4e-4, sequence-mean loss, no KL.
    trl_plus.GSPOConfig: {
        "importance_sampling_level": "sequence",
        "epsilon": 3e-4,
        "epsilon_high": 4e-4,
        "loss_type": "grpo",
        "beta": 0.0,
    },
    # ASPO, arXiv 2510.06062: eps 0.2 / 0.2, soft dual clip C_neg = C_pos = 3, no KL.
    trl_plus.ASPOConfig: {"loss_type": "aspo", "epsilon": 0.2, "epsilon_high": 0.2, "beta": 0.0},
    # RLOO, arXiv 2402.14740: leave-one-out baseline, no std scaling, no KL.
    trl_plus.RLOOConfig: {"advantage_estimator": "rloo", "scale_rewards": "none", "beta": 0.0},
    # ReMax, arXiv 2310.10505: greedy-decode baseline, no std scaling, no KL.
    trl_plus.ReMaxConfig: {"advantage_estimator": "remax", "scale_rewards": "none", "beta": 0.0},
    # REINFORCE++, arXiv 2501.03262: k1 KL in the reward with beta 0.01, PPO clip 0.2, token-level loss.
    trl_plus.ReinforcePPConfig: {
        "advantage_estimator": "reinforce_pp",
        "beta": 0.01,
        "kl_in_reward": True,
        "kl_estimator": "k1",
        "loss_type": "dapo",
    },
}


@pytest.mark.parametrize("config_class", PRESET_DEFAULTS, ids=lambda c: c.__name__)
def test_preset_defaults_are_the_papers_values_and_only_change_defaults(config_class):
    expected = PRESET_DEFAULTS[config_class]
    preset, base = _defaults(config_class), _defaults(trl_plus.GRPOConfig)
    assert issubclass(config_class, trl_plus.GRPOConfig)
    assert set(preset) == set(base)  # no new fields: a preset only changes defaults
    changed = {name: value for name, value in preset.items() if value != base[name]}
    expected_changes = {name: value for name, value in expected.items() if value != base[name]}
    assert changed == expected_changes


@pytest.mark.parametrize("config_class", PRESET_DEFAULTS, ids=lambda c: c.__name__)
def test_preset_config_builds_and_keeps_its_values(tmp_path, config_class):
    config = make_config(config_class, tmp_path)
    for name, value in PRESET_DEFAULTS[config_class].items():
        assert getattr(config, name) == value


def test_preset_routing(tmp_path):
    assert make_config(trl_plus.DAPOConfig, tmp_path).registry_policy_loss is None  # TRL's own "dapo" loss
    assert make_config(trl_plus.GSPOConfig, tmp_path).registry_policy_loss is None  # TRL's sequence-level ratio
    assert make_config(trl_plus.RLOOConfig, tmp_path).registry_policy_loss is None
    assert make_config(trl_plus.ASPOConfig, tmp_path, steps_per_generation=2).registry_policy_loss == "aspo"
    reinforce_pp = make_config(trl_plus.ReinforcePPConfig, tmp_path)
    assert reinforce_pp.registry_policy_loss == "ppo_clip"  # k1 KL in the reward is a trl_plus loss option
    assert reinforce_pp.resolved_loss_aggregation == "token_mean"


def test_preset_values_can_be_overridden(tmp_path):
    config = make_config(trl_plus.DAPOConfig, tmp_path, epsilon_high=0.3, mask_truncated_completions=False)
    assert config.epsilon_high == 0.3 and config.mask_truncated_completions is False
    with pytest.raises(ValueError, match="kl_in_reward"):
        make_config(trl_plus.ReinforcePPConfig, tmp_path, beta=0.0)  # kl_in_reward=True needs beta > 0


def test_aspo_preset_is_off_policy_by_default(tmp_path, caplog):
    # On-policy, ASPO's weights are 1 (it is GRPO): the preset makes 2 optimizer steps per rollout, so the second
    # one's ratios differ from 1, and does not warn.
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        config = make_config(trl_plus.ASPOConfig, tmp_path)
    assert config.steps_per_generation == 2 * config.gradient_accumulation_steps
    assert config.has_old_log_probs
    assert not any("loss_type='aspo'" in record.getMessage() for record in caplog.records)
    config = make_config(trl_plus.ASPOConfig, tmp_path, gradient_accumulation_steps=3)
    assert (config.steps_per_generation, config.has_old_log_probs) == (6, True)
    config = make_config(trl_plus.ASPOConfig, tmp_path, generation_batch_size=8, per_device_train_batch_size=4)
    assert config.steps_per_generation == 2  # derived by TRL from the batch size the user gave
    with caplog.at_level(logging.WARNING, logger="trl_plus"):  # the user's explicit on-policy layout still warns
        config = make_config(trl_plus.ASPOConfig, tmp_path, steps_per_generation=1)
    assert not config.has_old_log_probs
    assert any("loss_type='aspo'" in record.getMessage() for record in caplog.records)
