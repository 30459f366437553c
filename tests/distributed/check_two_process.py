"""REINFORCE++ advantages and token_mean gradients of `trl_plus.GRPOTrainer` on 2 processes vs the math on 1.

Run by `tests/test_distributed.py`, twice on the same saved tiny model:

    python check_two_process.py MODEL_DIR OUT_DIR                              # 1 process, the reference
    torchrun --nproc_per_node 2 check_two_process.py MODEL_DIR OUT_DIR         # 2 processes, gloo on CPU

(`accelerate launch --cpu --num_processes 2` would start ONE process; torchrun plus `use_cpu=True` gives two.)

The global batch is 12 fixed completions ("samples") in 3 groups of 4, of lengths 1 to 8 tokens. A `rollout_func`
returns them instead of generating, and a reward function returns each sample's fixed reward, so each trainer runs
TRL's real `_generate_and_score_completions` (prompt padding, reward gathering, process slicing, `num_items_in_batch`)
and trl_plus's hooks on top (estimator, KL in the reward, global whitening), then `_compute_loss` and `backward`.
Each process holds 6 rows, so one group straddles the two processes, and pads its completions to its own longest one.

Each trainer configuration is run on two layouts of the same 12 samples (different group order, rows reversed inside
groups), which put different samples, token counts and padding widths on each process. For each it records, indexed
by sample id so that layouts and process counts compare directly:

- the advantages of every valid token, `(12, 8)`, summed over processes (each sample lives on one process);
- the loss and the gradient of every parameter, averaged over processes as DDP does;

and checks them against a reference computed here from the definitions, on the full batch in one piece and with no
collective: REINFORCE++ token rewards (arXiv 2501.03262 eq. 3-4: r_i - beta * sum_{s>=t} KL_{i,s}, k3 KL), z-scored
over all valid tokens with the population variance (PF-PPO's config: then times each sample's filter weight);
token_mean loss = -sum_{i,t} A_{i,t} * ratio_{i,t} / (valid tokens of the global batch) with
ratio = exp(logp - logp.detach()) = 1 on policy. With 2 processes it also checks `masked_whiten` with a
`dist.all_reduce` sum against whitening the full batch.

Writes OUT_DIR/rank{R}.json (summary, every check with its error) and OUT_DIR/rank{R}.pt (the tensors); exits 1 if a
check fails.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fixed_batch import (
    COMPLETION_LENGTHS,
    MAX_COMPLETION_LENGTH,
    NUM_SAMPLES,
    PROMPT_LENGTH,
    REWARDS,
    check,
    config_settings,
    exit_process,
    finish,
    fixed_data,
    start,
)

# The 12 samples of `fixed_batch` in 3 groups of NUM_GENERATIONS; sample s is in group s // NUM_GENERATIONS.
NUM_GENERATIONS = 4
BETA = 0.1
REF_NOISE = 0.05  # the reference model is the policy plus this much noise, so that KL != 0
# Two orders of the same samples (groups stay contiguous). With 2 processes of 6 rows, "groups_in_order" puts 16
# valid tokens (width 5) on process 0 and 38 (width 8) on process 1; "groups_rotated_rows_reversed" puts 31 and 23.
LAYOUTS = {
    "groups_in_order": list(range(NUM_SAMPLES)),
    "groups_rotated_rows_reversed": [11, 10, 9, 8, 3, 2, 1, 0, 7, 6, 5, 4],
}
# name -> GRPOConfig overrides; and which loss path each must take (None: TRL's own `_compute_loss`).
CONFIGS = {
    "reinforce_pp/dapo": {"advantage_estimator": "reinforce_pp"},
    "reinforce_pp/token_mean": {"advantage_estimator": "reinforce_pp", "loss_aggregation": "token_mean"},
    "reinforce_pp/kl_in_reward": {"advantage_estimator": "reinforce_pp", "beta": BETA, "kl_in_reward": True},
    "reinforce_pp_baseline/token_mean": {
        "advantage_estimator": "reinforce_pp_baseline",
        "loss_aggregation": "token_mean",
    },
    # PF-PPO (arXiv 2409.06957) weights from the rewards of whole groups (one straddles the processes), normalized
    # over the global batch.
    "reinforce_pp/pf_max_random": {
        "advantage_estimator": "reinforce_pp",
        "loss_aggregation": "token_mean",
        "policy_filtration": "max_random",
    },
}
# max_random per group of REWARDS: 0.4 on the group's best (samples 0 and 3 tie at 1.0; 5; 11), 0.1 on the others;
# their mean over the 12 kept samples is 2.4 / 12 = 0.2, so the normalized weights are 2.0 and 0.5.
PF_WEIGHTS = [2.0, 0.5, 0.5, 2.0, 0.5, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0]
EXPECTED_LOSS_PATH = {
    "reinforce_pp/dapo": None,
    "reinforce_pp/token_mean": "ppo_clip",
    "reinforce_pp/kl_in_reward": "ppo_clip",
    "reinforce_pp_baseline/token_mean": "ppo_clip",
    "reinforce_pp/pf_max_random": "ppo_clip",
}
# float32 throughout; observed differences are ~1e-7.
ADVANTAGE_ATOL = 1e-5
GRAD_ATOL = 1e-6  # gradient entries are ~1e-2
GRAD_RTOL = 1e-4


def completion_log_probs(model, samples) -> torch.Tensor:
    """log pi(completion token | prefix) of every sample, `(12, 8)`, from the model's logits (no trainer code)."""
    input_ids = torch.cat([samples["prompt_ids"], samples["completion_ids"]], dim=1)
    attention_mask = torch.cat([torch.ones_like(samples["prompt_ids"]), samples["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, PROMPT_LENGTH - 1 : -1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, samples["completion_ids"].unsqueeze(-1)).squeeze(-1)


def reference_advantages(config_name: str, samples, policy_log_probs, ref_log_probs) -> torch.Tensor:
    """REINFORCE++ token advantages of the full batch, `(12, 8)`, straight from the definitions."""
    mask = samples["completion_mask"].bool()
    rewards = torch.tensor(REWARDS)
    if "baseline" in config_name:  # REINFORCE++-baseline: subtract the group mean first
        group_means = rewards.view(-1, NUM_GENERATIONS).mean(dim=1).repeat_interleave(NUM_GENERATIONS)
        rewards = rewards - group_means
    token_rewards = rewards.unsqueeze(1).expand(-1, MAX_COMPLETION_LENGTH).clone()
    if "kl_in_reward" in config_name:  # r_{i,t} = 1[t = T_i] r_i - beta * KL_{i,t}; return to go with gamma = 1
        log_ratio = ref_log_probs - policy_log_probs
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3
        for i in range(NUM_SAMPLES):
            for t in range(COMPLETION_LENGTHS[i]):
                token_rewards[i, t] -= BETA * kl[i, t : COMPLETION_LENGTHS[i]].sum()
    valid = token_rewards[mask]
    mean, std = valid.mean(), valid.std(unbiased=False)
    advantages = torch.where(mask, (token_rewards - mean) / std, 0.0)
    if "pf_max_random" in config_name:  # policy filtration weighs the whitened advantages of each sample
        advantages = advantages * torch.tensor(PF_WEIGHTS).unsqueeze(1)
    return advantages


def reference_loss_and_grad(model, samples, advantages) -> tuple[float, torch.Tensor]:
    """token_mean of the on-policy PPO-clip loss over the full batch, and its gradient, without trainer code."""
    mask = samples["completion_mask"]
    model.zero_grad(set_to_none=True)
    log_probs = completion_log_probs(model, samples)
    ratio = torch.exp(log_probs - log_probs.detach())  # 1, inside the clip range: the clip never binds
    loss = -(advantages * ratio * mask).sum() / mask.sum()
    loss.backward()
    return loss.item(), flat_grad(model)


def flat_grad(model) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone()
            for p in model.parameters()
        ]
    )


def build_trainer(config_name: str, model_dir: str, out_dir: Path, world_size: int, samples):
    from trl_plus import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**config_settings(out_dir, world_size), num_generations=NUM_GENERATIONS, **CONFIGS[config_name])
    trainer = GRPOTrainer(model_dir, args=args, **fixed_data(samples))
    trainer.model.train()  # "train" mode, as in `trainer.train()`
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by the training loop
    if trainer.beta != 0.0:
        generator = torch.Generator().manual_seed(99)  # same noise on every process
        with torch.no_grad():
            for param in trainer.accelerator.unwrap_model(trainer.ref_model).parameters():
                param.add_(REF_NOISE * torch.randn(param.shape, generator=generator))
    return trainer


