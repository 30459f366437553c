"""The algorithms that `trl-plus <algorithm>`, `trl-plus demo --algo` and `examples/<algorithm>.py` train with.

`ALGORITHMS` is the one table they all read: adding an algorithm to the command line, the examples' shared script,
the demo and the tests is one `Algorithm(...)` row (plus its `examples/<name>.py`).

A trainer in the table is called like `trl.GRPOTrainer`: `trainer_class(model=..., reward_funcs=..., args=...,
train_dataset=..., eval_dataset=..., quantization_config=..., peft_config=...)`, with `args` an instance of
`config_class` (see `trl_plus.scripts.train.main`).

>>> ALGORITHMS["dapo"].config_class.__name__
'DAPOConfig'
"""

from dataclasses import dataclass

import trl_plus


@dataclass(frozen=True)
class Algorithm:
    """One row of the table: what `trl-plus <name>` trains with and how `trl-plus --help` describes it."""

    name: str
    config_class: type
    trainer_class: type
    description: str  # one line
    paper: str  # URL
    default_reward_funcs: tuple[str, ...] = ("answer_match_reward",)  # when --reward_funcs is not given


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm(
            "grpo",
            trl_plus.GRPOConfig,
            trl_plus.GRPOTrainer,
            "GRPO: TRL's trainer plus every trl_plus option (estimators, losses, KL, dynamic sampling)",
            "https://arxiv.org/abs/2402.03300",
        ),
        Algorithm(
            "dapo",
            trl_plus.DAPOConfig,
            trl_plus.DAPOTrainer,
            "DAPO: Clip-Higher, dynamic sampling, token-level loss, no KL, overlong filtering",
            "https://arxiv.org/abs/2503.14476",
        ),
        Algorithm(
            "gspo",
            trl_plus.GSPOConfig,
            trl_plus.GSPOTrainer,
            "GSPO: sequence-level importance ratio with small clip ranges",
            "https://arxiv.org/abs/2507.18071",
        ),
        Algorithm(
            "aspo",
            trl_plus.ASPOConfig,
            trl_plus.ASPOTrainer,
            "ASPO: flipped importance weights for positive-advantage tokens, soft dual clip",
            "https://arxiv.org/abs/2510.06062",
        ),
        Algorithm(
            "rloo",
            trl_plus.RLOOConfig,
            trl_plus.RLOOTrainer,
            "RLOO: exact leave-one-out baseline, no std scaling",
            "https://arxiv.org/abs/2402.14740",
        ),
        Algorithm(
            "reinforce_pp",
            trl_plus.ReinforcePPConfig,
            trl_plus.ReinforcePPTrainer,
            "REINFORCE++: k1 KL in the token reward, advantages whitened over the global batch",
            "https://arxiv.org/abs/2501.03262",
        ),
        Algorithm(
            "remax",
            trl_plus.ReMaxConfig,
            trl_plus.ReMaxTrainer,
            "ReMax: the greedy decode of each prompt is the baseline (decoded in the same generate call)",
            "https://arxiv.org/abs/2310.10505",
        ),
        Algorithm(
            "ppo",
            trl_plus.PPOConfig,
            trl_plus.PPOTrainer,
            "PPO with a critic: GAE on KL-shaped token rewards, clipped value loss, LoRA critic on the policy's base",
            "https://arxiv.org/abs/1707.06347",
        ),
        Algorithm(
            "vapo",
            trl_plus.VAPOConfig,
            trl_plus.VAPOTrainer,
            "VAPO: PPO with value pretraining, decoupled length-adaptive GAE, positive-example LM loss",
            "https://arxiv.org/abs/2504.05118",
        ),
        Algorithm(
            "ttrl",
            trl_plus.GRPOConfig,
            trl_plus.GRPOTrainer,
            "TTRL: GRPO on unlabeled prompts, rewarded by agreement with the group's majority answer",
            "https://arxiv.org/abs/2504.16084",
            default_reward_funcs=("majority_vote_reward",),
        ),
    )
}
