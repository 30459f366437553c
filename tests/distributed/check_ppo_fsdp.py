"""`trl_plus.PPOTrainer`'s critic under FSDP2 on 2 processes against 1 unsharded; `tests/test_ppo_sharded.py` runs it.

    python check_ppo_fsdp.py MODEL_DIR OUT_DIR                                    # 1 process, unsharded: the reference
    torchrun --standalone --nproc_per_node 2 check_ppo_fsdp.py MODEL_DIR OUT_DIR  # 2 processes, FSDP2, gloo on CPU

accelerate enables FSDP only for GPU distributed types (MULTI_CPU gets DDP), so the trainer is built as on CPU and
its model is then sharded here by accelerate's own `fsdp2_prepare_model` with an FSDP2 plugin (transformer-layer
auto wrap, embeddings and tail carved out, the root last), which is what `Accelerator.prepare` runs under FSDP2.
Every parameter is then a `DTensor` shard; the root's group holds the value head (LoRA critic) or the value model's
embeddings, final norm and `score` head (separate critic), gathered only by the root's forward hooks.

For each critic (`lora`: the critic adapter and `value_head` on the policy's PEFT model; `value_model`: a full policy
with a separate `Qwen2ForTokenClassification`) and gradient checkpointing off and on:
1. one rollout of this process's half of the fixed batch (`_generate_and_score_completions`: the critic's old values
   through the root's forward), one `compute_loss` (policy + vf_coef * value loss) and one backward, whose reduced
   gradients of every trainable parameter are saved (full tensors), then one SGD step of the trainer's own optimizer
   (the critic in its own parameter groups, at `critic_learning_rate`), whose updated weights are saved;
2. (gradient checkpointing off) a save of the trained critic through `PPOTrainer._save` with the full state dict
   that `Trainer.save_model` gathers under FSDP2 (`accelerator.get_state_dict`: torch's `get_model_state_dict`,
   full, on CPU): the critic's weights read back from its files are saved; and a load of them into a fresh sharded
   trainer through the critic part of `_load_from_checkpoint` (file checks, then `_load_critic_weights`): the fresh
   critic's weights are saved.

Writes OUT_DIR/rank{R}.json and OUT_DIR/rank{R}.pt; exits 1 if a check fails.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import fixed_batch
import torch
import torch.distributed as dist
from fixed_batch import MAX_COMPLETION_LENGTH, NUM_SAMPLES
from transformers.modeling_layers import GradientCheckpointingLayer

CRITICS = ("lora", "value_model")


def build_trainer(model_dir: str, out_dir: Path, world_size: int, samples, critic: str, gradient_checkpointing: bool):
    from peft import LoraConfig

    from trl_plus.trainer.ppo import PPOConfig, PPOTrainer

    settings = fixed_batch.config_settings(out_dir, world_size)
    settings["gradient_checkpointing"] = gradient_checkpointing
    args = PPOConfig(
        **settings,
        num_generations=1,
        optim="sgd",
        learning_rate=0.5,
        critic_learning_rate=1.0,
        beta=0.1,
        max_steps=1,
        max_grad_norm=0.0,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **({"value_model": model_dir} if critic == "value_model" else {}),
    )
    peft_config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    return PPOTrainer(
        model_dir, args=args, **fixed_batch.fixed_data(samples), peft_config=peft_config if critic == "lora" else None
    )


def shard(trainer) -> None:
    """Shard `trainer.model` in place as `Accelerator.prepare` does under FSDP2 (accelerate's function itself)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=dist.get_rank() == 0
    )
    model = fsdp2_prepare_model(accelerator, trainer.model)
    assert model is trainer.model and isinstance(model, FSDPModule)
    trainer.model_wrapped = model


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), or the tensor itself."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def full_state(model) -> dict[str, torch.Tensor]:
    """What `Trainer.save_model` passes to `_save` under FSDP2: accelerate's `get_state_dict` for FSDP2."""
    if world_size_of() == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def world_size_of() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def critic_names(trainer) -> list[str]:
    return sorted(trainer._critic_param_names)