def run_layout(trainer, layout: list[int], rank: int, world_size: int) -> dict:
    """One generation + loss + backward on this process's rows of `layout`; results summed/averaged over processes."""
    local_size = NUM_SAMPLES // world_size
    local_samples = layout[rank * local_size : (rank + 1) * local_size]
    inputs = [{"prompt": f"sample {s}", "sample": s} for s in local_samples]
    output = trainer._generate_and_score_completions(inputs)

    # Advantages, by sample id; each sample is on one process, so the sum over processes gathers them.
    local_advantages = output["advantages"]
    width = output["completion_ids"].size(1)
    if local_advantages.dim() == 1:
        local_advantages = local_advantages.unsqueeze(1) * output["completion_mask"]
    advantages = torch.zeros(NUM_SAMPLES, MAX_COMPLETION_LENGTH)
    advantages[local_samples, :width] = local_advantages.detach().float() * output["completion_mask"]
    padding_advantages = (local_advantages * (1 - output["completion_mask"])).abs().max()

    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, output)
    loss.backward()
    grad = flat_grad(trainer.model)
    loss = loss.detach().reshape(1)
    if world_size > 1:  # what DDP does: sum the gradients and divide by the number of processes
        for tensor in (advantages, grad, loss):
            dist.all_reduce(tensor)
        grad /= world_size
        loss /= world_size
    return {
        "advantages": advantages,
        "grad": grad,
        "loss": loss[0],
        "local_width": width,
        "local_samples": local_samples,
        "local_valid_tokens": int(output["completion_mask"].sum()),
        "num_items_in_batch": float(output["num_items_in_batch"]),
        "padding_advantage_max": float(padding_advantages),
    }


