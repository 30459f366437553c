"""`trl_plus.PPOTrainer`'s critic on a DeepSpeed ZeRO-2 / ZeRO-3 engine on 2 CPU processes; `tests/test_ppo_sharded.py`
compares it with `check_ppo_fsdp.py`'s single-process unsharded run.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 check_ppo_deepspeed.py MODEL_DIR OUT_DIR

accelerate turns DeepSpeed on only off CPU (`use_cpu=True` keeps MULTI_CPU, and without it accelerate's state on a
machine without GPUs does not see the process group), so the trainer is built as on CPU and its model and optimizer
are handed to `deepspeed.initialize` here, which is what `Accelerator.prepare` does under DeepSpeed; the engine
becomes `trainer.model_wrapped`, as in the Trainer. DeepSpeed's CPU accelerator runs the collectives over gloo.

For each ZeRO stage (2, 3) and critic (`lora`, `value_model`), gradient checkpointing off (and on, stage 3):
1. one rollout of this process's half of the fixed batch, `compute_loss`, `engine.backward` and `engine.step()`; the
   old values, the reduced full gradients (`safe_get_full_grad`) and the updated fp32 weights
   (`safe_get_full_fp32_param`) of every trainable parameter are saved;
2. (gradient checkpointing off) `PPOTrainer._save` with the state dict `Trainer.save_model` gathers under DeepSpeed
   (ZeRO-3: the engine's consolidated one, frozen weights excluded for PEFT; ZeRO-2: the module's): the critic's
   weights read back from the files it wrote are saved; and DeepSpeed's own checkpoint, which is what a Trainer
   resume loads under DeepSpeed (`engine.save_checkpoint` / `load_checkpoint`), loaded into a fresh engine: its
   critic's weights are saved.

Writes OUT_DIR/rank{R}.json and OUT_DIR/rank{R}.pt.
"""

import sys
from pathlib import Path

import check_ppo_fsdp
import fixed_batch
import torch
import torch.distributed as dist
from fixed_batch import MAX_COMPLETION_LENGTH, NUM_SAMPLES
from transformers.modeling_layers import GradientCheckpointingLayer

RUNS = [(2, "lora", False), (2, "value_model", False), (3, "lora", False), (3, "value_model", False)]
RUNS += [(3, "lora", True), (3, "value_model", True)]


def build_engine(model_dir, out_dir, world_size, samples, stage: int, critic: str, gradient_checkpointing: bool):
    import deepspeed

    trainer = check_ppo_fsdp.build_trainer(model_dir, out_dir, world_size, samples, critic, gradient_checkpointing)
    if gradient_checkpointing:  # as `Trainer.train` does, before it prepares the model
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    config = {
        "train_micro_batch_size_per_gpu": NUM_SAMPLES // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,  # the trainer's own SGD, with the critic's parameter groups
    }
    engine, _, _, _ = deepspeed.initialize(model=trainer.model, optimizer=trainer.create_optimizer(), config=config)
    trainer.model_wrapped = trainer.deepspeed = engine
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop
    return trainer, engine


def critic_weights(trainer, engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    return {
        name: safe_get_full_fp32_param(params[name]).detach().clone() for name in sorted(trainer._critic_param_names)
    }


def train_one_step(trainer, engine, rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    local = range(rank * (NUM_SAMPLES // world_size), (rank + 1) * (NUM_SAMPLES // world_size))
    inputs = trainer._generate_and_score_completions([{"prompt": f"sample {s}", "sample": s} for s in local])
    old_values = torch.zeros(NUM_SAMPLES, MAX_COMPLETION_LENGTH)
    width = inputs["old_values"].size(1)
    old_values[list(local), :width] = (inputs["old_values"] * inputs["completion_mask"]).detach()
    dist.all_reduce(old_values)
    engine.backward(trainer.compute_loss(engine, inputs))
    trainable = [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]
    gradients = {name: safe_get_full_grad(param).detach().clone() for name, param in trainable}
    engine.step()
    updated = {name: safe_get_full_fp32_param(param).detach().clone() for name, param in trainable}
    return {"gradients": gradients, "updated": updated, "old_values": {"all": old_values}}


def gathered_state_dict(trainer, engine, stage: int) -> dict[str, torch.Tensor]:
    """What `Trainer.save_model` passes to `_save` under DeepSpeed."""
    if stage == 3:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainer._is_peft)
    return engine.module.state_dict()


def save_and_resume(trainer, engine, model_dir, out_dir, world_size, samples, stage, critic) -> dict:
    """`_save` from the gathered state dict, and DeepSpeed's own checkpoint (what a Trainer resume loads under
    DeepSpeed: `_load_from_checkpoint` is not called there) into a fresh engine."""
    checkpoint = out_dir / f"checkpoint-zero{stage}-{critic}"
    trainer._save(str(checkpoint), state_dict=gathered_state_dict(trainer, engine, stage))
    engine.save_checkpoint(str(checkpoint / "deepspeed"))
    dist.barrier()
    fresh, fresh_engine = build_engine(model_dir, out_dir, world_size, samples, stage, critic, False)
    fresh_engine.load_checkpoint(str(checkpoint / "deepspeed"), load_module_strict=not fresh._is_peft)
    saved = check_ppo_fsdp.saved_critic(checkpoint, critic)
    return {"saved_files": saved, "engine_checkpoint": critic_weights(fresh, fresh_engine)}


def main(model_dir: str, out_dir: str) -> int:
    out_dir = Path(out_dir)
    rank, world_size, samples = fixed_batch.start(model_dir)
    summary = {"rank": rank, "world_size": world_size, "checks": {}, "engines": {}}
    tensors = {}
    for stage, critic, gradient_checkpointing in RUNS:
        run = f"zero{stage}/{critic}/gc_{'on' if gradient_checkpointing else 'off'}"
        trainer, engine = build_engine(model_dir, out_dir, world_size, samples, stage, critic, gradient_checkpointing)
        layers = [m for m in engine.module.modules() if isinstance(m, GradientCheckpointingLayer)]
        summary["engines"][run] = {
            "engine": type(engine).__name__,
            "stage": engine.zero_optimization_stage(),
            "gradient_checkpointing": sorted({layer.gradient_checkpointing for layer in layers}),
            "partitioned": sorted({hasattr(param, "ds_id") for param in engine.module.parameters()}),
        }
        tensors[run] = train_one_step(trainer, engine, rank, world_size)
        if not gradient_checkpointing:
            restored = save_and_resume(trainer, engine, model_dir, out_dir, world_size, samples, stage, critic)
            tensors[f"zero{stage}/{critic}/restored"] = restored
        del trainer, engine
    return fixed_batch.finish(out_dir, rank, summary, tensors)


if __name__ == "__main__":
    fixed_batch.exit_process(main(*sys.argv[1:3]))
