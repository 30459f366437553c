"""Presets: configs that only change defaults to a paper's recommended values, and trainers that use them.

Each preset trainer is `GRPOTrainer` with another default config class; any field can still be overridden.
"""

from dataclasses import dataclass, field

from .grpo import GRPOConfig, GRPOTrainer


@dataclass
class DAPOConfig(GRPOConfig):
    """DAPO (arXiv 2503.14476): Clip-Higher (eps_low 0.2, eps_high 0.28), token-level loss, no KL (beta 0), overlong
    filtering (truncated completions masked out of the loss) and dynamic sampling (groups whose rewards are all equal
    are replaced by newly generated ones). The paper also uses overlong reward shaping with L_max = 20480,
    L_cache = 4096 (`overlong_buffer_len`, `overlong_penalty_factor`)."""

    epsilon: float = field(default=0.2, metadata={"help": "Lower clip eps_low; DAPO uses 0.2."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clip eps_high (Clip-Higher); 0.28."})
    loss_type: str = field(default="dapo", metadata={"help": "Token-level loss (DAPO eq. 8)."})
    beta: float = field(default=0.0, metadata={"help": "DAPO removes the KL penalty."})
    mask_truncated_completions: bool = field(
        default=True, metadata={"help": "Overlong filtering: truncated completions are masked out of the loss."}
    )
    dynamic_sampling: bool = field(
        default=True,
        metadata={"help": "Dynamic sampling: only groups whose rewards differ are trained on (DAPO sec. 3.2)."},
    )


@dataclass
class GSPOConfig(GRPOConfig):
    """GSPO (arXiv 2507.18071): sequence-level importance ratio s_i = exp(mean_t log r_{i,t}), clipped with the paper's
    small ranges (3e-4, 4e-4), sequence-mean loss, no KL."""

    importance_sampling_level: str = field(default="sequence", metadata={"help": "Sequence-level ratio (GSPO)."})
    epsilon: float = field(default=3e-4, metadata={"help": "GSPO's lower clip range, 3e-4."})
    epsilon_high: float | None = field(default=4e-4, metadata={"help": "GSPO's upper clip range, 4e-4."})
    loss_type: str = field(default="grpo", metadata={"help": "Sequence-mean aggregation, as in the paper."})
    beta: float = field(default=0.0, metadata={"help": "GSPO uses no KL penalty."})


@dataclass
class ASPOConfig(GRPOConfig):
    """ASPO (arXiv 2510.06062): flipped importance weights for positive-advantage tokens, hard masks, soft dual clip
    (eps 0.2 / 0.2, C_neg = C_pos = 3), token-level loss, no KL.

    ASPO reweights off-policy tokens; on-policy its weights are 1 and it trains as GRPO. So, as in the authors' setup
    (Archer2.0 makes 2 mini-batch updates per rollout), each rollout serves 2 optimizer steps by default:
    steps_per_generation = 2 * gradient_accumulation_steps, unless steps_per_generation or generation_batch_size is
    given."""

    loss_type: str = field(default="aspo", metadata={"help": "ASPO policy loss."})
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches per generation batch. None (default, with generation_batch_size None): "
            "2 * gradient_accumulation_steps, i.e. 2 optimizer steps per rollout, the second one off-policy (what "
            "ASPO's weights act on; Archer2.0 makes 2 mini-batch updates per rollout)."
        },
    )
    epsilon: float = field(default=0.2, metadata={"help": "ASPO eps_low, 0.2."})
    epsilon_high: float | None = field(default=0.2, metadata={"help": "ASPO eps_high, 0.2."})
    beta: float = field(default=0.0, metadata={"help": "No KL penalty."})

    def __post_init__(self):
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = 2 * self.gradient_accumulation_steps
        super().__post_init__()


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO (arXiv 2402.14740): the baseline of each completion is the mean reward of the other G-1 of its group,
    with no std scaling, no KL."""

    advantage_estimator: str = field(default="rloo", metadata={"help": "Exact leave-one-out baseline."})
    scale_rewards: str = field(default="none", metadata={"help": "RLOO does not scale by the std."})
    beta: float = field(default=0.0, metadata={"help": "No KL penalty."})


@dataclass
class ReinforcePPConfig(GRPOConfig):
    """REINFORCE++ (arXiv 2501.03262): k1 KL folded into the token reward (beta 0.01; the paper uses 0.001 for
    math), advantages z-scored over the global batch, PPO clip 0.2, token-level loss. beta > 0 loads a reference
    model (none with PEFT: the adapter is disabled instead)."""

    advantage_estimator: str = field(default="reinforce_pp", metadata={"help": "REINFORCE++ global whitening."})
    beta: float = field(default=0.01, metadata={"help": "KL coefficient in the reward; 0.001 for math."})
    kl_in_reward: bool = field(default=True, metadata={"help": "KL in the token reward, not the loss."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 = logp - logp_ref, as in the paper."})
    loss_type: str = field(default="dapo", metadata={"help": "Token-level PPO-clip loss."})


@dataclass
class ReMaxConfig(GRPOConfig):
    """ReMax (arXiv 2310.10505): per prompt, the greedy decode of the current policy is scored by the same reward
    functions and is the baseline (A_i = r_i - r_greedy); it is decoded in the same `generate` call as the samples,
    as the last completion of each group, and is not trained on. So each prompt gets num_generations - 1 samples. No
    std scaling, no KL."""

    advantage_estimator: str = field(default="remax", metadata={"help": "Greedy-decode baseline."})
    scale_rewards: str = field(default="none", metadata={"help": "ReMax does not scale by the std."})
    beta: float = field(default=0.0, metadata={"help": "No KL penalty."})


class DAPOTrainer(GRPOTrainer):
    """GRPOTrainer with `DAPOConfig` defaults (arXiv 2503.14476)."""

    config_class = DAPOConfig
    _name = "DAPO"


class GSPOTrainer(GRPOTrainer):
    """GRPOTrainer with `GSPOConfig` defaults (arXiv 2507.18071)."""

    config_class = GSPOConfig
    _name = "GSPO"


class ASPOTrainer(GRPOTrainer):
    """GRPOTrainer with `ASPOConfig` defaults (arXiv 2510.06062)."""

    config_class = ASPOConfig
    _name = "ASPO"


class RLOOTrainer(GRPOTrainer):
    """GRPOTrainer with `RLOOConfig` defaults (arXiv 2402.14740)."""

    config_class = RLOOConfig
    _name = "RLOO"


class ReMaxTrainer(GRPOTrainer):
    """GRPOTrainer with `ReMaxConfig` defaults (arXiv 2310.10505)."""

    config_class = ReMaxConfig
    _name = "ReMax"


class ReinforcePPTrainer(GRPOTrainer):
    """GRPOTrainer with `ReinforcePPConfig` defaults (arXiv 2501.03262)."""

    config_class = ReinforcePPConfig
    _name = "REINFORCE++"
