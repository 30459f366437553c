"""`trl_plus.GRPOConfig` and the preset configs: validation at construction, routing properties, defaults.

Every invalid setting must fail when the config is built (not steps into training), with a message that names the
field; the valid choices listed in messages and help text come from the registries in `trl_plus.algos`.
"""

import dataclasses
import logging
import re

import pytest
import trl
from conftest import make_config

import trl_plus
from trl_plus.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from trl_plus.trainer.grpo import NEW_LOSS_TYPES, TRL_LOSS_TYPES

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
    # TRL loss options that the registry path does not implement must not be silently ignored.
    "registry + sequence IS": (
        {"dual_clip_c": 3.0, "importance_sampling_level": "sequence"},
        ["importance_sampling_level='sequence'"],
    ),
    "aspo + sequence IS": (
        {"loss_type": "aspo", "importance_sampling_level": "sequence", "num_iterations": 2},
        ["importance_sampling_level='sequence'", "loss_type='aspo'"],
    ),
    "registry + top_entropy_quantile": (
        {"loss_aggregation": "token_mean", "top_entropy_quantile": 0.5},
        ["top_entropy_quantile"],
    ),
    "registry + off_policy_mask": (
        {"loss_type": "clip_cov", "off_policy_mask_threshold": 0.5},
        ["off_policy_mask_threshold"],
    ),
    "registry + entropy_coef": ({"dual_clip_c": 3.0, "entropy_coef": 0.01}, ["entropy_coef"]),
    "registry + adaptive entropy": ({"dual_clip_c": 3.0, "use_adaptive_entropy": True}, ["use_adaptive_entropy"]),
    "registry + delta": ({"beta": 0.1, "kl_estimator": "k2", "delta": 2.0}, ["delta"]),
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
    ],
)
def test_boundary_configs_are_accepted(tmp_path, overrides):
    config = make_config(trl_plus.GRPOConfig, tmp_path, **overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value


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
