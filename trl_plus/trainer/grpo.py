"""`GRPOConfig` / `GRPOTrainer`: TRL's GRPO plus the estimators, losses and KL choices registered in `trl_plus.algos`.

With default settings nothing here runs: advantages and loss are TRL's own, so training is identical to
`trl.GRPOTrainer`. Two hooks wrap TRL's methods through `super()`:

- `_generate_and_score_completions`: replaces TRL's GRPO advantages with the configured estimator, computed on the
  rewards of the whole global batch before this process's slice is taken (groups can straddle processes), then folds
  KL into the token reward and whitens over the global batch where the estimator asks for it; then applies PF-PPO's
  policy filtration (`trainer/policy_filtration.py`) and AEPO's regularizer rows (`trainer/aepo.py`) where configured.
- `_compute_loss`: for the loss types TRL lacks (or TRL's PPO-clip types with a trl_plus modifier: dual-clip, another
  KL estimator or placement, an explicit aggregation), computes the loss from the `POLICY_LOSSES`, `KL_ESTIMATORS` and
  `AGGREGATIONS` registries; every other configuration goes to TRL's `_compute_loss` unchanged.
"""

import inspect
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field

import torch
import trl
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.models.utils import disable_gradient_checkpointing
from trl.rewards.other_rewards import _SoftOverlongPunishment
from trl.trainer.utils import RepeatSampler, get_config_model_id

from ..algos import (
    ADVANTAGE_SHAPERS,
    ADVANTAGES,
    AGGREGATIONS,
    GLOBALLY_WHITENED,
    KL_ESTIMATORS,
    POLICY_FILTERS,
    POLICY_LOSSES,
    call_with_supported,
    kl_penalty_to_go,
    masked_whiten,
)
from ..algos.entropy_control import aepo_rewarded
from ..algos.process_rewards import process_advantages
from ..rewards import MajorityVoteReward, OverlongPenalty, ProcessReward
from ..rewards.checks import checked_reward_func, unscore_non_finite
from ..sampling import (
    ExtraVotes,
    GenerationCounter,
    Sampler,
    SelectiveRollout,
    check_num_votes,
    greedy_last_in_vllm_server,
    greedy_row_mask,
    greedy_rows_in_generate,
    greedy_rows_in_vllm_colocate,
)
from ..sampling.dynamic import split_rows, stack_rows
from .aepo import AEPOController, regularizer_rows, sampling_temperature
from .checkpoints import read_file, read_json, read_sections, read_torch, reading, section_states
from .entropy_bonus import apply_entropy_bonus
from .epoch_order import EpochOrder
from .field_types import check_field_types
from .nonfinite import NonFiniteStepGuard, NonFiniteTrainingError
from .policy_filtration import filter_batch

logger = logging.getLogger(__name__)

# TRL 1.16's own loss types; each keeps TRL's meaning.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# TRL loss types that are PPO-clip plus an aggregation, which the registry path can reproduce and then modify.
_PPO_CLIP_AGGREGATION = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}
# Loss types trl_plus adds: every registered policy loss except the PPO clip that TRL's types already name.
NEW_LOSS_TYPES = tuple(name for name in POLICY_LOSSES.names() if name != "ppo_clip")
# The values of TRL 1.16 fields that TRL checks only at the first step (grpo_trainer.py). `scale_rewards` True / False
# are TRL's aliases of "group" / "none", mapped in `trl.GRPOConfig.__post_init__`.
TRL_CHOICES_CHECKED_LATE = {
    "scale_rewards": ("group", "batch", "none", True, False),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "importance_sampling_level": ("token", "sequence"),
    "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
}
SURPLUS_BUFFER_FILE = "dynamic_sampling_buffer.pt"  # Sampler.state_dict(): {"surplus_buffer": ..., ...}
_SURPLUS_BUFFER_HOLDS = "dynamic sampling's surplus groups and its position in the stream of extra prompts"
_SELECTIVE_ROLLOUT_HOLDS = " and selective rollout's history of each prompt"
GENERATION_COUNTS_FILE = "generation_counts.json"  # {"generation": GenerationCounter.state_dict()}
_GENERATION_COUNTS_HOLDS = "the counts of completions and tokens generated so far"
AEPO_STATE_FILE = "aepo_state.json"  # {"aepo": AEPOController.state_dict()}
_AEPO_STATE_HOLDS = "AEPO's entropy of the last update, which sets the regularizer's temperature"
NONFINITE_STEPS_FILE = "nonfinite_steps.json"  # {"step_guard": NonFiniteStepGuard.state_dict()}
_NONFINITE_STEPS_HOLDS = "the counts of optimizer steps skipped for a non-finite loss or gradient norm"
# Inputs that `_get_per_token_logps_and_entropies` forwards to multimodal models.
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


# Why a registered loss does not read TRL's `delta` (the cap on the unclipped ratio of the PPO-clip types).
_WHY_NO_DELTA = {
    "aspo": "ASPO has no unclipped ratio: positive tokens are capped at 1 + eps_high, negative ones by aspo_neg_clip",
    "kl_cov": "KL-Cov's ratio term is unclipped by design (its penalty, not a clip, bounds the update)",
}
# Losses whose math is defined per token only, so a sequence-level ratio (GSPO) has no meaning for them.
_TOKEN_LEVEL_ONLY = {
    "clip_cov": "Clip-Cov detaches single tokens chosen by their token-level covariance of logp and A; a sequence "
    "ratio shares one value among all tokens of a sequence, so detaching a token does not remove its gradient.",
    "kl_cov": "KL-Cov penalizes |logp - old_logp| of single tokens chosen by their token-level covariance; it has no "
    "sequence-level form.",
}


def _sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of `(B, T)` values over the valid tokens, `(B, 1)` (GSPO, arXiv 2507.18071: the log of
    the sequence ratio is the mean token log-ratio)."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` is {value!r}; valid choices: {list(choices)}.")