def train_one_step(trainer, rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    local_size = NUM_SAMPLES // world_size
    local = range(rank * local_size, (rank + 1) * local_size)
    model = trainer.model
    model.train()
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()  # after the model is prepared, before any forward, as the Trainer does
    inputs = trainer._generate_and_score_completions([{"prompt": f"sample {s}", "sample": s} for s in local])
    old_values = torch.zeros(NUM_SAMPLES, MAX_COMPLETION_LENGTH)
    old_values[list(local), : inputs["old_values"].size(1)] = (
        inputs["old_values"] * inputs["completion_mask"]
    ).detach()
    if world_size > 1:
        dist.all_reduce(old_values)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop
    loss = trainer.compute_loss(trainer.model_wrapped, inputs)
    loss.backward()
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    initial = {name: full(param) for name, param in trainable}
    gradients = {name: full(param.grad) for name, param in trainable}
    optimizer.step()
    updated = {name: full(param) for name, param in trainable}
    return {"initial": initial, "gradients": gradients, "updated": updated, "old_values": {"all": old_values}}


def saved_critic(checkpoint: Path, critic: str) -> dict[str, torch.Tensor]:
    """The critic's weights in the files `_save` wrote, under the model's parameter names."""
    from safetensors.torch import load_file

    if critic == "value_model":
        return {f"value_model.{k}": v for k, v in load_file(checkpoint / "value_model" / "model.safetensors").items()}
    weights = {f"value_head.{k}": v for k, v in load_file(checkpoint / "critic" / "value_head.safetensors").items()}
    adapter = load_file(checkpoint / "critic" / "adapter_model.safetensors")  # PEFT drops the adapter's name
    weights.update({k.replace(".weight", ".critic.weight"): v for k, v in adapter.items()})
    return weights


def save_and_reload(trainer, model_dir, out_dir, world_size, samples, critic) -> dict[str, torch.Tensor]:
    """The trained critic through `_save` and the critic part of `_load_from_checkpoint` into a fresh trainer."""
    checkpoint = out_dir / f"checkpoint-{critic}"
    trainer._save(str(checkpoint), state_dict=full_state(trainer.model))
    if world_size > 1:
        dist.barrier()  # rank 0 wrote the files
    fresh = build_trainer(model_dir, out_dir, world_size, samples, critic, gradient_checkpointing=False)
    if world_size > 1:
        shard(fresh)
    unwrapped = fresh.accelerator.unwrap_model(fresh.model)
    head_state = None
    if fresh._uses_lora_critic:
        fresh._check_critic_adapter(str(checkpoint), unwrapped)
        head_state = fresh._read_value_head(str(checkpoint), unwrapped.value_head)
    else:
        fresh._check_value_model_files(str(checkpoint))
    fresh._load_critic_weights(str(checkpoint), head_state)
    params = dict(fresh.model.named_parameters())
    names = critic_names(fresh)
    # The critic adapter's weights are restored by the Trainer (under FSDP2 from its full model file), not by PPO.
    restored = {name: full(params[name]) for name in names if ".critic." not in name}
    restored.update({f"requires_grad/{name}": torch.tensor(params[name].requires_grad) for name in names})
    return {"loaded": restored, "saved_files": saved_critic(checkpoint, critic)}


def main(model_dir: str, out_dir: str) -> int:
    out_dir = Path(out_dir)
    rank, world_size, samples = fixed_batch.start(model_dir)
    summary = {"rank": rank, "world_size": world_size, "checks": {}, "sharded": {}, "gradient_checkpointing": {}}
    tensors = {}
    for critic in CRITICS:
        for gradient_checkpointing in (False, True):
            run = f"{critic}/gc_{'on' if gradient_checkpointing else 'off'}"
            trainer = build_trainer(model_dir, out_dir, world_size, samples, critic, gradient_checkpointing)
            summary["distributed_type"] = str(trainer.accelerator.distributed_type)
            if gradient_checkpointing:  # as `Trainer.train` does, before it prepares the model
                trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if world_size > 1:
                shard(trainer)
            summary["sharded"][run] = {
                name: type(param).__name__ for name, param in trainer.model.named_parameters() if param.requires_grad
            }
            layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
            flags = {layer.gradient_checkpointing for layer in layers}
            summary["gradient_checkpointing"][run] = flags.pop() if len(flags) == 1 else sorted(flags)
            tensors[run] = train_one_step(trainer, rank, world_size)
            if not gradient_checkpointing:
                tensors[f"{critic}/restored"] = save_and_reload(
                    trainer, model_dir, out_dir, world_size, samples, critic
                )
            del trainer
    return fixed_batch.finish(out_dir, rank, summary, tensors)


if __name__ == "__main__":
    fixed_batch.exit_process(main(*sys.argv[1:3]))
