"""`PPOConfig` / `PPOTrainer`: PPO with a critic (GAE, KL in the reward) on TRL's generation path; `VAPOConfig` on top.

`PPOTrainer` is `trl_plus.GRPOTrainer` (so TRL's generation, reward functions / reward models, PEFT, logging) with
these hooks (all but `_compute_advantages` wrap `super()`):

- `_compute_advantages` (called by the parent's `_generate_and_score_round` for every generation round, since
  `_replaces_trl_advantages` is True): after TRL generated and scored, the critic gives the old values V(s_t) of every
  completion token (no gradient), the sequence score goes on the last token and -beta * KL on every token
  (InstructGPT, arXiv 2203.02155 eq. 2), and GAE (arXiv 1506.02438) turns them into token advantages `(B, T)` and
  value targets. `_scored_batch` (the parent's generation batch, before policy filtration) then whitens the
  advantages over the global batch and updates the KL controller (arXiv 1909.08593) once per generation batch.
- `_compute_loss`: the critic's clipped value loss (critic forward with only the critic adapter active) plus the
  policy loss, `super()._compute_loss` (TRL's or the registry's PPO clip on the token advantages), plus VAPO's
  positive-example NLL: one loss, policy + vf_coef * value, and one backward by the Trainer.
- `training_step`: during value pretraining on several processes, drops the policy's all-zero gradients so that the
  optimizer leaves the frozen policy alone (see "One backward" below).

Critic. By default (`value_model=None`) a PEFT policy gets a critic that is a second LoRA adapter, "critic", plus a
scalar value head on the policy's own PEFT model: one copy of the base weights serves the policy (adapter "default"),
the critic (adapter "critic") and the reference (adapters disabled). Otherwise `value_model` is a separate model (a
path loaded with `AutoModelForTokenClassification(num_labels=1)`, or a model object such as a reward model,
`AutoModelForSequenceClassification`) whose `score` head is applied to the hidden state of every token; a full
(non-PEFT) policy without `value_model` gets one initialized from its own checkpoint. The critic is trained the way
the policy is: with a PEFT policy a separate value model (e.g. the reward model, InstructGPT's critic initialization)
gets a LoRA adapter of its own, "critic", on its body, its head fully trainable and its base frozen
(`trl_plus.trainer.lora_value_model`; `critic_peft_config` or the policy adapter's config with `critic_lora_r` /
`critic_lora_alpha`); with a full policy it is trained in full. Either way the critic's modules
are attributes of the trained model (`value_head` or `value_model`), so the Trainer's optimizer
(`critic_learning_rate` gets its own parameter groups), gradient clipping, LR schedule and optimizer checkpoint cover
them; their weights are saved next to the policy's (`critic/` and `value_model/` in a checkpoint), the KL
controller in `ppo_state.json`. A resume restores all of them or raises, before training continues, an error naming
the file that is missing or unusable (`trl_plus.trainer.checkpoints`).

One backward for policy and critic. The critic's parameters are ordinary parameters of the prepared model, so DDP
reduces their gradients with the policy's in the one backward. Gradient checkpointing re-runs each layer's forward
during the backward, reading whichever adapter is active then; `trl_plus.trainer.adapter_checkpointing` makes every
checkpointed layer recompute with the adapter that was active in its forward, so the critic's and the policy's
layers each get their own. Both graphs live until that backward, so the critic forward is checkpointed whole: it
keeps only its inputs and is recomputed after the policy's graph is freed (peak memory near GRPO's, one more critic
forward per micro-batch). The critic forward runs outside DDP's forward, so DDP cannot search it for unused
parameters: `PPOConfig` sets `ddp_find_unused_parameters=False` (every trainable parameter gets a gradient in every
backward). During value pretraining the policy loss is skipped; on several processes a zero-weighted one-token
policy forward then gives the policy exact zero gradients (DDP's forward arms its gradient reduction, and without
unused-parameter search it waits for every parameter), and `training_step` drops them before the optimizer step.

DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 shard and gather the critic as the policy, since its modules are submodules of
the prepared model: its parameters are in the engine's / FSDP's optimizer, and the one backward reduces their
gradients. Under FSDP2 the critic forward runs as the prepared model's forward (`trl_plus.trainer.sharding`), so
that the root module's hooks gather the parameters of its own group (the value head, a value model's embeddings
and head); under ZeRO-3 every submodule gathers its own. `Trainer.save_model` gathers the full state dict under
both, and `_save` takes the critic's tensors from it; a resume loads them back into the shards (FSDP2) or comes from
DeepSpeed's engine checkpoint, which holds the critic with the policy. FSDP needs `fsdp_version` 2 and
`FULL_STATE_DICT` (`examples/accelerate_configs/fsdp2.yaml`), checked at construction.

vLLM (`use_vllm`, colocate or server) generates with the policy through TRL's own path: TRL's weight sync is wrapped
(`trl_plus.trainer.vllm_sync`) so that vLLM receives the base weights with the policy adapter merged, under the base
model's names, and never the critic adapter, the value head or the value model. TRL's importance-sampling correction
(`vllm_importance_sampling_correction`) multiplies the per-token policy loss, so it applies to the `(B, T)` GAE
advantages as to GRPO's; the critic's loss is not reweighted (its targets are the rollout's returns, whatever policy
sampled them).

Reward model scores (`normalize_reward`, `reward_clip`): the sequence score (the weighted sum of the reward functions)
is normalized with the running mean and std of every training score so far and/or clipped before it goes on the last
token (`trl_plus.algos.running_stats`); the rewards are gathered from every process, so the moments are global and
the same everywhere; they are saved in `ppo_state.json`. PPO-ptx (`ptx_coef`, the trainer's `ptx_dataset`): every
training micro-batch adds ptx_coef times the mean token NLL of this process's next batch of that text
(`trl_plus.trainer.ptx`, sharded over processes, its position saved in `ppo_state.json`), from a forward of the
policy (its adapter active) at temperature 1.

Metrics, besides TRL's (global means over the valid tokens of every process): `value/loss` (the per-token clipped
value loss), `value/clipfrac` (tokens where the clipped term is larger), `value/mean` (V on the trained tokens),
`value/explained_variance` (1 - Var(R - V_old) / Var(R) over the rollout's global batch), `kl` (the rollout's per-token
KL, when it is in the reward), `kl/beta` (the beta that shaped the rollout), `ppo/approx_kl` ((r - 1) - log r, the
update policy against the sampling one), `ppo/clipfrac` (tokens whose ratio r is outside [1 - eps_low, 1 + eps_high]),
`value/pretraining` (1 while the policy is frozen) and, with `positive_lm_coef > 0`, `positive_lm/loss` (the NLL of
positive completions) and `positive_lm/fraction` (their share of the rollout). The critic's readiness, per rollout:
`value/td_error_std` (the spread of the one-step TD errors r_t + gamma V_{t+1} - V_t), `value/advantage_std` (the
spread of the GAE advantages before whitening: whitening scales them to std 1, however little of them is signal) and
`value/lambda_policy` (the mean policy lambda); once, when value pretraining ends, `value/pretraining_steps` (the
critic-only optimizer steps) and `value/pretraining_explained_variance` (the readiness window's mean then);
`reward_norm/mean`, `reward_norm/std` (the running moments) and `reward_norm/clipfrac` (scored completions at the
clip), and `ptx/loss` (the PPO-ptx NLL, global token mean). A policy trained on a critic with negative explained
variance (worse than predicting the mean return) gets a warning, at most once every 100 steps.

Value pretraining (VAPO, VC-PPO arXiv 2503.01491): while it lasts, optimizer steps train only the critic, on
Monte-Carlo returns of the frozen initial policy. It ends when the critic is ready (the mean explained variance of
the last `value_pretrain_window` rollouts >= `value_pretrain_threshold`) or at `value_pretrain_steps`, the cap, with a
warning (`value_pretrain_strict`: an error) when the critic is not ready then. The decision rests on globally
reduced values, so every process takes it at the same step, and it is saved in `ppo_state.json`.

VAPO (arXiv 2504.05118) is the same trainer with other defaults (`VAPOConfig`): decoupled GAE (lambda_critic = 1,
lambda_policy = 0.95, or length-adaptive max(1 - 1 / (alpha * length), 0.95) with alpha = 0.05), value pretraining
(at most 50 steps), a critic learning rate twice the actor's, a positive-example LM loss (mu = 0.1), Clip-Higher
(0.2 / 0.28), token-level loss and several samples per prompt.
"""

