"""Running a critic forward, and loading a critic's weights, on a model sharded by FSDP2 or DeepSpeed ZeRO-3.

PPO's critic forward calls the critic's transformer body and value head directly, not the prepared model's forward.
Under FSDP2 (`fully_shard`) the parameters that belong to the root module's own group (embeddings and final norm
unless they are units of their own, the value head, a value model's non-layer weights) are gathered only by the
root's forward hooks; the layers gather their own. `forward_through_root` runs the critic forward *as* the prepared
model's forward (PyTorch Lightning's forward redirection: the forward attribute is swapped for the call), so the
root's pre-forward hook gathers its parameters and its post-forward hook registers the backward hooks that reduce
their gradients, exactly as for the policy forward. DeepSpeed needs no redirection: ZeRO-3 hooks every submodule,
so each gathers its own partitioned parameters when it is called (and ZeRO-2 shards no parameter); its gradient
hooks are on the parameters, whichever forward used them.

`load_full_state` copies full (unsharded) tensors into a model's parameters, plain tensors or FSDP2's `DTensor`
shards (torch.distributed.checkpoint's `set_model_state_dict`, as accelerate's `fsdp2_load_full_state_dict`). Under
DeepSpeed a resume loads DeepSpeed's own engine checkpoint, which holds the critic's partitions with the policy's
(`Trainer` does not call `_load_from_checkpoint` there), so ZeRO-3 partitions are never loaded from full tensors.

`check_fsdp_plugin`, `check_deepspeed_optimizer` and `check_lora_value_model_unsharded` refuse, at construction, the
setups the critic cannot follow; `warn_value_pretraining_under_deepspeed` names what DeepSpeed does differently.
"""

import logging
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

logger = logging.getLogger(__name__)

_NO_FORWARD = object()


def check_fsdp_plugin(fsdp_plugin) -> None:
    """Raise unless an FSDP setup (accelerate's plugin, or None without FSDP) is one the critic follows: FSDP2, whose
    modules `forward_through_root` recognises (FSDP1 wraps them in flat parameters it does not), saving full state
    dicts, from which `PPOTrainer._save` takes the critic's tensors (with sharded ones `Trainer.save_model` does not
    call `_save`, so the critic's files would be missing and a resume would fail)."""
    if fsdp_plugin is None:
        return
    if fsdp_plugin.fsdp_version != 2:
        raise ValueError(
            f"`fsdp_version` is {fsdp_plugin.fsdp_version}; valid: 2 (PPO's critic forward runs through FSDP2's "
            "root module; see examples/accelerate_configs/fsdp2.yaml)."
        )
    if "FULL_STATE_DICT" not in str(fsdp_plugin.state_dict_type):
        raise ValueError(
            f"`fsdp_state_dict_type` is {fsdp_plugin.state_dict_type}; valid: FULL_STATE_DICT (PPO saves its critic "
            "from the full state dict the Trainer gathers)."
        )


def check_deepspeed_optimizer(deepspeed_config: dict | None, critic_learning_rate: float, learning_rate: float):
    """Raise when a DeepSpeed config (None without DeepSpeed) has an `optimizer` section while the critic's learning
    rate differs from the policy's: DeepSpeed then builds its own optimizer over one parameter group, and the critic's
    groups (`PPOTrainer.create_optimizer`, which the Trainer calls only without that section) would be dropped
    silently."""
    if deepspeed_config is None or "optimizer" not in deepspeed_config or critic_learning_rate == learning_rate:
        return
    raise ValueError(
        f"`critic_learning_rate` is {critic_learning_rate} (the policy's: {learning_rate}) and the DeepSpeed config "
        "has an `optimizer` section, which trains every parameter at one learning rate; valid: a DeepSpeed config "
        "without `optimizer` (the Trainer builds the optimizer, with the critic's parameter groups, and DeepSpeed "
        "wraps it), or a critic learning rate equal to `learning_rate`."
    )


def check_lora_value_model_unsharded(value_model_is_lora: bool, fsdp: bool, zero_stage: int | None) -> None:
    """Raise for a LoRA-adapted separate value model (a LoRA policy with `value_model`) whose parameters are sharded
    (FSDP2, ZeRO-3): its adapter and head are saved from the module's own tensors (`lora_value_model.save`), which
    would then hold only this process's shards."""
    if value_model_is_lora and (fsdp or zero_stage == 3):
        setup = "FSDP2" if fsdp else "DeepSpeed ZeRO-3"
        raise NotImplementedError(
            f"A separate `value_model` with a LoRA policy is not supported under {setup} yet (its LoRA adapter would "
            "be saved from this process's shards). Use the LoRA critic on the policy's base (value_model=None), a "
            "full policy with `value_model`, or DeepSpeed ZeRO-2."
        )


def warn_value_pretraining_under_deepspeed(value_pretrain_steps: int, deepspeed: bool) -> None:
    """Under DeepSpeed the engine's optimizer steps every parameter group, so during value pretraining the frozen
    policy's groups get a step with zero gradients (DDP drops their gradients instead): weight decay moves the
    policy's weights, and Adam's step count, hence its bias correction, runs ahead of the policy's real updates."""
    if deepspeed and value_pretrain_steps > 0:
        logger.warning(
            f"value_pretrain_steps={value_pretrain_steps} under DeepSpeed: the optimizer steps the frozen policy's "
            "parameter groups with zero gradients while the critic pretrains, so weight decay moves the policy and "
            "Adam's bias correction starts late for it. Set weight_decay=0 to keep the policy fixed."
        )


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard` turns the module itself into an `FSDPModule`)."""
    return isinstance(model, FSDPModule)


def needs_root_forward(prepared: nn.Module) -> bool:
    """Whether a forward that calls submodules of `prepared` directly must run inside `prepared`'s forward."""
    return is_fsdp2(prepared)


@contextmanager
def _forward_replaced(module: nn.Module, function):
    saved = module.__dict__.get("forward", _NO_FORWARD)  # accelerate may have set an instance forward (autocast)
    module.forward = function
    try:
        yield
    finally:
        if saved is _NO_FORWARD:
            del module.forward
        else:
            module.forward = saved


def forward_through_root(prepared: nn.Module, inner: nn.Module, function, *args):
    """`function(*args)`, run under FSDP2 as the forward of `prepared` (the model accelerate prepared) whose forward
    ends in `inner`'s (the unwrapped model: `prepared` itself under FSDP2), so that `prepared`'s forward hooks gather
    the parameters `function` reads and reduce their gradients. Otherwise (one process, DDP, DeepSpeed) a plain
    call: DDP must see exactly one forward per backward, the policy's."""
    if not needs_root_forward(prepared):
        return function(*args)
    with _forward_replaced(inner, function):
        return prepared(*args)


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (full tensors named as in `model.state_dict()`, a subset of it) into `model`'s parameters and
    buffers, FSDP2-sharded or not. Every process must call it with the same `state` (each reads the checkpoint)."""
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        unknown = set(state) & set(result.unexpected_keys)
        if unknown:
            raise KeyError(f"not parameters of the model: {sorted(unknown)}")
        return
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown}")
    with torch.no_grad():
        for name, tensor in state.items():
            targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))