def check_masked_whiten_all_reduce(checks: dict, rank: int, world_size: int) -> None:
    """Pure check: `masked_whiten` of each process's rows with a `dist.all_reduce` sum == whitening the full batch."""
    from trl_plus.algos import masked_whiten

    generator = torch.Generator().manual_seed(7)
    values = torch.randn(NUM_SAMPLES, MAX_COMPLETION_LENGTH, generator=generator) * 3 + 2
    mask = (torch.arange(MAX_COMPLETION_LENGTH) < torch.tensor(COMPLETION_LENGTHS).unsqueeze(1)).long()
    expected = masked_whiten(values, mask)
    local_size = NUM_SAMPLES // world_size
    rows = slice(rank * local_size, (rank + 1) * local_size)
    width = int(mask[rows].sum(dim=1).max())  # each process pads to its own longest row

    def all_reduce_sum(tensor):
        dist.all_reduce(tensor)
        return tensor

    local = masked_whiten(values[rows, :width], mask[rows, :width], all_reduce_sum=all_reduce_sum)
    check(checks, "masked_whiten/all_reduce_vs_full", local, expected[rows, :width], atol=1e-6)
    # and the definition: population z-score of the valid values of the whole batch
    valid = values[mask.bool()]
    by_definition = torch.where(mask.bool(), (values - valid.mean()) / valid.std(unbiased=False), 0.0)
    check(checks, "masked_whiten/full_vs_definition", expected, by_definition, atol=1e-5)


def main(model_dir: str, out_dir: str) -> int:
    out_dir = Path(out_dir)
    rank, world_size, samples = start(model_dir)
    summary = {"rank": rank, "world_size": world_size, "configs": {}, "checks": {}}
    tensors = {"samples": samples, "results": {}, "reference": {}}
    checks = summary["checks"]
    for config_name in CONFIGS:
        trainer = build_trainer(config_name, model_dir, out_dir, world_size, samples)
        accelerator = trainer.accelerator
        summary["num_processes"] = accelerator.num_processes
        summary["process_index"] = accelerator.process_index
        summary["distributed_type"] = str(accelerator.distributed_type)
        summary["backend"] = dist.get_backend() if dist.is_initialized() else None
        if accelerator.num_processes != world_size or accelerator.process_index != rank:
            raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes, torchrun started {world_size}")
        summary["configs"][config_name] = {"registry_policy_loss": trainer.args.registry_policy_loss}

        # The reference, on the full batch in one piece, from the same weights.
        model = trainer.model
        with torch.no_grad():
            policy_log_probs = completion_log_probs(model, samples)
            ref_model = accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else model
            ref_log_probs = completion_log_probs(ref_model, samples)
        expected_advantages = reference_advantages(config_name, samples, policy_log_probs, ref_log_probs)
        expected_loss, expected_grad = reference_loss_and_grad(model, samples, expected_advantages)
        tensors["reference"][config_name] = {
            "advantages": expected_advantages,
            "grad": expected_grad,
            "loss": expected_loss,
            "kl_max": (torch.exp(ref_log_probs - policy_log_probs) - (ref_log_probs - policy_log_probs) - 1)
            .masked_fill(samples["completion_mask"] == 0, 0.0)
            .max()
            .item(),
        }

        tensors["results"][config_name] = {}
        for layout_name, layout in LAYOUTS.items():
            result = run_layout(trainer, layout, rank, world_size)
            tensors["results"][config_name][layout_name] = result
            key = f"{config_name}/{layout_name}"
            check(checks, f"advantages/{key}", result["advantages"], expected_advantages, ADVANTAGE_ATOL)
            check(checks, f"grad/{key}", result["grad"], expected_grad, GRAD_ATOL, GRAD_RTOL)
            check(checks, f"loss/{key}", result["loss"], torch.tensor(expected_loss), 1e-6)
            num_tokens = torch.tensor(float(sum(COMPLETION_LENGTHS)))  # 54: TRL's count over all processes
            check(checks, f"num_items_in_batch/{key}", torch.tensor(result["num_items_in_batch"]), num_tokens, 0)
            padding = torch.tensor(result["padding_advantage_max"])  # advantages are 0 on padding
            check(checks, f"padding_advantages/{key}", padding, torch.tensor(0.0), 0)
        del trainer

    if world_size > 1:
        check_masked_whiten_all_reduce(checks, rank, world_size)

    return finish(out_dir, rank, summary, tensors)


if __name__ == "__main__":
    exit_process(main(*sys.argv[1:3]))