import copy
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import safetensors.torch
import torch
from accelerate.utils import is_peft_model
from peft import get_peft_model_state_dict
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from transformers import AutoModelForTokenClassification, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id

from ..algos import KL_ESTIMATORS, masked_whiten
from ..algos.running_stats import ScoreNormalizer
from ..algos.value import (
    AdaptiveKLController,
    FixedKLController,
    ValuePretraining,
    clipped_value_loss,
    decoupled_gae,
    explained_variance,
    gae,
    kl_shaped_token_rewards,
    length_adaptive_lambda,
)
from . import lora_value_model
from .adapter_checkpointing import bind_adapters_to_checkpoints
from .checkpoints import (
    check_shapes,
    read_file,
    read_json,
    read_sections,
    reading,
    require_file,
    safetensors_shapes,
    section_states,
)
from .field_types import check_field_types
from .grpo import GRPOConfig, GRPOTrainer
from .ptx import PtxStream, check_ptx_arguments, lm_nll_sum
from .sharding import (
    check_deepspeed_optimizer,
    check_fsdp_plugin,
    check_lora_value_model_unsharded,
    forward_through_root,
    load_full_state,
    warn_value_pretraining_under_deepspeed,
)
from .vllm_sync import send_policy_only

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # the adapter TRL trains (and disables for the reference)
CRITIC_ADAPTER = "critic"
VALUE_HEAD = "value_head"  # attribute of the trained model holding the LoRA critic's head
VALUE_MODEL = "value_model"  # attribute of the trained model holding a separate critic
VALUE_HEAD_FILE = "value_head.safetensors"  # saved in the critic adapter's folder, `critic/`
PPO_STATE_FILE = "ppo_state.json"  # {section: state}, see `PPOTrainer._ppo_state`
_CRITIC_ADAPTER_FILE = f"{CRITIC_ADAPTER}/{ADAPTER_SAFE_WEIGHTS_NAME}"
_VALUE_HEAD_PATH = f"{CRITIC_ADAPTER}/{VALUE_HEAD_FILE}"
NEGATIVE_EXPLAINED_VARIANCE_WARNING_EVERY = 100  # optimizer steps between two warnings about a critic worse than none


def _check_policy_is_trained(value_pretrain_steps: int, num_steps: int, steps_source: str) -> None:
    """Raise when value pretraining takes every one of the run's `num_steps` optimizer steps (`steps_source` says
    which setting gives them), so that the policy would never be updated."""
    if value_pretrain_steps >= num_steps:
        raise ValueError(
            f"`value_pretrain_steps` is {value_pretrain_steps} and {steps_source}: every optimizer step would train "
            "only the critic and the policy would never be updated. Set value_pretrain_steps below the number of "
            "steps (0 turns value pretraining off), or train for more steps."
        )


class _GroupSizeForTRLCheck(int):
    """`num_generations=1` while `trl.GRPOConfig.__post_init__` runs: TRL rejects `num_generations < 2` because a
    GRPO group baseline needs two samples, but PPO's baseline is its critic. Compares like 2 in `<` and is 1 in every
    other operation (`generation_batch_size % num_generations` must still see 1); `PPOConfig.__post_init__` puts a
    plain `int` back right after."""

    def __lt__(self, other):
        return 2 < other


