"""`trl_plus.PPOTrainer` (LoRA critic) on 2 processes against 1; `tests/test_ppo.py` launches it and compares runs.

    python check_ppo.py MODEL_DIR OUT_DIR                                        # 1 process, the reference
    torchrun --standalone --nproc_per_node 2 check_ppo.py MODEL_DIR OUT_DIR      # 2 processes, gloo on CPU

The global batch is 12 fixed completions (lengths 1 to 8, one per prompt: `num_generations=1`), returned by a
`rollout_func` instead of generated, with fixed rewards, so both runs see the same data. The policy's LoRA starts
non-zero (`init_lora_weights=False`), so the policy differs from the reference (adapters disabled) and the k1 KL in
the reward is not 0.

1. Rollout, on two layouts of the samples over the processes: TRL's `_generate_and_score_completions` plus the PPO
   hooks give per-sample token advantages (GAE on KL-shaped rewards, whitened over the global batch), returns and old
   values. They are checked against a reference computed here on the full batch in one piece, with no collective:
   the critic's values, the policy's and the reference's log-probs of all 12 samples, then the pure functions
   (`kl_shaped_token_rewards`, `gae`, `masked_whiten` without all-reduce).
2. Training: 2 optimizer steps of `trainer.train()` (one backward of policy + value loss; DDP reduces the gradients
   of the policy adapter, the critic adapter and the value head). Every trainable parameter is saved, so the test can
   check that both processes hold the same weights and that they equal the single-process run's.
3. Gradients: the first optimizer step's gradients (after DDP's reduction, unclipped) of every trainable parameter,
   with and without gradient checkpointing, so the test can check that checkpointed layers recompute with their own
   adapter in the one backward on 2 processes as on 1; and of a value-pretraining step (critic only).

Writes OUT_DIR/rank{R}.json (summary and checks) and OUT_DIR/rank{R}.pt (tensors); exits 1 if a check fails.
"""

import sys
from pathlib import Path

import fixed_batch
import torch
import torch.distributed as dist
from fixed_batch import MAX_COMPLETION_LENGTH, NUM_SAMPLES, REWARDS, check

LAYOUTS = {"in_order": list(range(NUM_SAMPLES)), "rotated_reversed": [11, 10, 9, 8, 3, 2, 1, 0, 7, 6, 5, 4]}
GAMMA, LAM, BETA = 1.0, 0.9, 0.1
ATOL = 1e-5


def build_trainer(model_dir: str, out_dir: Path, world_size: int, samples, max_steps: int = 2, **overrides):
    from peft import LoraConfig

    from trl_plus.trainer.ppo import PPOConfig, PPOTrainer

    args = PPOConfig(
        **{**fixed_batch.config_settings(out_dir, world_size), **overrides},
        num_generations=1,
        learning_rate=1e-2,
        critic_learning_rate=2e-2,
        beta=BETA,
        kl_target=1.0,
        gamma=GAMMA,
        lam=LAM,
        max_steps=max_steps,
        logging_steps=1,
    )
    return PPOTrainer(
        model_dir,
        args=args,
        **fixed_batch.fixed_data(samples),
        peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False),
    )


def reference_rollout(trainer, samples) -> dict[str, torch.Tensor]:
    """Advantages, returns and values of the full batch from the definitions, on this process alone."""
    from trl_plus.algos import KL_ESTIMATORS, masked_whiten
    from trl_plus.algos.value import gae, kl_shaped_token_rewards

    batch = {**samples, "prompt_mask": torch.ones_like(samples["prompt_ids"])}
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    mask = batch["completion_mask"].float()
    model = trainer.model
    with torch.no_grad():
        values = trainer._critic_values(batch)
        log_probs, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, 8)
        with model.disable_adapter():
            ref_log_probs, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, 8)
    kl = KL_ESTIMATORS.get("k1")(log_probs, ref_log_probs) * mask
    token_rewards = kl_shaped_token_rewards(torch.tensor(REWARDS), kl, mask, BETA)
    advantages, returns = gae(token_rewards, values, mask, GAMMA, LAM)
    return {
        "advantages": masked_whiten(advantages, mask),
        "returns": returns,
        "old_values": values * mask,
        "kl_max": kl.abs().max(),
    }