def loss_types_reading(hyperparameter: str) -> list[str]:
    """The `loss_type` values whose policy loss takes `hyperparameter`, read from the `POLICY_LOSSES` signatures (the
    trainer passes each loss only what its signature names): 'ppo_clip' is TRL's PPO-clip types."""
    return [
        loss_type
        for name in POLICY_LOSSES.accepting(hyperparameter)
        for loss_type in (_PPO_CLIP_AGGREGATION if name == "ppo_clip" else [name])
    ]


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """`trl.GRPOConfig` plus the choices of trl_plus. Every TRL field keeps its meaning and default.

    Fields added (see `../shared/ALGORITHMS.md` for the math): `advantage_estimator`, the `loss_type` values `aspo`,
    `clip_cov`, `kl_cov`, `gppo` and `ce_gppo`, `dual_clip_c`, `kl_estimator`, `kl_in_reward`, `loss_aggregation`,
    `entropy_advantage_alpha` / `entropy_advantage_kappa`, `policy_filtration` (PF-PPO), `aepo_target_entropy` and
    the other `aepo_*` fields (AEPO), and the hyperparameters of ASPO, Clip-Cov, KL-Cov and CE-GPPO. TRL's own loss
    options (entropy bonus, top_entropy_quantile, off_policy_mask_threshold, delta,
    use_bias_correction_kl, importance_sampling_level) keep their meaning with every trl_plus loss, or are refused
    at construction where the combination has none.
    """

    advantage_estimator: str = field(
        default="grpo",
        metadata={
            "help": f"How advantages are computed from rewards; one of {ADVANTAGES.names()}. 'grpo' (default) is "
            "TRL's own computation (`scale_rewards` applies to it only). 'rloo': exact leave-one-out baseline "
            "(arXiv 2402.14740). 'reinforce_pp': REINFORCE++, no baseline, advantages z-scored over every valid "
            "token of the global batch (arXiv 2501.03262). 'reinforce_pp_baseline': group mean subtracted first. "
            "'remax': the last completion of each group is decoded greedily in the same generate call and its "
            "reward is the baseline of the other num_generations - 1; it is not trained on (arXiv 2310.10505)."
        },
    )
    dual_clip_c: float | None = field(
        default=None,
        metadata={
            "help": "Dual-clip PPO (arXiv 1912.09729): for negative advantages the loss is bounded by c*|A|. Must be "
            "> 1; 3.0 is the paper's value. Only with loss_type 'grpo', 'dapo' or 'dr_grpo'."
        },
    )
    kl_estimator: str = field(
        default="k3",
        metadata={"help": f"KL estimator used with beta > 0; one of {KL_ESTIMATORS.names()}. 'k3' is TRL's."},
    )
    kl_in_reward: bool = field(
        default=False,
        metadata={
            "help": "Place the KL penalty in the token reward (r_t -= beta * KL_t, no gradient through it; PPO, "
            "REINFORCE++) instead of in the loss (GRPO). Needs beta > 0."
        },
    )
    loss_aggregation: str | None = field(
        default=None,
        metadata={
            "help": f"How per-token losses are reduced; one of {AGGREGATIONS.names()}. None (default): the "
            "aggregation of `loss_type` ('grpo' -> seq_mean_token_mean, 'dr_grpo' -> seq_mean_token_sum_norm, "
            "otherwise token_mean)."
        },
    )
    aspo_neg_clip: float = field(
        default=3.0, metadata={"help": "ASPO soft dual-clip bound C_neg on the ratio of negative tokens."}
    )
    aspo_pos_clip: float = field(
        default=3.0, metadata={"help": "ASPO soft dual-clip bound C_pos on the flipped weight 1/r of positive tokens."}
    )
    clip_cov_ratio: float = field(
        default=2e-4, metadata={"help": "Clip-Cov: fraction of valid tokens whose gradient is detached."}
    )
    clip_cov_lb: float = field(default=1.0, metadata={"help": "Clip-Cov: lower covariance bound of eligible tokens."})
    clip_cov_ub: float = field(default=5.0, metadata={"help": "Clip-Cov: upper covariance bound of eligible tokens."})
    kl_cov_ratio: float = field(
        default=2e-3, metadata={"help": "KL-Cov: fraction of valid tokens (top by covariance) that get the KL term."}
    )
    kl_cov_coef: float = field(default=1.0, metadata={"help": "KL-Cov: coefficient of |logp - old_logp|."})
    ce_gppo_beta_low: float = field(
        default=0.75,
        metadata={
            "help": "CE-GPPO (arXiv 2509.20712) beta1: gradient scale of clipped tokens with A < 0 and r < 1 - eps "
            "(the authors' code: 0.75). Only loss_type='ce_gppo' reads it."
        },
    )
    ce_gppo_beta_high: float = field(
        default=1.0,
        metadata={
            "help": "CE-GPPO beta2: gradient scale of clipped tokens with A > 0 and r > 1 + eps_high (the authors' "
            "code: 1.0). Only loss_type='ce_gppo' reads it."
        },
    )
    entropy_advantage_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Entropy-shaped advantages (arXiv 2506.14758): A'_t = A_t + min(alpha * sg(H_t), |A_t| / kappa), "
            "H_t the token entropy of the current policy, applied in the loss after any advantage_estimator. "
            "0 (default): off."
        },
    )
    entropy_advantage_kappa: float = field(
        default=2.0,
        metadata={
            "help": "Entropy-shaped advantages: the bonus is at most |A_t| / kappa, so with kappa > 1 it never flips "
            "an advantage's sign. Must be > 1."
        },
    )
    policy_filtration: str | None = field(
        default=None,
        metadata={
            "help": f"PF-PPO policy filtration (arXiv 2409.06957): weigh each completion by its reward's rank in its "
            f"group; one of {POLICY_FILTERS.names()}, or None (default, off). 'best_of_n': only the group's best "
            "(the paper's BoN); 'max_min': the best and the worst (the paper's BW); 'max_random': the best 0.4, the "
            "others 0.1 (verl); 'pow': |reward|^policy_filtration_pow (verl). Applied after any advantage_estimator "
            "(PPO: after whitening): a completion of weight 0 is not trained on (out of the loss and of every "
            "normalizer, as if not generated), the others' advantages are multiplied by their weight divided by the "
            "mean non-zero weight of the generation batch."
        },
    )
    policy_filtration_pow: float = field(
        default=2.0,
        metadata={"help": "PF-PPO 'pow' filter: the exponent k of |reward|^k (verl's weight_pow, 2.0). Must be > 0."},
    )
    aepo_target_entropy: float | None = field(
        default=None,
        metadata={
            "help": "AEPO (arXiv 2510.08141): hold the policy's mean token entropy (nats) near this target with a "
            "REINFORCE regularizer instead of an entropy bonus. Each generation batch, the first aepo_prompt_fraction "
            "of its prompts are sampled again at aepo_temperature_high (entropy of the last update at or below the "
            "target) or aepo_temperature_low (above it); their samples with advantage > aepo_advantage_threshold "
            "replace up to aepo_num_samples rows of the batch (half as many above the target) with advantage 1. "
            "The authors use 0.5 (their script) to 0.75. None (default): off."
        },
    )
    aepo_temperature_high: float = field(
        default=1.2, metadata={"help": "AEPO: sampling temperature of the regularizer when entropy is low (1.2)."}
    )
    aepo_temperature_low: float = field(
        default=0.8, metadata={"help": "AEPO: sampling temperature of the regularizer when entropy is high (0.8)."}
    )
    aepo_num_samples: int = field(
        default=60,
        metadata={
            "help": "AEPO: most rows of a generation batch (over all processes) replaced by rewarded regularizer "
            "samples, the authors' reinforce_sample_num (60 of their 2,560-row batches; they advise the fewest that "
            "keep the entropy at its target)."
        },
    )
    aepo_prompt_fraction: float = field(
        default=0.25,
        metadata={"help": "AEPO: share of each process's prompts (whole groups) sampled again for the regularizer."},
    )
    aepo_advantage_threshold: float = field(
        default=0.05, metadata={"help": "AEPO: a regularizer sample is rewarded when its advantage is above this."}
    )
    overlong_buffer_len: int | None = field(
        default=None,
        metadata={
            "help": "DAPO overlong reward shaping (arXiv 2503.14476 eq. 13): the trainer adds "
            "`trl_plus.rewards.overlong_penalty(max_completion_length, overlong_buffer_len, "
            "overlong_penalty_factor)` to the reward functions, a linear penalty over the last `overlong_buffer_len` "
            "tokens of `max_completion_length` (the paper: 4096 of 20480). None (default): off."
        },
    )
    overlong_penalty_factor: float = field(
        default=1.0, metadata={"help": "Overlong reward shaping: the penalty at max_completion_length (paper: 1.0)."}
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO dynamic sampling (arXiv 2503.14476 sec. 3.2): drop the groups whose rewards are all equal "
            "and generate more prompts until the batch holds its number of groups. Surplus groups of the last "
            "round are kept for the next step."
        },
    )
    max_num_gen_batches: int = field(
        default=10,
        metadata={
            "help": "Dynamic sampling: most generation rounds per step (the first included). When they do not fill "
            "the batch, the missing groups are masked out of the loss (or an error is raised, see "
            "`dynamic_sampling_strict`)."
        },
    )
    dynamic_sampling_strict: bool = field(
        default=False,
        metadata={"help": "Dynamic sampling: raise instead of training on a partly filled batch."},
    )
    selective_rollout: bool = field(
        default=False,
        metadata={
            "help": "GRESO selective rollout (arXiv 2506.02177): before generating, skip a prompt whose last z groups "
            "all had equal rewards with probability 1 - max(p^z, 0.01), and replace it by a prompt of the "
            "extra-prompt stream, so a step still gets its number of groups. The exploration probability p (one for "
            "solved prompts, one for unsolved ones) adapts by 0.01 per step whose prompts all came back (GRESO: from "
            "the second epoch), within [0.05, 0.95], to hold "
            "`selective_rollout_target` zero-variance groups among the generated ones. When 8 batches of the stream "
            "leave a step short of kept prompts, the skipped ones with the highest keep probability are generated "
            "(`selective_rollout/prompts_forced`). Works with and without "
            "dynamic_sampling. Needs num_generations >= 2 (a group of one has no variance) and a map-style dataset."
        },
    )
    selective_rollout_target: float = field(
        default=0.25,
        metadata={
            "help": "Selective rollout: target share of zero-variance groups among the generated groups (GRESO's "
            "alpha, 0.25), 1/3 of it for solved prompts and 2/3 for unsolved ones, which are explored more."
        },
    )
    selective_rollout_exploration: float = field(
        default=0.5,
        metadata={"help": "Selective rollout: the initial exploration probability p of both kinds of prompts."},
    )
    ttrl_num_votes: int | None = field(
        default=None,
        metadata={
            "help": "TTRL's vote/train split (arXiv 2504.16084: 64 votes, 32 trained): completions per prompt that "
            "vote on `trl_plus.rewards.MajorityVoteReward`'s pseudo-label. The first num_generations are trained on "
            "and the rest are generated only to vote (counted in generation/completions); a multiple of "
            "num_generations. TRL's completions/* length metrics then average over the vote-only completions "
            "too (each generate call logs them). None (default): the vote is over the trained completions."
        },
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "An optimizer step whose loss or gradient norm is NaN or inf is skipped (weights and optimizer "
            "state unchanged; counted in the `nonfinite/skipped_steps` metric). After this many such steps in a row "
            "training stops with an error naming the quantity and the step."
        },
    )

    def __post_init__(self):
        check_field_types(self)
        self._validate_choices()
        super().__post_init__()
        self._validate_combinations()
        self._warn_options_without_effect()

    def _validate_choices(self) -> None:
        _check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGES.names())
        _check_choice("loss_type", self.loss_type, TRL_LOSS_TYPES + NEW_LOSS_TYPES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS.names())
        if self.loss_aggregation is not None:
            _check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS.names())
        for name, choices in TRL_CHOICES_CHECKED_LATE.items():
            _check_choice(name, getattr(self, name), choices)
        if self.beta < 0:
            raise ValueError(f"`beta` is {self.beta}; valid: >= 0 (0 turns the KL penalty off).")
        if self.dual_clip_c is not None and self.loss_type not in loss_types_reading("dual_clip_c"):
            raise ValueError(
                f"`dual_clip_c` is {self.dual_clip_c}, which loss_type={self.loss_type!r} does not read; valid: "
                f"loss_type in {loss_types_reading('dual_clip_c')}, or dual_clip_c=None."
            )
        if self.epsilon < 0:
            raise ValueError(f"`epsilon` must be >= 0, got {self.epsilon}.")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"`epsilon_high` must be >= 0, got {self.epsilon_high}.")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"`dual_clip_c` must be > 1 (the paper uses 3.0), got {self.dual_clip_c}.")
        if min(self.aspo_neg_clip, self.aspo_pos_clip) <= 1:
            raise ValueError("`aspo_neg_clip` and `aspo_pos_clip` must be > 1 (the paper uses 3.0).")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be in (0, 1], got {getattr(self, name)}.")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"`clip_cov_lb` ({self.clip_cov_lb}) must be < `clip_cov_ub` ({self.clip_cov_ub}).")
        if self.overlong_buffer_len is not None:
            OverlongPenalty(self.max_completion_length, self.overlong_buffer_len, self.overlong_penalty_factor)
        if self.max_num_gen_batches < 1:
            raise ValueError(f"`max_num_gen_batches` must be >= 1, got {self.max_num_gen_batches}.")
        if not 0 < self.selective_rollout_target < 1:
            raise ValueError(f"`selective_rollout_target` is {self.selective_rollout_target}; valid: 0 < x < 1.")
        if not 0 < self.selective_rollout_exploration < 1:
            raise ValueError(
                f"`selective_rollout_exploration` is {self.selective_rollout_exploration}; valid: 0 < p < 1."
            )
        if self.selective_rollout and self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"`selective_rollout` is True with `num_generations` {self.num_generations}; valid: num_generations "
                ">= 2, since it skips prompts whose groups had equal rewards and a group of one always has."
            )
        if self.ttrl_num_votes is not None and self.num_generations is not None:
            check_num_votes(self.ttrl_num_votes, self.num_generations)
        if self.ttrl_num_votes is not None and self.advantage_estimator == "remax":
            raise ValueError(
                "`ttrl_num_votes` with advantage_estimator='remax': the greedy baseline is the last row of each "
                "generate call, and the vote-only calls would decode greedy rows too. Valid: another estimator."
            )
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(
                f"`max_consecutive_nonfinite_steps` is {self.max_consecutive_nonfinite_steps}; valid: an int >= 1 "
                "(1 stops at the first non-finite step)."
            )
        if self.kl_cov_coef < 0:
            raise ValueError(f"`kl_cov_coef` must be >= 0, got {self.kl_cov_coef}.")
        for name in ("ce_gppo_beta_low", "ce_gppo_beta_high"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`{name}` is {getattr(self, name)}; valid: >= 0 (0 drops the clipped tokens' gradient, as PPO)."
                )
        if self.entropy_advantage_alpha < 0:
            raise ValueError(f"`entropy_advantage_alpha` is {self.entropy_advantage_alpha}; valid: >= 0 (0 is off).")
        if self.entropy_advantage_kappa <= 1:
            raise ValueError(
                f"`entropy_advantage_kappa` is {self.entropy_advantage_kappa}; valid: > 1 (the bonus is at most "
                "|A| / kappa, so kappa <= 1 could flip a negative advantage's sign)."
            )
        if self.policy_filtration is not None:
            _check_choice("policy_filtration", self.policy_filtration, POLICY_FILTERS.names())
        if self.policy_filtration_pow <= 0:
            raise ValueError(
                f"`policy_filtration_pow` is {self.policy_filtration_pow}; valid: > 0 (the weight is |reward|^k)."
            )
        if self.advantage_estimator == "rloo" and self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"advantage_estimator='rloo' needs num_generations >= 2 (the baseline of a completion is the mean "
                f"of the others in its group), got {self.num_generations}."
            )
        if self.advantage_estimator == "remax" and self.use_transformers_continuous_batching:
            raise ValueError(
                "advantage_estimator='remax' does not support use_transformers_continuous_batching: its greedy rows "
                "are set per `generate` call."
            )
        if self.advantage_estimator == "remax" and self.use_vllm and self.vllm_tensor_parallel_size > 1:
            raise ValueError("advantage_estimator='remax' with vLLM supports vllm_tensor_parallel_size=1 only.")
        if self.kl_in_reward and self.beta == 0.0:
            raise ValueError("`kl_in_reward=True` needs `beta > 0`: beta weighs the KL penalty in the reward.")
        if self.kl_estimator != "k3" and self.beta == 0.0:
            raise ValueError(f"`kl_estimator={self.kl_estimator!r}` has no effect with `beta=0`; set beta > 0.")
        if self.advantage_estimator != "grpo" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} takes the weighted sum of the rewards; set "
                "`multi_objective_aggregation='sum_then_normalize'`."
            )

    def _validate_aepo(self) -> None:
        if self.aepo_target_entropy < 0:
            raise ValueError(f"`aepo_target_entropy` is {self.aepo_target_entropy}; valid: >= 0 (nats) or None.")
        if not 0 < self.aepo_temperature_low < self.aepo_temperature_high:
            raise ValueError(
                f"`aepo_temperature_low` ({self.aepo_temperature_low}) and `aepo_temperature_high` "
                f"({self.aepo_temperature_high}); valid: 0 < low < high (high raises the entropy, low lowers it)."
            )
        if self.aepo_num_samples < 1:
            raise ValueError(f"`aepo_num_samples` is {self.aepo_num_samples}; valid: an int >= 1.")
        if not 0 < self.aepo_prompt_fraction <= 1:
            raise ValueError(f"`aepo_prompt_fraction` is {self.aepo_prompt_fraction}; valid: 0 < x <= 1.")
        rows_per_process = self.per_device_train_batch_size * self.steps_per_generation
        if self.num_generations is not None and rows_per_process % self.num_generations:
            raise ValueError(
                f"`aepo_target_entropy` is set and each process's generation batch ({rows_per_process} rows: "
                f"per_device_train_batch_size x steps_per_generation) does not hold whole groups of num_generations "
                f"{self.num_generations}; valid: a multiple of num_generations (AEPO resamples whole groups)."
            )

    def _validate_combinations(self) -> None:
        if self.aepo_target_entropy is not None:  # after TRL's __post_init__ has set steps_per_generation
            self._validate_aepo()
        if self.registry_policy_loss is None:
            return
        if self.loss_type not in (*_PPO_CLIP_AGGREGATION, *NEW_LOSS_TYPES):
            raise ValueError(
                f"dual_clip_c, kl_estimator, kl_in_reward, loss_aggregation and entropy_advantage_alpha work with "
                f"loss_type in {[*_PPO_CLIP_AGGREGATION, *NEW_LOSS_TYPES]}, got loss_type={self.loss_type!r}."
            )
        if self.delta is not None and self.loss_type not in loss_types_reading("delta"):
            raise ValueError(
                f"`delta` is {self.delta}, which loss_type={self.loss_type!r} does not read: TRL's delta caps the "
                f"unclipped ratio of a PPO-clip loss, and {_WHY_NO_DELTA[self.loss_type]}. Valid: loss_type in "
                f"{loss_types_reading('delta')}, or delta=None."
            )
        if self.importance_sampling_level == "sequence" and self.loss_type in _TOKEN_LEVEL_ONLY:
            raise ValueError(
                f"importance_sampling_level='sequence' with loss_type={self.loss_type!r}: "
                f"{_TOKEN_LEVEL_ONLY[self.loss_type]} Valid: importance_sampling_level='token', or another loss_type."
            )
        if self.loss_type == "kl_cov" and not self.has_old_log_probs:
            raise ValueError(
                "loss_type='kl_cov' penalizes |logp - old_logp|, which is 0 when every update is on-policy. Set "
                "num_iterations > 1 or steps_per_generation > gradient_accumulation_steps."
            )
        if self.loss_type == "aspo" and not self.has_old_log_probs:
            logger.warning(
                "loss_type='aspo' with on-policy updates (ratio = 1) is plain policy gradient; ASPO reweights "
                "off-policy tokens. Set num_iterations > 1 or steps_per_generation > gradient_accumulation_steps."
            )

    def _warn_options_without_effect(self) -> None:
        """Warn about options set away from this class's default that the rest of the config makes no-ops. A preset's
        own defaults (RLOOConfig's scale_rewards='none') are not the user's choice and do not warn."""
        reasons = {
            "dynamic_sampling_strict": None if self.dynamic_sampling else "dynamic_sampling is False",
            "max_num_gen_batches": None if self.dynamic_sampling else "dynamic_sampling is False",
            "selective_rollout_target": None if self.selective_rollout else "selective_rollout is False",
            "selective_rollout_exploration": None if self.selective_rollout else "selective_rollout is False",
            "overlong_penalty_factor": (
                None if self.overlong_buffer_len is not None else "overlong_buffer_len is None (no overlong shaping)"
            ),
            "scale_rewards": self._scale_rewards_ignored_because,
            **{
                name: None if self.aepo_target_entropy is not None else "aepo_target_entropy is None (AEPO is off)"
                for name in (
                    "aepo_temperature_high",
                    "aepo_temperature_low",
                    "aepo_num_samples",
                    "aepo_prompt_fraction",
                    "aepo_advantage_threshold",
                )
            },
            "policy_filtration_pow": (
                None if self.policy_filtration == "pow" else f"policy_filtration is {self.policy_filtration!r}"
            ),
            "entropy_advantage_kappa": (
                None if self.entropy_advantage_alpha > 0 else "entropy_advantage_alpha is 0 (no entropy shaping)"
            ),
        }
        for name in self.__dataclass_fields__.keys() - trl.GRPOConfig.__dataclass_fields__.keys():
            loss_types = loss_types_reading(name)  # the hyperparameters of registered policy losses
            if loss_types and self.loss_type not in loss_types:  # (dual_clip_c raised in `_validate_choices`)
                reasons[name] = f"only loss_type in {loss_types} reads it, and loss_type is {self.loss_type!r}"
        for name, reason in sorted(reasons.items()):
            if reason is not None and self._differs_from_default(name):
                logger.warning(f"`{name}` is {getattr(self, name)!r} but has no effect: {reason}.")

    @property
    def _scale_rewards_ignored_because(self) -> str | None:
        """Why TRL's reward scaling is not applied, or None when it is (TRL's GRPO advantages of summed rewards)."""
        if self.advantage_estimator != "grpo":
            return f"only advantage_estimator='grpo' scales rewards, and it is {self.advantage_estimator!r}"
        if self.multi_objective_aggregation != "sum_then_normalize":
            return "multi_objective_aggregation='normalize_then_sum' normalizes each reward itself"
        return None

    def _differs_from_default(self, name: str) -> bool:
        config_field = self.__dataclass_fields__[name]
        has_factory = config_field.default_factory is not MISSING
        return getattr(self, name) != (config_field.default_factory() if has_factory else config_field.default)

    @property
    def registry_policy_loss(self) -> str | None:
        """The `POLICY_LOSSES` entry the loss is computed with, or None when TRL's `_compute_loss` computes it."""
        if self.loss_type in NEW_LOSS_TYPES:
            return self.loss_type
        uses_trl_plus_loss_option = (
            self.dual_clip_c is not None
            or self.kl_estimator != "k3"
            or self.kl_in_reward
            or self.loss_aggregation is not None
            or self.entropy_advantage_alpha > 0
        )
        return "ppo_clip" if uses_trl_plus_loss_option else None

    @property
    def resolved_loss_aggregation(self) -> str:
        return self.loss_aggregation or _PPO_CLIP_AGGREGATION.get(self.loss_type, "token_mean")

    @property
    def has_old_log_probs(self) -> bool:
        """Whether TRL computes log-probs of the sampling policy, i.e. whether some updates are off-policy."""
        generate_every = self.steps_per_generation * self.num_iterations
        return self.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` with the advantage estimators, policy losses and KL options of `trl_plus.GRPOConfig`.

    Takes the same arguments as `trl.GRPOTrainer`; `args` must be a `trl_plus` config (or None for the defaults).
    """

    config_class = GRPOConfig
    _tag_names = ["trl", "trl-plus", "grpo"]

    def __init__(self, model, reward_funcs=None, args=None, *positional, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self.config_class(f"{model_name.split('/')[-1]}-{self._name}")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(
                f"{type(self).__name__} needs a trl_plus config (e.g. trl_plus.{self.config_class.__name__}), got "
                f"{type(args).__module__}.{type(args).__name__}."
            )
        trl_arguments = (
            inspect.signature(trl.GRPOTrainer.__init__)
            .bind(self, model, reward_funcs, args, *positional, **kwargs)
            .arguments
        )
        self._check_datasets(
            args,
            trl_arguments.get("train_dataset"),
            trl_arguments.get("eval_dataset"),
            has_environment=trl_arguments.get("environment_factory") is not None,
        )
        if args.overlong_buffer_len is not None:
            reward_funcs = self._with_overlong_penalty(reward_funcs, args)
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        if args.advantage_estimator == "remax" and self.tools:
            raise ValueError("advantage_estimator='remax' does not support tool calling: greedy rows are by position.")
        self._last_rewards_per_func = None
        process_rewards = [func for func in self.reward_funcs if isinstance(func, ProcessReward)]
        if len(process_rewards) > 1 or (process_rewards and args.advantage_estimator != "grpo"):
            raise ValueError(
                "Process rewards (trl_plus.rewards.ProcessReward) give GRPO's process-supervision advantages: pass "
                "at most one, with advantage_estimator='grpo'."
            )
        self._process_reward = process_rewards[0] if process_rewards else None
        for func in self.reward_funcs:
            if isinstance(func, MajorityVoteReward) and func.gather_fn is None:
                func.gather_fn = gather_object  # TTRL votes over whole groups, which can straddle processes
        self._extra_votes = self._make_extra_votes(args)
        # A reward function's bad output is named at its source instead of failing deep in TRL's tensor conversion.
        self.reward_funcs = [
            func if isinstance(func, nn.Module) else checked_reward_func(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        self._warned_non_finite_rewards = set()
        self._step_guard = NonFiniteStepGuard(args.max_consecutive_nonfinite_steps)
        self._aepo = None
        if args.aepo_target_entropy is not None:
            self._aepo = AEPOController(
                args.aepo_target_entropy, args.aepo_temperature_high, args.aepo_temperature_low, args.aepo_num_samples
            )
        self._generation_counter = GenerationCounter()
        self._sampler = self._make_sampler() if args.dynamic_sampling or args.selective_rollout else None
        self._policy_loss_hyperparameters = {
            "eps_low": self.epsilon_low,
            "eps_high": self.epsilon_high,
            "dual_clip_c": args.dual_clip_c,
            "aspo_neg_clip": args.aspo_neg_clip,
            "aspo_pos_clip": args.aspo_pos_clip,
            "clip_cov_ratio": args.clip_cov_ratio,
            "clip_cov_lb": args.clip_cov_lb,
            "clip_cov_ub": args.clip_cov_ub,
            "kl_cov_ratio": args.kl_cov_ratio,
            "kl_cov_coef": args.kl_cov_coef,
            "ce_gppo_beta_low": args.ce_gppo_beta_low,
            "ce_gppo_beta_high": args.ce_gppo_beta_high,
            "delta": args.delta,
        }

    def _make_extra_votes(self, args: GRPOConfig) -> ExtraVotes | None:
        """TTRL's vote-only completions (`ttrl_num_votes`), or None when the vote is over the trained ones."""
        if args.ttrl_num_votes is None:
            return None
        if not any(isinstance(func, MajorityVoteReward) for func in self.reward_funcs):
            raise ValueError(
                f"`ttrl_num_votes` is {args.ttrl_num_votes}, but no reward function reads the vote-only completions: "
                "add trl_plus.rewards.MajorityVoteReward to reward_funcs, or unset ttrl_num_votes."
            )
        if self.tools or self.environment_factories is not None:
            raise ValueError(
                "`ttrl_num_votes` does not support tools or environments: vote-only completions would run them."
            )
        return ExtraVotes(args.ttrl_num_votes, self.num_generations)

    @staticmethod
    def _check_datasets(args: GRPOConfig, train_dataset, eval_dataset, has_environment: bool) -> None:
        """Raise, before the model loads, for datasets that TRL would fail on at the first step (no `prompt` column)
        or train 0 steps on (fewer prompts than one generation batch) without a word."""
        if not has_environment:  # an environment's `reset()` may supply the prompts instead
            eval_datasets = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
            named = [("train_dataset", train_dataset)]
            named += [("eval_dataset" if key is None else f"eval_dataset[{key!r}]", ds) for key, ds in eval_datasets]
            for name, dataset in named:
                columns = getattr(dataset, "column_names", None)  # None for an iterable dataset of unknown features
                if columns is not None and "prompt" not in columns:
                    raise ValueError(
                        f"`{name}` has no `prompt` column, which the trainer generates from; its columns are "
                        f"{columns}. Rename the prompt column (e.g. `dataset.rename_column('question', 'prompt')`)."
                    )
        # TRL's RepeatSampler draws generation_batch_size // num_generations prompts per generation batch (over all
        # processes) and drops a last partial batch, so a smaller dataset gives no batch at all.
        prompts_per_batch = args.generation_batch_size // args.num_generations
        if isinstance(train_dataset, Dataset) and len(train_dataset) < prompts_per_batch:
            raise ValueError(
                f"`train_dataset` has {len(train_dataset)} rows, fewer than the {prompts_per_batch} prompts of one "
                f"generation batch (generation_batch_size {args.generation_batch_size} // num_generations "
                f"{args.num_generations}, over all processes): training would run 0 steps. Give more prompts, or "
                "lower per_device_train_batch_size, steps_per_generation or the number of processes."
            )
        for name in ("dynamic_sampling", "selective_rollout"):
            if getattr(args, name) and isinstance(train_dataset, IterableDataset):
                raise ValueError(f"`{name}=True` draws extra prompts by index: use a map-style `Dataset`.")

    @staticmethod
    def _with_overlong_penalty(reward_funcs, args: GRPOConfig) -> list:
        """Append DAPO's overlong penalty to the reward functions, with weight 1 if the user gave weights."""
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        penalties = (OverlongPenalty, _SoftOverlongPunishment)  # trl_plus's, and TRL's `get_soft_overlong_punishment`
        given = [type(func).__name__ for func in reward_funcs if isinstance(func, penalties)]
        if given:
            raise ValueError(
                f"`overlong_buffer_len` is {args.overlong_buffer_len}, which adds DAPO's overlong penalty to the "
                f"rewards, and `reward_funcs` already holds one ({', '.join(given)}): it would be applied twice. "
                "Unset overlong_buffer_len, or remove the penalty from reward_funcs."
            )
        if args.reward_weights is not None and len(args.reward_weights) == len(reward_funcs):
            args.reward_weights = [*args.reward_weights, 1.0]
        penalty = OverlongPenalty(args.max_completion_length, args.overlong_buffer_len, args.overlong_penalty_factor)
        return [*reward_funcs, penalty]

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._extra_votes is not None and self.model.training:
            inputs = self._extra_votes.attach(inputs)  # TRL passes every input column to the reward functions
        # TRL returns the rewards of every process; keep them for estimators that need whole groups.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards_per_func, num_infinite = unscore_non_finite(rewards_per_func)
        self._report_non_finite_rewards(num_infinite.tolist(), len(rewards_per_func))
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _report_non_finite_rewards(self, num_infinite: list[int], num_completions: int) -> None:
        """Metric `rewards/<name>/non_finite` (completions of the global batch given +-inf, now unscored) per reward
        function from its first one on (a healthy run logs no such key), and a warning at that first one."""
        mode = "train" if self.model.training else "eval"
        for name, count in zip(self.reward_func_names, num_infinite, strict=True):
            if count and name not in self._warned_non_finite_rewards:
                self._warned_non_finite_rewards.add(name)
                logger.warning(
                    f"Reward function {name!r} gave a non-finite reward (inf) to {count} of {num_completions} "
                    f"completions at step {self.state.global_step}: they are treated as not scored by it (as if it "
                    "returned None), so they are left out of every baseline and statistic. Only this first "
                    f"occurrence is reported; the metric rewards/{name}/non_finite counts them all."
                )
            if name in self._warned_non_finite_rewards:
                self._metrics[mode][f"rewards/{name}/non_finite"].append(count)

    def _generate_and_score_completions(self, inputs):
        output = self._scored_batch(inputs)
        if "policy_filter_weight" in output:
            kept = filter_batch(
                output, output.pop("policy_filter_weight"), self._all_reduce_sum, self.accelerator.gather
            )
            self._metrics["train"]["policy_filtration/kept_fraction"].append(kept)
        if self._aepo is not None and self.model.training:
            output = self._with_aepo_regularizer(inputs, output)
        return output

    def _with_aepo_regularizer(self, inputs: list, output: dict) -> dict:
        """AEPO (arXiv 2510.08141; `trl_plus.trainer.aepo`): resample the first prompts at the regulated temperature
        and put their rewarded samples, with advantage 1, in place of the batch's first rows."""
        args, metrics = self.args, self._metrics["train"]
        temperature = self._aepo.next_temperature()
        num_groups = max(1, int(args.aepo_prompt_fraction * len(inputs) // self.num_generations))
        with sampling_temperature(self, temperature):
            regularizer = self._generate_and_score_round(inputs[: num_groups * self.num_generations])
        for key in ("is_scored", "policy_filter_weight"):  # the regularizer's rows are neither whitened nor filtered
            regularizer.pop(key, None)
        rewarded = aepo_rewarded(regularizer["advantages"], args.aepo_advantage_threshold)
        rewarded &= (regularizer["completion_mask"] * regularizer.get("tool_mask", 1)).sum(1) > 0  # ReMax's greedy
        counts = self.accelerator.gather(rewarded.sum().reshape(1)).tolist()
        total = self._aepo.num_regularizer_samples(sum(counts))
        before = sum(counts[: self.accelerator.process_index])
        local = max(0, min(counts[self.accelerator.process_index], total - before))  # the first `total`, rank order
        num_rows = output["completion_ids"].size(0)
        rows = split_rows(output, num_rows)
        dropped = set(output) - set(rows[0]) - {"num_items_in_batch"}
        if dropped:
            raise ValueError(f"AEPO replaces rows of the batch and cannot carry its non-row inputs {sorted(dropped)}.")
        new_rows = regularizer_rows(
            split_rows(regularizer, regularizer["completion_ids"].size(0)),
            rewarded,
            local,
            token_advantages=output["advantages"].dim() == 2,
        )
        batch = self._to_training_batch(stack_rows(new_rows + rows[local:], self._pad_values))
        metrics["aepo/entropy"].append(self._aepo.entropy)
        metrics["aepo/target_entropy"].append(self._aepo.target)
        metrics["aepo/temperature"].append(temperature)
        metrics["aepo/regularizer_samples"].append(total)
        metrics["aepo/rewarded_fraction"].append(sum(counts) / (len(rewarded) * self.accelerator.num_processes))
        return batch

    def _scored_batch(self, inputs):
        """The generation batch with its final advantages (after any sampler and global whitening)."""
        mode = "train" if self.model.training else "eval"
        if self._sampler is not None and mode == "train":
            output = self._sampler.sample(inputs, self._generate_and_score_globally)
        else:
            output = self._generate_and_score_round(inputs)
        if self.args.advantage_estimator in GLOBALLY_WHITENED:
            # Completions no reward function scored carry no signal: out of the statistics, advantage 0.
            is_scored = output.pop("is_scored")
            mask = output["completion_mask"] * output.get("tool_mask", 1) * is_scored.unsqueeze(1)
            advantages = output["advantages"]
            token_advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1) * mask
            output["advantages"] = masked_whiten(token_advantages, mask, self._all_reduce_sum)
            if not (self.args.dynamic_sampling and mode == "train"):
                self._log_advantages(output)  # the rows of the one round, now with their whitened advantages
        return output

    def _generate_and_score_round(self, inputs):
        """TRL's generation and scoring, with this process's advantages replaced by the configured estimator's.

        The result is not yet whitened over the global batch: dynamic sampling changes which rows are in it.
        """
        output = super()._generate_and_score_completions(inputs)
        if self._replaces_trl_advantages or self._trl_reward_std_overflowed():
            output["advantages"] = self._compute_advantages(output)
            self._log_advantages(output)  # TRL logged this round's rows with its own GRPO advantages
        if self.args.advantage_estimator == "remax":
            self._mask_greedy_rows(output)
        if self.args.policy_filtration is not None and self.model.training:  # per row: the sampler regroups rows
            all_weights = call_with_supported(
                POLICY_FILTERS.get(self.args.policy_filtration),
                self._global_rewards(),
                self.num_generations,
                weight_pow=self.args.policy_filtration_pow,
            )
            output["policy_filter_weight"] = self._local_rows(all_weights, output)
        if self.args.advantage_estimator in GLOBALLY_WHITENED:  # kept per row: dynamic sampling regroups rows
            output["is_scored"] = ~torch.isnan(self._local_rows(self._global_rewards(), output))
        return output

    # ------------------------------------------------------------------ ReMax
    def _greedy_rows(self, num_rows: int, num_generations: int) -> torch.Tensor:
        return greedy_row_mask(num_rows, self.accelerator.process_index * num_rows, num_generations)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.args.advantage_estimator != "remax":
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        greedy_rows = self._greedy_rows(len(prompt_ids), num_generations)
        if not self.use_vllm:
            greedy_context = greedy_rows_in_generate(self.accelerator.unwrap_model(self.model_wrapped), greedy_rows)
        elif self.vllm_mode == "colocate":
            greedy_context = greedy_rows_in_vllm_colocate(self.vllm_generation.llm, greedy_rows)
        elif self.accelerator.is_main_process:  # server: only the main process sends the (gathered) prompts
            greedy_context = greedy_last_in_vllm_server(self.vllm_generation.vllm_client)
        else:
            greedy_context = nullcontext()
        with greedy_context:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )

    def _mask_greedy_rows(self, output: dict) -> None:
        """Keep ReMax's greedy baselines out of the loss, and log their reward (the baseline)."""
        mode = "train" if self.model.training else "eval"
        num_generations = self._num_generations(mode)
        is_greedy = self._greedy_rows(output["completion_ids"].size(0), num_generations).to(self.accelerator.device)
        output["completion_mask"] = output["completion_mask"] * ~is_greedy.unsqueeze(1)
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        baseline = self._global_rewards().view(-1, num_generations)[:, -1]
        self._metrics[mode]["remax/baseline_reward"].append(torch.nanmean(baseline).item())

    def _num_generations(self, mode: str) -> int:
        return self.num_generations if mode == "train" else self.num_generations_eval

    def _local_rows(self, global_values: torch.Tensor, output: dict) -> torch.Tensor:
        """This process's slice of values computed for every process's rows (TRL gathers them in rank order)."""
        local_size = output["completion_ids"].size(0)
        start = self.accelerator.process_index * local_size
        return global_values[start : start + local_size]

    @property
    def _replaces_trl_advantages(self) -> bool:
        args = self.args
        return args.advantage_estimator != "grpo" or args.kl_in_reward or self._process_reward is not None

    def _trl_reward_std_overflowed(self) -> bool:
        """Whether TRL's float32 reward std overflowed (std = inf turns every advantage of the group into 0): rewards
        beyond 1e18 in magnitude, whose squared deviations can pass float32's 3.4e38 summed over a group of 64."""
        args = self.args
        if args.advantage_estimator != "grpo" or args.scale_rewards == "none":
            return False
        if args.multi_objective_aggregation != "sum_then_normalize":
            return False
        return bool(torch.nan_to_num(self._global_rewards().abs(), nan=0.0).max() > 1e18)

    def _global_rewards(self) -> torch.Tensor:
        """Weighted sum of the gathered rewards, `(N,)`; NaN where no reward function scored the completion."""
        rewards_per_func = self._last_rewards_per_func
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), torch.nan)

    def _compute_advantages(self, output: dict) -> torch.Tensor:
        """This process's advantages, `(B,)`, or `(B, T)` when KL is in the reward."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        if self._process_reward is not None:
            advantages = self._process_advantages(output)
        elif args.advantage_estimator == "grpo" and not self._trl_reward_std_overflowed():
            advantages = output["advantages"]
        elif args.advantage_estimator == "grpo":  # the same advantages as TRL's, with an overflow-safe std
            all_advantages = ADVANTAGES.get("grpo")(
                self._global_rewards(), self._num_generations(mode), scale_rewards=args.scale_rewards
            )
            advantages = self._local_rows(all_advantages, output)
        else:
            num_generations = self._num_generations(mode)
            all_advantages = ADVANTAGES.get(args.advantage_estimator)(self._global_rewards(), num_generations)
            advantages = self._local_rows(all_advantages, output)
        if args.kl_in_reward:
            mask = output["completion_mask"] * output.get("tool_mask", 1)
            kl = KL_ESTIMATORS.get(args.kl_estimator)(self._old_log_probs(output), output["ref_per_token_logps"])
            self._metrics[mode]["kl"].append(self._global_masked_mean(kl, mask))
            advantages = kl_penalty_to_go(advantages, kl, mask, self.beta)
        return advantages

    def _process_advantages(self, output: dict) -> torch.Tensor:
        """GRPO process supervision: `(B, T)` token advantages from the step rewards of every process's rows."""
        mode = "train" if self.model.training else "eval"
        num_generations = self._num_generations(mode)
        steps = gather_object(self._process_reward.last_steps)  # groups can straddle processes
        step_ends = [indices for _, indices in steps]
        width = max([output["completion_ids"].size(1)] + [index + 1 for indices in step_ends for index in indices])
        all_advantages = process_advantages([rewards for rewards, _ in steps], step_ends, num_generations, width)
        local_advantages = self._local_rows(all_advantages.to(output["completion_ids"].device), output)
        return local_advantages[:, : output["completion_ids"].size(1)] * output["completion_mask"]

    def _old_log_probs(self, output: dict) -> torch.Tensor:
        """Log-probs of the sampling policy: TRL's when it computed them, otherwise one no-grad forward pass."""
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            log_probs, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return log_probs

    def _log_advantages(self, output: dict) -> None:
        """Show this round's advantages (per-sequence mean for token advantages) beside its rows in the completions
        log, replacing the GRPO advantages TRL logged for them."""
        advantages = output["advantages"]
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        if advantages.dim() == 2:
            advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        gathered = self.accelerator.gather(advantages).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(len(gathered), len(logged))):
            logged.pop()
        logged.extend(gathered)

    # ------------------------------------------------------------------ sampling
    def _make_sampler(self) -> Sampler:
        """The sampler of dynamic sampling and selective rollout; it calls back into the trainer for collectives,
        log-probs and metrics only."""
        args = self.args
        selective_rollout = None
        if args.selective_rollout:
            selective_rollout = SelectiveRollout(
                args.selective_rollout_target, args.selective_rollout_exploration, seed=args.seed
            )
        return Sampler(
            group_size=self.num_generations,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            prompt_batches=self._extra_prompt_loader,
            gather_object=gather_object,
            to_training_batch=self._to_training_batch,
            old_log_probs=None if args.has_old_log_probs else self._old_log_probs_of_rows,
            log_metric=lambda name, value: self._metrics["train"][name].append(value),
            pad_values=self._pad_values,
            dynamic_sampling=args.dynamic_sampling,
            max_num_gen_batches=args.max_num_gen_batches,
            strict=args.dynamic_sampling_strict,
            selective_rollout=selective_rollout,
            buffer_capacity_groups=args.generation_batch_size // self.num_generations,
        )

    def _generate_and_score_globally(self, inputs) -> tuple[dict, torch.Tensor]:
        """One round for the sampler: this process's output and the rewards of every process's rows."""
        output = self._generate_and_score_round(inputs)
        return output, self._global_rewards()

    def _to_training_batch(self, batch: dict) -> dict:
        batch = {key: value.to(self.accelerator.device) for key, value in batch.items()}
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return batch

    def _old_log_probs_of_rows(self, batch: dict) -> torch.Tensor:
        return self._old_log_probs({key: value.to(self.accelerator.device) for key, value in batch.items()})

    @property
    def _pad_values(self) -> dict[str, float]:
        pad_token_id = self._tokenizer.pad_token_id
        return {
            "prompt_ids": pad_token_id,
            "completion_ids": pad_token_id,
            "tool_mask": 1,
            "importance_sampling_ratio": 1,
        }

    def _extra_prompt_loader(self, epoch: int):
        """One epoch of fresh prompts for dynamic-sampling rounds, sharded like the training dataloader.

        A second sampler (its own seed for each epoch, one repeat) rather than the trainer's dataloader, which the
        training loop owns. Every process takes as many batches (the rounds are decided from gathered data), so the
        stream's position is the same on every process.
        """
        sampler = RepeatSampler(
            self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed + 1 + epoch,
        )
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Dynamic sampling",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=lambda _dataset: sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, whose order of each epoch a resumed run reproduces (see `EpochOrder`)."""
        sampler = super()._get_train_sampler(dataset)
        return EpochOrder(sampler) if isinstance(sampler, RepeatSampler) else sampler

    # ------------------------------------------------------------------ generation accounting
    def _generate(self, prompts: list):
        """TRL's generation, counting every completion and completion token generated for training, over all
        processes (the one reduce runs on every process for every generate call). With `ttrl_num_votes`, the same
        prompts are generated again for the vote-only completions (the same calls on every process)."""
        generated = self._counted(super()._generate(prompts))
        if self._extra_votes is not None and self.model.training:
            rounds = []
            for _ in range(self._extra_votes.extra_rounds):
                rounds.append(self._counted(super()._generate(prompts))[3])  # the decoded completions
            self._extra_votes.collect(rounds)
        return generated

    def _counted(self, generated: tuple) -> tuple:
        if self.model.training:
            _, completion_ids, tool_mask = generated[:3]
            num_tokens = [sum(mask) for mask in tool_mask] if tool_mask is not None else map(len, completion_ids)
            counts = torch.tensor([len(completion_ids), sum(num_tokens)], device=self.accelerator.device)
            num_completions, num_tokens = self._all_reduce_sum(counts).tolist()
            self._generation_counter.add(int(num_completions), int(num_tokens))
        return generated

    # ------------------------------------------------------------------ checkpoints
    @property
    def _sampler_holds(self) -> str:
        return _SURPLUS_BUFFER_HOLDS + (_SELECTIVE_ROLLOUT_HOLDS if self.args.selective_rollout else "")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        with open(os.path.join(checkpoint_dir, NONFINITE_STEPS_FILE), "w") as file:
            json.dump(section_states({"step_guard": self._step_guard}), file)
        with open(os.path.join(checkpoint_dir, GENERATION_COUNTS_FILE), "w") as file:
            json.dump(section_states({"generation": self._generation_counter}), file)
        if self._aepo is not None:
            with open(os.path.join(checkpoint_dir, AEPO_STATE_FILE), "w") as file:
                json.dump(section_states({"aepo": self._aepo}), file)
        if self._sampler is not None:
            torch.save(self._sampler.state_dict(), os.path.join(checkpoint_dir, SURPLUS_BUFFER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            read_sections(
                checkpoint, NONFINITE_STEPS_FILE, _NONFINITE_STEPS_HOLDS, read_json, {"step_guard": self._step_guard}
            )
            read_sections(
                checkpoint,
                GENERATION_COUNTS_FILE,
                _GENERATION_COUNTS_HOLDS,
                read_json,
                {"generation": self._generation_counter},
            )
            if self._aepo is not None:
                read_sections(checkpoint, AEPO_STATE_FILE, _AEPO_STATE_HOLDS, read_json, {"aepo": self._aepo})
        if self._sampler is not None and checkpoint is not None:
            state = read_file(checkpoint, SURPLUS_BUFFER_FILE, self._sampler_holds, read_torch)
            with reading(checkpoint, SURPLUS_BUFFER_FILE, self._sampler_holds):
                self._sampler.load_state_dict(state)
        super()._load_optimizer_and_scheduler(checkpoint)

    # ------------------------------------------------------------------ non-finite guard
    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_guard.record_loss(loss.item())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Transformers computes the norm of the accumulated gradients right before the optimizer step: a step whose
        loss or norm is non-finite drops its gradients here, so the optimizer updates neither weights nor state."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss_was_finite_everywhere = True
        if self.accelerator.num_processes > 1:  # one decision on every process (the norm itself is global)
            bad_loss = torch.tensor(float(self._step_guard.has_bad_loss), device=self.accelerator.device)
            loss_was_finite_everywhere = self.accelerator.reduce(bad_loss, reduction="sum").item() == 0
        norm = None if grad_norm is None else float(grad_norm)
        if self._step_guard.should_skip_step(norm, self.state.global_step + 1, loss_was_finite_everywhere):
            if self.is_deepspeed_enabled:  # DeepSpeed steps from its own gradient buffers, which zero_grad misses
                raise NonFiniteTrainingError(
                    f"Optimizer step {self.state.global_step + 1}: non-finite loss or gradient norm ({norm}); "
                    "under DeepSpeed the update cannot be skipped, so training stopped before it was applied."
                )
            model.zero_grad(set_to_none=True)  # torch optimizers skip parameters without a gradient
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._step_guard.num_skipped:  # the run's count, from the first skipped step on
            logs = {**logs, "nonfinite/skipped_steps": self._step_guard.num_skipped}
        if "loss" in logs:  # running totals, logged as they stand (TRL's `_metrics` would average them over steps)
            counter = self._generation_counter
            logs = {**logs, "generation/completions": counter.completions, "generation/tokens": counter.tokens}
        super().log(logs, start_time)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tensors = dict(state_dict or {})
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded parameters: only the gathered dict
            tensors.update(self.accelerator.unwrap_model(self.model).state_dict())
        non_finite = [
            name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()
        ]
        if non_finite:
            raise NonFiniteTrainingError(
                f"Refusing to save non-finite weights to {output_dir}: {len(non_finite)} tensors hold NaN or inf "
                f"(first: {non_finite[:3]})."
            )
        super()._save(output_dir, state_dict)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        if self.args.registry_policy_loss is None:
            loss = super()._compute_loss(model, inputs)
        else:
            loss = self._compute_registry_loss(model, inputs)
        if self._aepo is not None and self.model.training:  # the update's entropy, which sets the next temperature
            self._aepo.observe(self._metrics["train"]["entropy"][-1])
        return loss

    def _compute_registry_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUT_KEYS},
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        # TRL's token masks, with TRL's meaning: the top-entropy tokens (80/20 forking tokens) and the off-policy
        # sequence mask (judged on the estimator's advantages and the sampling policy's log-probs).
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        off_policy_mask = None
        if self.off_policy_mask_threshold is not None:
            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if args.entropy_advantage_alpha > 0:
            shaped = ADVANTAGE_SHAPERS.get("entropy")(
                advantages, entropies, mask, alpha=args.entropy_advantage_alpha, kappa=args.entropy_advantage_kappa
            )
            self._metrics[mode]["entropy_advantage/bonus_mean"].append(
                self._global_masked_mean(shaped - advantages, mask)
            )
            advantages = shaped

        log_prob, old_log_prob = per_token_logps, old_per_token_logps
        if self.importance_sampling_level == "sequence":  # GSPO: every token sees its sequence's mean log-prob
            log_prob, old_log_prob = _sequence_mean(log_prob, mask), _sequence_mean(old_log_prob, mask)
        per_token_loss, loss_metrics = call_with_supported(
            POLICY_LOSSES.get(args.registry_policy_loss),
            log_prob,
            old_log_prob,
            advantages,
            mask,
            **self._policy_loss_hyperparameters,
        )
        for token_mask in (off_policy_mask, entropy_mask):
            if token_mask is not None:
                per_token_loss = per_token_loss * token_mask
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0 and not args.kl_in_reward:
            per_token_kl = KL_ESTIMATORS.get(args.kl_estimator)(per_token_logps, inputs["ref_per_token_logps"])
            if args.use_bias_correction_kl:  # the importance weight of the configured level, as TRL's
                per_token_kl = per_token_kl * torch.exp(log_prob - old_log_prob)
            per_token_loss = per_token_loss + self.beta * per_token_kl
            self._metrics[mode]["kl"].append(self._global_masked_mean(per_token_kl, mask))

        accumulation_steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss = call_with_supported(
            AGGREGATIONS.get(args.resolved_loss_aggregation),
            per_token_loss,
            mask,
            num_tokens=self._token_mean_normalizer(inputs["num_items_in_batch"], mode),
            max_length=self.max_completion_length,
        )
        policy_loss = loss.detach()
        if args.resolved_loss_aggregation != "token_mean":
            loss = loss / accumulation_steps
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = apply_entropy_bonus(self, loss, policy_loss, entropies, effective_mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())

        self._metrics[mode]["entropy"].append(self._global_masked_mean(entropies, mask))
        for name, values in loss_metrics.items():
            self._metrics[mode][name].append(self._global_masked_mean(values, mask))
        return loss

    def _token_mean_normalizer(self, count: torch.Tensor, mode: str) -> torch.Tensor:
        """This micro-batch's share of the valid tokens of the accumulation window over all processes (TRL "dapo")."""
        num_tokens = count.clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_tokens = num_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return num_tokens

    # ------------------------------------------------------------------ distributed helpers
    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `(B, T)` values over the valid tokens of every process; of `(B, 1)` values (one per sequence, as
        with a sequence-level ratio) over the sequences, as TRL's metrics."""
        if values.dim() == 2 and values.size(1) == 1 and mask.size(1) != 1:
            mask = torch.ones_like(values)
        values = values.expand_as(mask)
        totals = self._all_reduce_sum(torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)]).detach())
        return (totals[0] / totals[1].clamp(min=1.0)).item()