@dataclass
class PPOConfig(GRPOConfig):
    """`trl_plus.GRPOConfig` for PPO with a critic: GAE on KL-shaped token rewards, value loss, adaptive KL.

    TRL's fields keep their meaning: `num_iterations` is the number of PPO epochs over a generation batch and
    `steps_per_generation` the number of mini-batches it is split into (one optimizer step each when it equals
    `gradient_accumulation_steps`); `epsilon` / `epsilon_high` clip the policy ratio; `beta` is the initial KL
    coefficient. Defaults that differ from GRPO: one completion per prompt (`num_generations=1`), `beta=0.05` with k1
    KL in the reward. With `beta=0` there is no KL at all and `kl_in_reward` / `kl_estimator` are reset to their
    no-KL values (False / 'k3'). `ddp_find_unused_parameters=None` becomes False (see `PPOTrainer`'s one backward).
    """

    num_generations: int | None = field(
        default=1,
        metadata={"help": "Completions per prompt. PPO's baseline is the critic, so 1 works; more are allowed."},
    )
    beta: float = field(
        default=0.05,
        metadata={"help": "Initial KL coefficient (the fixed one when `kl_target` is None). 0 disables the KL."},
    )
    kl_in_reward: bool = field(
        default=True,
        metadata={"help": "Put -beta * KL_t in the token reward (InstructGPT) instead of beta * KL in the loss."},
    )
    kl_estimator: str = field(
        default="k1", metadata={"help": "KL estimator for the reward penalty: k1 (InstructGPT), k2 or k3."}
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive KL controller (arXiv 1909.08593 sec. 2.2): target KL per sequence (sum over its tokens, "
            "nats; the paper uses 6). None: beta stays fixed."
        },
    )
    kl_horizon: float = field(
        default=10000.0,
        metadata={"help": "Adaptive KL controller horizon, in sequences (the paper: 10000)."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE; 1.0 in RLHF."})
    lam: float = field(
        default=0.95, metadata={"help": "GAE lambda of the policy advantages (and of the value targets by default)."}
    )
    lam_critic: float | None = field(
        default=None,
        metadata={
            "help": "GAE lambda of the value targets (decoupled GAE, VAPO: 1.0, i.e. Monte-Carlo returns when "
            "gamma = 1). None: the same as `lam`."
        },
    )
    length_adaptive_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Length-adaptive GAE (VAPO, arXiv 2504.05118 'Length-Adaptive GAE'): the policy lambda of a "
            "completion of length l is max(1 - 1/(alpha * l), `length_adaptive_min_lambda`), at most 1; replaces "
            "`lam`. VAPO uses alpha = 0.05. None: off."
        },
    )
    length_adaptive_min_lambda: float | None = field(
        default=None,
        metadata={
            "help": "Floor of the length-adaptive policy lambda. None: `lam` (0.95, VC-PPO's policy lambda), so that "
            "length adaptation only raises lambda for long completions (l > 1/(alpha * (1 - lam)): 400 tokens at "
            "alpha 0.05) and short ones keep GAE with `lam` instead of one-step TD errors that rest entirely on the "
            "critic (see `trl_plus.algos.value.length_adaptive_lambda`). 0.0: the bare formula, clamped at 0."
        },
    )
    whiten_advantages: bool = field(
        default=True,
        metadata={"help": "Z-score the token advantages over the valid tokens of the global batch (all processes)."},
    )
    vf_coef: float = field(
        default=0.1,
        metadata={
            "help": "Weight of the value loss. The critic has its own parameters, so this mostly sets the critic's "
            "share of the gradient norm that `max_grad_norm` clips (one clip over policy and critic)."
        },
    )
    cliprange_value: float | None = field(
        default=0.2,
        metadata={"help": "Value clipping around the rollout's values, in reward units. None: unclipped loss."},
    )
    critic_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the critic (adapter and head, or value model). None: "
            "`critic_learning_rate_ratio` * `learning_rate`, or `learning_rate` when the ratio is None too."
        },
    )
    critic_learning_rate_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Critic learning rate as a multiple of `learning_rate`, used when `critic_learning_rate` is None "
            "(VAPO, arXiv 2504.05118 experimental setup: actor 1e-6, critic 2e-6, a ratio of 2). None: 1."
        },
    )
    value_model: str | None = field(
        default=None,
        metadata={
            "help": "Path or id of a separate critic, loaded with AutoModelForTokenClassification(num_labels=1) (a "
            "reward-model checkpoint works: its `score` head becomes the value head; with a PEFT policy it gets a "
            "LoRA adapter of its own). None: a LoRA critic on the policy's own base model for a PEFT policy, else a "
            "full critic initialized from the policy's checkpoint."
        },
    )
    critic_lora_r: int | None = field(
        default=None, metadata={"help": "Rank of the LoRA critic. None: the policy adapter's rank."}
    )
    critic_lora_alpha: int | None = field(
        default=None, metadata={"help": "LoRA alpha of the LoRA critic. None: the policy adapter's."}
    )
    value_pretrain_steps: int = field(
        default=0,
        metadata={
            "help": "Value pretraining (VAPO arXiv 2504.05118 'Value-Pretraining', VC-PPO arXiv 2503.01491): at most "
            "the first N optimizer steps train only the critic, on Monte-Carlo returns (lambda = 1) of the frozen "
            "initial policy; pretraining ends earlier once the critic is ready (`value_pretrain_threshold`). They "
            "count in max_steps. 0: none."
        },
    )
    value_pretrain_threshold: float | None = field(
        default=0.5,
        metadata={
            "help": "The critic is ready, and the policy starts training, once the mean explained variance of the "
            "value targets over the last `value_pretrain_window` rollouts (each measured before the critic trains "
            "on it) is >= this (VAPO: pretrain until the value loss and explained variance are good). None: "
            "pretrain for exactly `value_pretrain_steps` steps."
        },
    )
    value_pretrain_window: int = field(
        default=5,
        metadata={"help": "Rollouts whose explained variances are averaged for the readiness check."},
    )
    value_pretrain_strict: bool = field(
        default=False,
        metadata={
            "help": "When `value_pretrain_steps` run out before the critic is ready: raise instead of warning and "
            "starting the policy on a critic that is not ready."
        },
    )
    positive_lm_coef: float = field(
        default=0.0,
        metadata={
            "help": "VAPO positive-example LM loss weight mu: + mu * NLL of the completions whose reward is above "
            "`positive_reward_threshold` (token mean over them). VAPO: 0.1."
        },
    )
    positive_reward_threshold: float = field(
        default=0.0,
        metadata={
            "help": "A completion is a positive example when its reward (the weighted sum of the reward functions, "
            "without KL) is > this. 0.0 suits 0/1 or -1/+1 correctness rewards."
        },
    )

    normalize_reward: bool = field(
        default=False,
        metadata={
            "help": "Reward normalization (InstructGPT arXiv 2203.02155 app. C.3; arXiv 2403.17031 sec. 4): the "
            "sequence score (the weighted sum of the reward functions, e.g. a reward model's score) becomes "
            "(r - mean) / std with the running mean and std of every training score so far (global over processes, "
            "saved in checkpoints). What GAE, the value targets and `positive_reward_threshold` then see."
        },
    )
    reward_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip the sequence score (after normalization, when on) to [-reward_clip, reward_clip] (OpenRLHF, "
            "arXiv 2403.17031: 5 to 10 with normalization). None: no clipping."
        },
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "PPO-ptx (InstructGPT arXiv 2203.02155 eq. 2, its gamma): + ptx_coef * the language-model loss "
            "(mean token NLL) of a batch of `ptx_dataset` text in every training micro-batch's loss (an optimizer "
            "step adds ptx_coef times the mean of its micro-batches' NLLs; none during value pretraining, when the "
            "policy is frozen). Needs the trainer's `ptx_dataset`. 0: off."
        },
    )
    ptx_batch_size: int | None = field(
        default=None,
        metadata={"help": "Texts per process per micro-batch for PPO-ptx. None: per_device_train_batch_size."},
    )
    ptx_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate each PPO-ptx text to this many tokens. None: no truncation."},
    )

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare values; GRPOConfig's __post_init__ repeats it
        if self.beta == 0.0:  # no KL: where it would go and how it would be estimated do not apply
            self.kl_in_reward, self.kl_estimator = False, "k3"
        self._validate_ppo()
        if self.ddp_find_unused_parameters is None:  # see `_validate_ppo`
            self.ddp_find_unused_parameters = False
        if (
            self.length_adaptive_alpha is not None
            and self.length_adaptive_min_lambda == 0.0
            and self.max_completion_length * self.length_adaptive_alpha <= 1
        ):
            logger.warning(
                f"length_adaptive_alpha={self.length_adaptive_alpha} and length_adaptive_min_lambda=0.0 with "
                f"max_completion_length={self.max_completion_length}: lambda_policy = 1 - 1 / (alpha * length) is "
                "<= 0 for every completion, so the policy gets one-step TD advantages that rest entirely on the "
                "critic. The formula is meant for completions longer than 1 / alpha tokens; leave "
                "length_adaptive_min_lambda=None (the floor is then `lam`)."
            )
        single_sample = self.num_generations == 1
        if single_sample:
            self.num_generations = _GroupSizeForTRLCheck(1)
        try:
            super().__post_init__()
        finally:
            if single_sample:
                self.num_generations = 1

    def _validate_ppo(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        check(self.num_generations is None or self.num_generations >= 1, "`num_generations` must be >= 1.")
        check(
            self.aepo_target_entropy is None,
            f"`aepo_target_entropy` is {self.aepo_target_entropy}; valid with PPO: None. AEPO's regularizer rows take "
            "advantage 1 in place of GAE's, which the critic's value targets and the whitening do not account for; "
            "use it with the GRPO-family trainers.",
        )
        check(0.0 <= self.gamma <= 1.0, f"`gamma` must be in [0, 1], got {self.gamma}.")
        check(0.0 <= self.lam <= 1.0, f"`lam` must be in [0, 1], got {self.lam}.")
        check(
            self.lam_critic is None or 0.0 <= self.lam_critic <= 1.0,
            f"`lam_critic` must be in [0, 1], got {self.lam_critic}.",
        )
        check(
            self.length_adaptive_alpha is None or self.length_adaptive_alpha > 0,
            f"`length_adaptive_alpha` must be > 0 (VAPO: 0.05), got {self.length_adaptive_alpha}.",
        )
        check(self.vf_coef >= 0, f"`vf_coef` must be >= 0, got {self.vf_coef}.")
        check(
            self.cliprange_value is None or self.cliprange_value > 0,
            f"`cliprange_value` must be > 0 or None, got {self.cliprange_value}.",
        )
        check(
            self.critic_learning_rate is None or self.critic_learning_rate > 0,
            f"`critic_learning_rate` must be > 0, got {self.critic_learning_rate}.",
        )
        check(self.beta >= 0, f"`beta` must be >= 0, got {self.beta}.")
        check(self.kl_target is None or self.kl_target > 0, f"`kl_target` must be > 0 or None, got {self.kl_target}.")
        check(
            self.kl_target is None or self.beta > 0,
            "`kl_target` adapts beta multiplicatively, so it needs an initial `beta > 0`.",
        )
        check(self.kl_horizon > 0, f"`kl_horizon` must be > 0, got {self.kl_horizon}.")
        check(self.value_pretrain_steps >= 0, f"`value_pretrain_steps` must be >= 0, got {self.value_pretrain_steps}.")
        if self.max_steps > 0:  # epoch-based runs: `PPOTrainer.set_initial_training_values` checks it
            _check_policy_is_trained(self.value_pretrain_steps, self.max_steps, f"`max_steps` is {self.max_steps}")
        check(
            self.value_pretrain_threshold is None or 0.0 <= self.value_pretrain_threshold <= 1.0,
            f"`value_pretrain_threshold` is {self.value_pretrain_threshold}; valid: an explained variance in [0, 1] "
            "(VAPO-style readiness, e.g. 0.5), or None (pretrain for exactly `value_pretrain_steps` steps).",
        )
        check(
            self.value_pretrain_window >= 1,
            f"`value_pretrain_window` is {self.value_pretrain_window}; valid: a number of rollouts >= 1.",
        )
        check(
            self.length_adaptive_min_lambda is None or 0.0 <= self.length_adaptive_min_lambda <= 1.0,
            f"`length_adaptive_min_lambda` is {self.length_adaptive_min_lambda}; valid: a lambda in [0, 1], or None "
            "(the floor is `lam`).",
        )
        check(
            self.critic_learning_rate_ratio is None or 0.0 < self.critic_learning_rate_ratio < float("inf"),
            f"`critic_learning_rate_ratio` is {self.critic_learning_rate_ratio}; valid: a finite number > 0 (VAPO: "
            "2.0), or None (the critic gets `learning_rate`).",
        )
        check(self.positive_lm_coef >= 0, f"`positive_lm_coef` must be >= 0, got {self.positive_lm_coef}.")
        check(
            self.reward_clip is None or 0.0 < self.reward_clip < float("inf"),
            f"`reward_clip` is {self.reward_clip}; valid: a finite number > 0 (scores are clipped to [-reward_clip, "
            "reward_clip]), or None (no clipping).",
        )
        check(
            0.0 <= self.ptx_coef < float("inf"),
            f"`ptx_coef` is {self.ptx_coef}; valid: a finite number >= 0 (0: no PPO-ptx).",
        )
        check(
            self.ptx_batch_size is None or self.ptx_batch_size >= 1,
            f"`ptx_batch_size` is {self.ptx_batch_size}; valid: a number of texts >= 1, or None "
            "(per_device_train_batch_size).",
        )
        check(
            self.ptx_max_length is None or self.ptx_max_length >= 2,
            f"`ptx_max_length` is {self.ptx_max_length}; valid: a number of tokens >= 2 (one predicted), or None.",
        )
        for name in ("critic_lora_r", "critic_lora_alpha"):
            check(getattr(self, name) is None or getattr(self, name) > 0, f"`{name}` must be > 0 or None.")
        check(
            self.advantage_estimator == "grpo",
            f"PPO computes GAE advantages from its critic; `advantage_estimator={self.advantage_estimator!r}` does "
            "not apply. Leave it at its default.",
        )
        check(
            self.multi_objective_aggregation == "sum_then_normalize",
            "PPO scores a completion with the weighted sum of the rewards; set "
            "`multi_objective_aggregation='sum_then_normalize'`.",
        )
        check(
            not (self.dynamic_sampling and (self.num_generations or 1) < 2),
            "`dynamic_sampling` keeps groups whose rewards differ, so it needs num_generations >= 2.",
        )
        check(
            self.ddp_find_unused_parameters is not True,
            "`ddp_find_unused_parameters` is True; valid: False or None (PPO sets False). The critic forward runs "
            "outside DDP's forward, so DDP's search for unused parameters would miss the critic's parameters; every "
            "trainable parameter gets a gradient in every backward, so there is nothing to search for.",
        )
        check(
            not (self.selective_rollout and (self.num_generations or 1) < 2),
            f"`selective_rollout` is True with `num_generations` {self.num_generations or 1}; valid: num_generations "
            ">= 2, since it skips prompts whose groups had equal rewards and a group of one always has.",
        )

    @property
    def _scale_rewards_ignored_because(self) -> str | None:
        return "PPO's advantages are GAE's, from the critic (see whiten_advantages)"


@dataclass
class VAPOConfig(PPOConfig):
    """VAPO (arXiv 2504.05118): PPO with decoupled, length-adaptive GAE (lambda_critic = 1.0, lambda_policy =
    1 - 1/(0.05 * length), floored at 0.95), value pretraining, a positive-example LM loss (mu = 0.1), Clip-Higher
    (0.2 / 0.28), token-level loss, several samples per prompt and no KL penalty. The paper samples 16 completions per
    prompt and trains the critic at twice the actor's learning rate (1e-6 / 2e-6).

    Critic warm-up (VAPO "Value-Pretraining", after VC-PPO arXiv 2503.01491): the policy stays frozen while the critic
    fits Monte-Carlo returns (lambda = 1) of the initial policy, until its explained variance is >= 0.5 over the last
    5 rollouts or, at the latest, for the paper's 50 steps (then a warning: `value_pretrain_strict` raises instead).
    What the papers do that stays the user's choice: they initialize the value model from a reward model (pass it as
    `value_model`; the default critic is the policy's checkpoint with a new value head) and score with +1 / -1
    verifier rewards (VC-PPO's setup; `positive_reward_threshold=0.0` suits both 0/1 and -1/+1)."""

    num_generations: int | None = field(default=4, metadata={"help": "Samples per prompt (the paper: 16)."})
    beta: float = field(default=0.0, metadata={"help": "VAPO uses no KL penalty."})
    kl_in_reward: bool = field(default=False, metadata={"help": "No KL (beta = 0)."})
    kl_estimator: str = field(default="k3", metadata={"help": "No KL (beta = 0)."})
    lam: float = field(default=0.95, metadata={"help": "Policy lambda when length_adaptive_alpha is None."})
    lam_critic: float | None = field(default=1.0, metadata={"help": "Decoupled GAE: Monte-Carlo value targets."})
    length_adaptive_alpha: float | None = field(
        default=0.05,
        metadata={"help": "Length-adaptive GAE: lambda_policy = max(1 - 1/(0.05 * length), 0.95) (floor: `lam`)."},
    )
    critic_learning_rate_ratio: float | None = field(
        default=2.0,
        metadata={"help": "Critic learning rate = 2 x the actor's (the paper: 1e-6 and 2e-6)."},
    )
    value_pretrain_steps: int = field(
        default=50,
        metadata={"help": "At most 50 value pretraining steps (the paper's 50), fewer once the critic is ready."},
    )
    positive_lm_coef: float = field(default=0.1, metadata={"help": "Positive-example LM loss weight mu = 0.1."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip eps_low = 0.2."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Clip-Higher eps_high = 0.28."})
    loss_type: str = field(default="dapo", metadata={"help": "Token-level loss."})


class PPOTrainer(GRPOTrainer):
    """PPO with a critic on TRL's generation path; see the module docstring.

    Takes `trl.GRPOTrainer`'s arguments plus `value_model` (a path, or a model with a per-token `score` head such as a
    reward model; overrides `args.value_model`), `critic_peft_config` (the LoRA critic's config; default: a copy of
    the policy adapter's config with `critic_lora_r` / `critic_lora_alpha` applied) and `ptx_dataset` (PPO-ptx's plain
    text, a `text` column, like TRL's `train_dataset`; needs `args.ptx_coef > 0`). Without `value_model`, a PEFT
    policy gets the LoRA critic and a full policy a full critic initialized from the policy's checkpoint.
    """

    config_class = PPOConfig
    _tag_names = ["trl", "trl-plus", "ppo"]
    _name = "PPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        *positional,
        value_model=None,
        critic_peft_config=None,
        ptx_dataset=None,
        **kwargs,
    ):
        if args is not None and not isinstance(args, PPOConfig):
            raise TypeError(f"{type(self).__name__} needs a trl_plus.PPOConfig (or VAPOConfig), got {type(args)}.")
        check_ptx_arguments(0.0 if args is None else args.ptx_coef, ptx_dataset)  # before the model loads
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        check_fsdp_plugin(self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None)
        deepspeed_plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        check_deepspeed_optimizer(
            deepspeed_plugin.deepspeed_config if deepspeed_plugin else None,
            self._critic_learning_rate,
            self.args.learning_rate,
        )
        if getattr(self, "_process_reward", None) is not None:
            raise NotImplementedError("PPOTrainer scores whole completions; process (step) rewards are not supported.")
        self._kl_controller = (
            AdaptiveKLController(self.args.beta, self.args.kl_target, self.args.kl_horizon)
            if self.args.kl_target is not None
            else FixedKLController(self.args.beta)
        )
        self._captured_log_probs = None
        self._value_pretraining = ValuePretraining(
            self.args.value_pretrain_steps, self.args.value_pretrain_threshold, self.args.value_pretrain_window
        )
        self._negative_explained_variance_warned_at: int | None = None  # the optimizer step of the last warning
        self._negative_explained_variance_rollouts = 0  # rollouts with a negative one since that warning
        self._setup_critic(value_model if value_model is not None else self.args.value_model, critic_peft_config)
        check_lora_value_model_unsharded(
            self._value_model_is_lora, self.is_fsdp_enabled, deepspeed_plugin.zero_stage if deepspeed_plugin else None
        )
        warn_value_pretraining_under_deepspeed(self.args.value_pretrain_steps, self.is_deepspeed_enabled)
        self._score_normalizer = ScoreNormalizer(self.args.normalize_reward, self.args.reward_clip)
        self._ptx = None
        if ptx_dataset is not None:
            self._ptx = PtxStream(
                ptx_dataset,
                self.processing_class,
                self.args.ptx_batch_size or self.args.per_device_train_batch_size,
                self.accelerator.num_processes,
                self.accelerator.process_index,
                self.args.seed,
                self.args.ptx_max_length,
            )
        if self.use_vllm:  # vLLM generates with the policy: its weight syncs leave the critic out
            send_policy_only(self.vllm_generation, (VALUE_HEAD, VALUE_MODEL), POLICY_ADAPTER)

    # ------------------------------------------------------------------ critic setup
    def _setup_critic(self, value_model, critic_peft_config) -> None:
        """Attach the critic to the trained model and record which parameters belong to the policy and the critic."""
        args = self.args
        model = self.model
        self._is_peft = is_peft_model(model)
        if value_model is None and not self._is_peft:
            value_model = get_config_model_id(model.config)
            logger.warning(
                "The policy is not a PEFT model and no `value_model` was given: the critic is a full model "
                f"initialized from the policy's checkpoint {value_model!r} with a new value head. Pass `peft_config` "
                "for the LoRA critic, which shares the policy's base weights."
            )
        self._uses_lora_critic = value_model is None
        self._policy_param_names = {name for name, param in model.named_parameters() if param.requires_grad}
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            # The same initial critic on every process and in every run; seed + 1 so that the critic adapter does not
            # start as a copy of the policy adapter (PEFT initialized that one right after `set_seed(args.seed)`).
            torch.manual_seed(args.seed + 1)
            if self._uses_lora_critic:
                self._add_lora_critic(model, critic_peft_config, device)
            else:
                value_model = self._load_value_model(value_model)
                if self._is_peft:  # a LoRA policy gets a LoRA critic: its own adapter on the value model's body
                    value_model = lora_value_model.add_lora(value_model, self._critic_lora_config(critic_peft_config))
                else:
                    value_model.requires_grad_(True)
                if args.disable_dropout:
                    disable_dropout_in_model(value_model)
                if args.gradient_checkpointing:
                    value_model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
                setattr(model, VALUE_MODEL, value_model.to(device))

        def is_critic(name: str) -> bool:
            if self._uses_lora_critic:
                return name.startswith(f"{VALUE_HEAD}.") or f".{CRITIC_ADAPTER}." in name
            return name.startswith(f"{VALUE_MODEL}.")

        # Trainable now: the frozen base of a LoRA value model is no critic parameter.
        self._critic_param_names = {
            name for name, param in model.named_parameters() if is_critic(name) and param.requires_grad
        }
        self._restore_trainable()

    def _critic_lora_config(self, critic_peft_config):
        """The critic's LoRA config: `critic_peft_config`, or a copy of the policy adapter's with `critic_lora_r` /
        `critic_lora_alpha` applied."""
        if critic_peft_config is not None:
            return critic_peft_config
        critic_peft_config = copy.deepcopy(self.model.peft_config[POLICY_ADAPTER])
        critic_peft_config.modules_to_save = None  # the critic needs no copy of the policy's extra modules
        if self.args.critic_lora_r is not None:
            critic_peft_config.r = self.args.critic_lora_r
        if self.args.critic_lora_alpha is not None:
            critic_peft_config.lora_alpha = self.args.critic_lora_alpha
        return critic_peft_config

    @property
    def _value_model_is_lora(self) -> bool:
        return not self._uses_lora_critic and self._is_peft

    # FSDP2 replaces every parameter by a sharded one when it prepares the model: look them up by name.
    @property
    def _policy_params(self) -> list[nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [param for name, param in model.named_parameters() if name in self._policy_param_names]

    @property
    def _critic_params(self) -> list[nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [param for name, param in model.named_parameters() if name in self._critic_param_names]

    def _add_lora_critic(self, model, critic_peft_config, device) -> None:
        critic_peft_config = copy.deepcopy(self._critic_lora_config(critic_peft_config))
        critic_peft_config.inference_mode = False
        if critic_peft_config.is_prompt_learning:
            raise ValueError("The critic adapter must be a layer adapter such as LoRA, not a prompt-learning method.")
        model.add_adapter(CRITIC_ADAPTER, critic_peft_config)
        model.set_adapter(POLICY_ADAPTER)
        for name, param in model.named_parameters():
            if f".{CRITIC_ADAPTER}." in name:
                param.requires_grad_(True)
        hidden_size = model.config.get_text_config().hidden_size
        head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(head.bias)
        setattr(model, VALUE_HEAD, head)

    def _load_value_model(self, value_model) -> PreTrainedModel:
        if not isinstance(value_model, str):
            return value_model
        model_init_kwargs = dict(self.args.model_init_kwargs or {})  # the policy's, as TRL's reference model
        model_init_kwargs["device_map"] = None  # moved next to the policy by `_setup_critic`
        model_init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        return create_model_from_path(
            value_model, architecture=AutoModelForTokenClassification, num_labels=1, **model_init_kwargs
        )

    def _restore_trainable(self) -> None:
        """PEFT's `set_adapter` (also run when TRL re-enables adapters after the reference forward) sets
        `requires_grad=False` on inactive adapters; both adapters must stay trainable (the optimizer and autograd read
        the flag)."""
        if self._is_peft:
            for param in (*self._policy_params, *self._critic_params):
                param.requires_grad_(True)

    @contextmanager
    def _critic_active(self, model):
        """Only the critic adapter active (LoRA critic); nothing to switch for a separate value model."""
        if not self._uses_lora_critic:
            yield
            return
        model.set_adapter(CRITIC_ADAPTER)
        self._restore_trainable()
        try:
            yield
        finally:
            model.set_adapter(POLICY_ADAPTER)
            self._restore_trainable()

    def _critic_modules(self, model):
        """The critic's transformer body (returning hidden states) and its scalar head."""
        if self._uses_lora_critic:
            causal_lm = model.get_base_model()
            return getattr(causal_lm, causal_lm.base_model_prefix), getattr(model, VALUE_HEAD)
        value_model = getattr(model, VALUE_MODEL)
        if is_peft_model(value_model):  # its LoRA layers are in place in the wrapped model's modules
            value_model = value_model.get_base_model()
        head = lora_value_model.value_head(value_model)
        if head is None:
            raise ValueError(f"{type(value_model).__name__} has no `score` or `classifier` head to read values from.")
        return getattr(value_model, value_model.base_model_prefix), head

    def _critic_forward(self, model, input_ids, attention_mask, num_completion_tokens: int) -> torch.Tensor:
        """V(s_t) of every completion token, `(B, T)` float32: the head on the hidden state of the position that
        predicts token t (aligned like TRL's log-probs). Call with the critic active."""
        body, head = self._critic_modules(model)
        with self.accelerator.autocast():
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, -num_completion_tokens - 1 : -1]
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()

    def _active_critic_forward(self, model, input_ids, attention_mask, num_completion_tokens: int) -> torch.Tensor:
        """`_critic_forward` with the critic active (also when a checkpoint recomputes it in the backward)."""
        with self._critic_active(model):
            return self._critic_forward(model, input_ids, attention_mask, num_completion_tokens)

    @torch.no_grad()
    def _critic_values(self, batch: dict) -> torch.Tensor:
        """The rollout's values (no gradient), in chunks of `per_device_train_batch_size` rows."""
        model = self.accelerator.unwrap_model(self.model)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        num_completion_tokens = batch["completion_ids"].size(1)
        chunk = self.args.per_device_train_batch_size
        gc_kwargs = self.args.gradient_checkpointing_kwargs
        value_model = getattr(model, VALUE_MODEL, None)
        with (
            disable_gradient_checkpointing(self.model, gc_kwargs),
            disable_gradient_checkpointing(value_model, gc_kwargs) if value_model is not None else nullcontext(),
            self._critic_active(model),
        ):
            forward = partial(self._critic_forward, model, num_completion_tokens=num_completion_tokens)
            values = [
                forward_through_root(self.model_wrapped, model, forward, input_ids[rows], attention_mask[rows])
                for rows in (slice(start, start + chunk) for start in range(0, input_ids.size(0), chunk))
            ]
        return torch.cat(values, dim=0)

    # ------------------------------------------------------------------ optimizer and gradients
    @property
    def _critic_learning_rate(self) -> float:
        args = self.args
        if args.critic_learning_rate is not None:
            return args.critic_learning_rate
        ratio = 1.0 if args.critic_learning_rate_ratio is None else args.critic_learning_rate_ratio
        return args.learning_rate * ratio

    def create_optimizer(self, model=None):
        user_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        critic_lr = self._critic_learning_rate
        if user_optimizer or critic_lr is None or critic_lr == self.args.learning_rate:
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"critic_learning_rate needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        critic_ids = {id(param) for param in self._critic_params}
        critic_groups = []
        for group in optimizer.param_groups:  # same weight-decay split, the critic's parameters in groups of their own
            critic = [param for param in group["params"] if id(param) in critic_ids]
            if critic:
                group["params"] = [param for param in group["params"] if id(param) not in critic_ids]
                critic_groups.append({**group, "params": critic, "lr": critic_lr})
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        for group in critic_groups:
            optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._in_value_pretraining():  # the frozen policy's zero gradients (several processes) are dropped
            for param in self._policy_params:
                param.grad = None
        return loss

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        num_steps = values[-1]  # the run's optimizer steps, known from here on (from the epochs when max_steps <= 0)
        steps_source = (
            f"`max_steps` is {num_steps}"
            if args.max_steps > 0
            else f"`num_train_epochs={args.num_train_epochs}` makes {num_steps} optimizer steps"
        )
        _check_policy_is_trained(args.value_pretrain_steps, num_steps, steps_source)
        return values

    # ------------------------------------------------------------------ rollout: values, token rewards, GAE
    def _in_value_pretraining(self) -> bool:
        return self.model.training and self._value_pretraining.active(self.state.global_step)

    def _end_value_pretraining_at_cap(self) -> None:
        """At `value_pretrain_steps` optimizer steps, end pretraining if the critic never got ready: warn (or raise
        with `value_pretrain_strict`) when a readiness threshold was set. The same decision on every process: it
        rests on the global step and on globally reduced explained variances."""
        schedule = self._value_pretraining
        if not schedule.reach_cap(self.state.global_step):
            return
        self._log_value_pretraining_end()
        if schedule.ready:  # a fixed count (`value_pretrain_threshold=None`)
            return
        mean = schedule.end_explained_variance
        message = (
            f"Value pretraining reached value_pretrain_steps={self.args.value_pretrain_steps} with the critic not "
            f"ready: the explained variance of the last {len(schedule.explained_variances)} rollout(s) averages "
            f"{'n/a' if mean is None else f'{mean:.3f}'}, below value_pretrain_threshold="
            f"{self.args.value_pretrain_threshold}. The policy now trains on advantages from this critic. Raise "
            "value_pretrain_steps or critic_learning_rate(_ratio), or lower value_pretrain_threshold."
        )
        if self.args.value_pretrain_strict:
            raise RuntimeError(message + " (value_pretrain_strict=True)")
        if self.accelerator.is_main_process:
            logger.warning(message)

    def _log_value_pretraining_end(self) -> None:
        schedule = self._value_pretraining
        metrics = self._metrics["train"]
        metrics["value/pretraining_steps"].append(float(schedule.end_step))
        if schedule.end_explained_variance is not None:
            metrics["value/pretraining_explained_variance"].append(schedule.end_explained_variance)
        if schedule.ready and self.args.value_pretrain_threshold is not None and self.accelerator.is_main_process:
            logger.info(
                f"Value pretraining ended after {schedule.end_step} step(s): the critic's explained variance over the "
                f"last {schedule.window} rollouts is {schedule.end_explained_variance:.3f} >= "
                f"{self.args.value_pretrain_threshold}; the policy trains from step {schedule.end_step + 1}."
            )

    def _check_critic_readiness(self, explained_variance: float) -> None:
        """Once per training rollout: feed value pretraining's readiness check, or warn (at most every
        `NEGATIVE_EXPLAINED_VARIANCE_WARNING_EVERY` steps) when the policy trains on a critic worse than none."""
        step = self.state.global_step
        self._end_value_pretraining_at_cap()
        if self._value_pretraining.active(step):
            if self._value_pretraining.record(explained_variance, step):
                self._log_value_pretraining_end()
            return
        if explained_variance >= 0:
            return
        self._negative_explained_variance_rollouts += 1
        last = self._negative_explained_variance_warned_at
        if last is not None and step - last < NEGATIVE_EXPLAINED_VARIANCE_WARNING_EVERY:
            return
        self._negative_explained_variance_warned_at = step
        rollouts, self._negative_explained_variance_rollouts = self._negative_explained_variance_rollouts, 0
        if self.accelerator.is_main_process:
            logger.warning(
                f"Step {step + 1}: the policy trains on a critic whose explained variance is {explained_variance:.3f} "
                f"< 0 ({rollouts} such rollout(s) since the last warning): its values predict the returns worse than "
                "their mean, so the GAE advantages follow the critic's errors (see `value/td_error_std`, "
                "`value/advantage_std`). Consider value pretraining (value_pretrain_steps), a higher "
                "critic_learning_rate(_ratio) or a larger `lam`."
            )

    @property
    def _replaces_trl_advantages(self) -> bool:
        return True  # every round's advantages are GAE's: the parent's round calls `_compute_advantages`

    def _compute_advantages(self, output: dict) -> torch.Tensor:
        """GAE token advantages `(B, T)`, not yet whitened; stores `old_values`, `returns`, `scores`, `scored` too."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        mask = (output["completion_mask"] * output.get("tool_mask", 1)).float()
        global_scores = self._global_rewards()
        if self._score_normalizer.enabled:
            global_scores = self._normalized_scores(global_scores, mode)
        scores = self._local_rows(global_scores, output)
        scored = ~torch.isnan(scores)  # no reward function scored it: no signal, out of every statistic
        value_mask = mask * scored.unsqueeze(1)
        old_values = self._critic_values(output)

        kl = torch.zeros_like(mask)
        ref_log_probs = output.get("ref_per_token_logps")
        if ref_log_probs is not None and (args.kl_in_reward or args.kl_target is not None):
            kl = KL_ESTIMATORS.get(args.kl_estimator)(self._old_log_probs(output), ref_log_probs)
            kl = torch.where(mask.bool(), kl, 0.0)
            if args.kl_in_reward:  # with the KL in the loss, TRL's loss logs `kl`
                self._metrics[mode]["kl"].append(self._global_masked_mean(kl, value_mask))
            output["kl_per_sequence"] = (kl * value_mask).sum(-1)
        reward_beta = self._kl_controller.value if args.kl_in_reward else 0.0
        token_rewards = kl_shaped_token_rewards(torch.nan_to_num(scores), kl, value_mask, reward_beta)

        lengths = value_mask.sum(-1)
        if args.length_adaptive_alpha is None:
            lam_policy = args.lam
        else:
            min_lambda = args.lam if args.length_adaptive_min_lambda is None else args.length_adaptive_min_lambda
            lam_policy = length_adaptive_lambda(lengths, args.length_adaptive_alpha, min_lambda)
        lam_critic = args.lam if args.lam_critic is None else args.lam_critic
        if self._in_value_pretraining():
            lam_critic = 1.0  # value pretraining fits Monte-Carlo returns
        advantages, returns = decoupled_gae(token_rewards, old_values, value_mask, args.gamma, lam_critic, lam_policy)
        # The critic's readiness, logged per rollout: one-step TD errors and each row's policy lambda (popped again
        # once the generation batch is complete).
        output["td_errors"], _ = gae(token_rewards, old_values, value_mask, args.gamma, 0.0)
        output["lambda_policy"] = torch.as_tensor(lam_policy, dtype=torch.float32, device=mask.device).expand(
            mask.size(0)
        )
        output["old_values"] = old_values
        output["returns"] = returns
        output["scores"] = torch.nan_to_num(scores)
        output["scored"] = scored.float()
        return advantages

    def _normalized_scores(self, scores: torch.Tensor, mode: str) -> torch.Tensor:
        """The global batch's sequence scores `(N,)` normalized and clipped (`normalize_reward`, `reward_clip`);
        every process holds the same gathered scores, hence the same running moments."""
        normalized = self._score_normalizer(scores, update=mode == "train")
        metrics = self._metrics[mode]
        if self._score_normalizer.normalize:
            metrics["reward_norm/mean"].append(self._score_normalizer.moments.mean)
            metrics["reward_norm/std"].append(self._score_normalizer.moments.std)
        if self._score_normalizer.clip is not None:
            scored = ~torch.isnan(scores)
            clipped = (normalized.abs() >= self._score_normalizer.clip) & scored
            metrics["reward_norm/clipfrac"].append((clipped.sum() / scored.sum().clamp(min=1)).item())
        return normalized

    def _scored_batch(self, inputs):
        output = super()._scored_batch(inputs)
        args = self.args
        mode = "train" if self.model.training else "eval"
        mask = (output["completion_mask"] * output.get("tool_mask", 1)).float() * output["scored"].unsqueeze(1)
        metrics = self._metrics[mode]
        metrics["value/td_error_std"].append(self._global_masked_std(output.pop("td_errors"), mask))
        metrics["value/advantage_std"].append(self._global_masked_std(output["advantages"], mask))  # before whitening
        lambda_policy = output.pop("lambda_policy")
        metrics["value/lambda_policy"].append(
            self._global_masked_mean(lambda_policy, output["scored"] * (mask.sum(-1) > 0))
        )
        if args.whiten_advantages:
            output["advantages"] = masked_whiten(output["advantages"], mask, self._all_reduce_sum)
            if not (args.dynamic_sampling and mode == "train"):  # dynamic sampling logged each round's own rows
                self._log_advantages(output)
        if args.positive_lm_coef > 0:
            positive = (output["scores"] > args.positive_reward_threshold).float() * output["scored"]
            totals = self._all_reduce_sum(torch.stack([(mask * positive.unsqueeze(1)).sum(), positive.sum()]))
            output["num_positive_tokens"] = totals[0]
            num_rows = self._all_reduce_sum(output["scored"].new_tensor(float(output["scored"].numel())))
            self._metrics[mode]["positive_lm/fraction"].append((totals[1] / num_rows).item())
        explained_variance = self._global_explained_variance(output["old_values"], output["returns"], mask)
        metrics["value/explained_variance"].append(explained_variance)
        if mode == "train":
            self._check_critic_readiness(explained_variance)
        kl_per_sequence = output.pop("kl_per_sequence", None)
        if mode == "train":
            self._metrics[mode]["kl/beta"].append(self._kl_controller.value)
            if kl_per_sequence is not None:
                totals = self._all_reduce_sum(torch.stack([kl_per_sequence.sum(), output["scored"].sum()]))
                mean_kl = (totals[0] / totals[1].clamp(min=1.0)).item()
                self._kl_controller.update(mean_kl, n_steps=int(totals[1].item()))
                if self.beta != 0.0:
                    self.beta = self._kl_controller.value
        return output

    def _global_masked_std(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Population std of `(B, T)` values over the valid tokens of every process."""
        values = torch.where(mask.bool(), values.float(), 0.0)
        weights = mask.float()
        totals = self._all_reduce_sum(torch.stack([values.sum(), (values**2).sum(), weights.sum()]).detach())
        count = totals[2].clamp(min=1.0)
        mean = totals[0] / count
        return (totals[1] / count - mean**2).clamp(min=0.0).sqrt().item()

    def _global_explained_variance(self, values, returns, mask) -> float:
        tensors = [self.accelerator.pad_across_processes(t, dim=1, pad_index=0) for t in (values, returns, mask)]
        values, returns, mask = (self.accelerator.gather(t) for t in tensors)
        return explained_variance(values, returns, mask).item()

    # ------------------------------------------------------------------ loss
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._captured_log_probs is not None:  # the policy forward of `_compute_loss`
            self._captured_log_probs.append(result[0])
        return result

    def _compute_loss(self, model, inputs):
        """policy loss + vf_coef * value loss of this micro-batch, for one backward through both graphs."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._end_value_pretraining_at_cap()  # between two rollouts when a generation batch spans several steps
        self._restore_trainable()
        if self._uses_lora_critic and torch.is_grad_enabled():
            bind_adapters_to_checkpoints(self.accelerator.unwrap_model(model))  # again after every GC enable
        value_loss = self._value_loss(model, inputs, mode)
        if mode == "train" and self._in_value_pretraining():
            # Policy frozen: no policy loss, so its parameters get no gradient and the optimizer skips them.
            self._metrics[mode]["value/pretraining"].append(1.0)
            loss = args.vf_coef * value_loss
            if torch.is_grad_enabled() and self.accelerator.num_processes > 1:
                loss = loss + 0.0 * self._policy_forward_for_reduction(model, inputs)
            return loss
        if mode == "train":
            self._metrics[mode]["value/pretraining"].append(0.0)

        self._captured_log_probs = []
        try:
            loss = super()._compute_loss(model, inputs)
            per_token_logps = self._captured_log_probs[-1]
        finally:
            self._captured_log_probs = None
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        log_ratio = per_token_logps.detach() - old_per_token_logps
        ratio = torch.exp(log_ratio)
        self._metrics[mode]["ppo/approx_kl"].append(self._global_masked_mean((ratio - 1) - log_ratio, mask))
        outside = (ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)
        self._metrics[mode]["ppo/clipfrac"].append(self._global_masked_mean(outside.float(), mask))

        if args.positive_lm_coef > 0:
            positive = (inputs["scores"] > args.positive_reward_threshold).float() * inputs["scored"]
            positive_mask = mask * positive.unsqueeze(1)
            nll_sum = -(per_token_logps * positive_mask).sum()
            nll = nll_sum / self._token_mean_normalizer(inputs["num_positive_tokens"], mode)
            loss = loss + args.positive_lm_coef * nll
            self._metrics[mode]["positive_lm/loss"].append(
                self._global_masked_mean(-per_token_logps.detach(), positive_mask)
            )
        if self._ptx is not None and mode == "train" and torch.is_grad_enabled():
            loss = loss + args.ptx_coef * self._ptx_loss(model)
        return loss + args.vf_coef * value_loss

    def _ptx_loss(self, model) -> torch.Tensor:
        """PPO-ptx: the mean token NLL of this process's next batch of `ptx_dataset` text under the policy (adapter
        "default" active, temperature 1), divided by the accumulation steps as TRL's loss is: over an optimizer step,
        the mean of its micro-batches' NLLs (and DDP averages it over processes). The forward runs on the unwrapped
        model, as the critic's: the policy forward through DDP already armed its one gradient reduction."""
        batch = self._ptx.next_batch(self.accelerator.device)
        with self.accelerator.autocast():
            logits = self.accelerator.unwrap_model(model)(**batch, use_cache=False).logits
        nll_sum, num_tokens = lm_nll_sum(logits, batch["input_ids"], batch["attention_mask"])
        totals = self._all_reduce_sum(torch.stack([nll_sum.detach(), num_tokens.to(nll_sum.dtype)]))
        self._metrics["train"]["ptx/loss"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return nll_sum / num_tokens.clamp(min=1) / self.current_gradient_accumulation_steps

    @staticmethod
    def _policy_forward_for_reduction(model, inputs) -> torch.Tensor:
        """A scalar from a one-token forward of the prepared model with the policy active. Times 0 in the loss, it
        gives every policy parameter an exact zero gradient, and the forward arms DDP's gradient reduction, which
        otherwise only the policy forward does: the critic's gradients are then reduced during value pretraining."""
        output = model(
            input_ids=inputs["prompt_ids"][:, :1],
            attention_mask=inputs["prompt_mask"][:, :1],
            logits_to_keep=1,
            use_cache=False,
        )
        return output.logits.sum()

    def _value_loss(self, model, inputs, mode: str) -> torch.Tensor:
        """The clipped value loss of this micro-batch (token mean over the accumulation window, as the policy's),
        from a critic forward with only the critic active."""
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float() * inputs["scored"].unsqueeze(1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        forward = partial(
            self._active_critic_forward, unwrapped, num_completion_tokens=inputs["completion_ids"].size(1)
        )
        if torch.is_grad_enabled():
            # Policy and critic graphs live until the one backward. The critic keeps only its inputs and is
            # recomputed in the backward, after the policy's graph (created later, so traversed first) is freed: the
            # peak memory stays near GRPO's, for one more critic forward. Checkpointed layers inside it recompute
            # with the critic adapter too (`adapter_checkpointing`).
            forward = partial(activation_checkpoint, forward, use_reentrant=False)
        values = forward_through_root(model, unwrapped, forward, input_ids, attention_mask)
        # The sum over valid tokens (num_tokens = 1), then this micro-batch's share of the global count.
        loss_sum, clipfrac = clipped_value_loss(
            values, inputs["old_values"], inputs["returns"], mask, args.cliprange_value, num_tokens=torch.ones(())
        )
        value_loss = loss_sum / self._token_mean_normalizer(inputs["num_items_in_batch"], mode)
        num_tokens = mask.sum()
        totals = self._all_reduce_sum(torch.stack([loss_sum.detach(), clipfrac * num_tokens, num_tokens]))
        metrics = self._metrics[mode]
        metrics["value/loss"].append((totals[0] / totals[2].clamp(min=1.0)).item())
        metrics["value/clipfrac"].append((totals[1] / totals[2].clamp(min=1.0)).item())
        metrics["value/mean"].append(self._global_masked_mean(values.detach(), mask))
        return value_loss

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir=None, state_dict=None):
        """Save the policy (TRL), then the critic. Under FSDP and DeepSpeed the Trainer passes the full `state_dict`
        it gathered (`save_model`): the critic's tensors are taken from it, since the modules may hold only shards."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        full_state = state_dict
        if not self._is_peft:  # keep the critic out of the policy's weights
            source = model.state_dict() if state_dict is None else state_dict
            state_dict = {k: v for k, v in source.items() if not k.startswith(f"{VALUE_MODEL}.")}
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        critic_name = VALUE_HEAD if self._uses_lora_critic else VALUE_MODEL
        critic_state = None
        if full_state is not None:
            prefix = f"{critic_name}."
            critic_state = {k.removeprefix(prefix): v for k, v in full_state.items() if k.startswith(prefix)}
            if not critic_state:  # ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`: nothing gathered
                return  # (the Trainer saves an empty dict; DeepSpeed's own checkpoint holds the critic)
        if self._uses_lora_critic:  # the adapter itself is in `critic/`, saved by PEFT with every adapter
            head_state = getattr(model, VALUE_HEAD).state_dict() if critic_state is None else critic_state
            os.makedirs(os.path.join(output_dir, CRITIC_ADAPTER), exist_ok=True)
            safetensors.torch.save_file(
                {name: tensor.detach().contiguous().cpu() for name, tensor in head_state.items()},
                os.path.join(output_dir, CRITIC_ADAPTER, VALUE_HEAD_FILE),
            )
        elif self._value_model_is_lora:
            os.makedirs(os.path.join(output_dir, VALUE_MODEL), exist_ok=True)
            lora_value_model.save(getattr(model, VALUE_MODEL), os.path.join(output_dir, VALUE_MODEL))
        else:
            getattr(model, VALUE_MODEL).save_pretrained(os.path.join(output_dir, VALUE_MODEL), state_dict=critic_state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        unwrapped = self.accelerator.unwrap_model(self.model)
        # The critic's files are checked before the Trainer loads any weight, so a bad checkpoint changes nothing.
        saved_critic = None  # the value head's or the LoRA value model's tensors, read and checked here
        if self._uses_lora_critic:
            self._check_critic_adapter(resume_from_checkpoint, unwrapped)
            saved_critic = self._read_value_head(resume_from_checkpoint, getattr(unwrapped, VALUE_HEAD))
        elif self._value_model_is_lora:
            saved_critic = lora_value_model.read_checked(resume_from_checkpoint, VALUE_MODEL, unwrapped.value_model)
        else:
            self._check_value_model_files(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_critic_weights(resume_from_checkpoint, saved_critic)

    def _load_critic_weights(self, checkpoint: str, saved_critic: dict[str, torch.Tensor] | None) -> None:
        """After the Trainer loaded the model's weights: the value head or the LoRA value model (`saved_critic`, read
        and checked beforehand) or the full value model from its own files, into the model's parameters, FSDP2 shards
        or not. Under FSDP2 the Trainer restored the critic adapter from its full model file; otherwise it reloaded the
        `critic/` adapter (frozen, and active: the policy adapter is made active again here). Under DeepSpeed the
        Trainer resumes from the engine's checkpoint instead and does not call `_load_from_checkpoint`."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self._uses_lora_critic:
            load_full_state(unwrapped, {f"{VALUE_HEAD}.{name}": tensor for name, tensor in saved_critic.items()})
            unwrapped.set_adapter(POLICY_ADAPTER)
        elif self._value_model_is_lora:
            lora_value_model.load(getattr(unwrapped, VALUE_MODEL), saved_critic)
        else:
            self._load_saved_value_model(checkpoint, unwrapped)
        self._restore_trainable()

    @staticmethod
    def _check_critic_adapter(checkpoint: str, model) -> None:
        """The Trainer reloads the adapter of every checkpoint subfolder that holds an adapter weights file, and only
        those: without this check, a `critic/` that lost its file would resume with the critic adapter as initialized
        (and the value head restored)."""
        holds = "the critic's LoRA adapter weights"
        saved = read_file(checkpoint, _CRITIC_ADAPTER_FILE, holds, safetensors_shapes)
        expected = get_peft_model_state_dict(model, adapter_name=CRITIC_ADAPTER)
        with reading(checkpoint, _CRITIC_ADAPTER_FILE, holds):
            check_shapes(saved, {name: tuple(tensor.shape) for name, tensor in expected.items()}, allow_extra=True)

    @staticmethod
    def _read_value_head(checkpoint: str, head: nn.Module) -> dict[str, torch.Tensor]:
        holds = "the LoRA critic's value head"
        state = read_file(checkpoint, _VALUE_HEAD_PATH, holds, safetensors.torch.load_file)
        with reading(checkpoint, _VALUE_HEAD_PATH, holds):
            check_shapes(
                {name: tuple(tensor.shape) for name, tensor in state.items()},
                {name: tuple(tensor.shape) for name, tensor in head.state_dict().items()},
            )
        return state

    @staticmethod
    def _check_value_model_files(checkpoint: str) -> None:
        """Every file of the saved value model is there and its safetensors headers read (a truncated file fails)."""
        holds = "the value model, saved by `save_pretrained`"
        require_file(checkpoint, VALUE_MODEL, holds)
        require_file(checkpoint, f"{VALUE_MODEL}/{CONFIG_NAME}", "the value model's config")
        index = f"{VALUE_MODEL}/{SAFE_WEIGHTS_INDEX_NAME}"
        if os.path.exists(os.path.join(checkpoint, index)):
            shards = read_file(
                checkpoint,
                index,
                "the index of the value model's weight shards",
                lambda path: sorted(set(read_json(path)["weight_map"].values())),
            )
        else:
            shards = [SAFE_WEIGHTS_NAME]
        for shard in shards:
            read_file(checkpoint, f"{VALUE_MODEL}/{shard}", "the value model's weights", safetensors_shapes)

    @staticmethod
    def _load_saved_value_model(checkpoint: str, model: nn.Module) -> None:
        """Copy the saved value model's weights into `model.value_model`; every weight must be in the checkpoint
        (`from_pretrained` would initialize a missing one at random, with a warning only)."""
        value_model = getattr(model, VALUE_MODEL)
        with reading(checkpoint, f"{VALUE_MODEL}/", "the value model"):
            saved, loading_info = type(value_model).from_pretrained(
                os.path.join(checkpoint, VALUE_MODEL),
                dtype=next(value_model.parameters()).dtype,
                local_files_only=True,
                output_loading_info=True,
            )
            problems = {key: loading_info[key] for key in ("missing_keys", "mismatched_keys") if loading_info[key]}
            if problems:
                raise ValueError(f"it does not match the value model: {problems}")
            load_full_state(model, {f"{VALUE_MODEL}.{name}": tensor for name, tensor in saved.state_dict().items()})

    def _issue_warnings_after_load(self, load_result):
        if not self._uses_lora_critic:  # the value model is loaded from its own folder
            load_result.missing_keys[:] = [k for k in load_result.missing_keys if not k.startswith(f"{VALUE_MODEL}.")]
        super()._issue_warnings_after_load(load_result)

    @property
    def _ppo_state(self) -> dict:
        """PPO's state besides the weights, by section of `ppo_state.json`: objects with `state_dict` /
        `load_state_dict` (JSON-serializable states). A new section is one more entry."""
        sections = {"kl_controller": self._kl_controller, "value_pretraining": self._value_pretraining}
        if self._score_normalizer.normalize:
            sections["reward_normalizer"] = self._score_normalizer
        if self._ptx is not None:
            sections["ptx"] = self._ptx
        return sections

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint_dir = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(checkpoint_dir, PPO_STATE_FILE), "w") as file:
                json.dump(section_states(self._ppo_state), file)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            sections = self._ppo_state
            read_sections(checkpoint, PPO_STATE_FILE, f"PPO's state: {', '.join(sections)}", read_json, sections)
            if self.beta != 0.0:
                self.beta = self._kl_controller.value
        super()._load_optimizer_and_scheduler(checkpoint)


class VAPOTrainer(PPOTrainer):
    """PPOTrainer with `VAPOConfig` defaults (arXiv 2504.05118)."""

    config_class = VAPOConfig
    _tag_names = ["trl", "trl-plus", "vapo"]
    _name = "VAPO"