def run_rollout(trainer, layout: list[int], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This process's rows of `layout` through the trainer; per-sample tensors summed over processes."""
    local_size = NUM_SAMPLES // world_size
    local_samples = layout[rank * local_size : (rank + 1) * local_size]
    output = trainer._generate_and_score_completions([{"prompt": f"sample {s}", "sample": s} for s in local_samples])
    result = {}
    for key in ("advantages", "returns", "old_values"):
        full = torch.zeros(NUM_SAMPLES, MAX_COMPLETION_LENGTH)
        width = output[key].size(1)
        full[local_samples, :width] = (output[key] * output["completion_mask"]).detach().float()
        if world_size > 1:
            dist.all_reduce(full)
        result[key] = full
    return result


def capture_gradients_callback():
    from transformers import TrainerCallback

    class CaptureGradients(TrainerCallback):
        """Copies of the model's gradients right before the first optimizer step (after DDP's reduction)."""

        def __init__(self, model, into: dict):
            self.model, self.into = model, into

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not self.into:  # the first step's
                self.into.update({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    return CaptureGradients


def main(model_dir: str, out_dir: str) -> int:
    out_dir = Path(out_dir)
    rank, world_size, samples = fixed_batch.start(model_dir)
    summary = {"rank": rank, "world_size": world_size, "checks": {}}
    tensors = {"rollout": {}, "samples": samples}
    checks = summary["checks"]

    # 1. Rollout: whitening over the global batch, on two layouts.
    trainer = build_trainer(model_dir, out_dir, world_size, samples)
    trainer.model.train()
    summary["num_processes"] = trainer.accelerator.num_processes
    summary["distributed_type"] = str(trainer.accelerator.distributed_type)
    reference = reference_rollout(trainer, samples)
    tensors["reference"] = reference
    initial_kl_controller = trainer._kl_controller.state_dict()
    for layout_name, layout in LAYOUTS.items():
        trainer._kl_controller.load_state_dict(initial_kl_controller)  # a rollout adapts beta: start each from BETA
        result = run_rollout(trainer, layout, rank, world_size)
        tensors["rollout"][layout_name] = result
        for key in ("advantages", "returns", "old_values"):
            check(checks, f"{key}/{layout_name}", result[key], reference[key], ATOL)
    del trainer

    # 2. Training: 2 optimizer steps; every trainable parameter afterwards.
    trainer = build_trainer(model_dir, out_dir, world_size, samples)
    model = trainer.model
    tensors["initial"] = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    tensors["trained"] = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    summary["log_history"] = trainer.state.log_history
    summary["num_critic_params"] = len(trainer._critic_params)
    del trainer

    # 3. The first step's reduced, unclipped gradients, with and without gradient checkpointing.
    # "pretraining": the first step trains only the critic (value pretraining, policy frozen).
    tensors["gradients"] = {}
    runs = {
        "off": {},
        "on": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
        "pretraining": {"max_steps": 2, "value_pretrain_steps": 1, "value_pretrain_threshold": None},
    }
    for run_name, overrides in runs.items():
        trainer = build_trainer(
            model_dir, out_dir, world_size, samples, **{"max_steps": 1, "max_grad_norm": 0.0, **overrides}
        )
        gradients = {}
        trainer.add_callback(capture_gradients_callback()(trainer.model, gradients))
        trainer.train()
        tensors["gradients"][run_name] = gradients
        del trainer

    return fixed_batch.finish(out_dir, rank, summary, tensors)


if __name__ == "__main__":
    fixed_batch.exit_process(main(*sys.argv[1:3]))
