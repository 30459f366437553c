"""Gradient checkpointing that recomputes each layer with the LoRA adapter that was active in its forward.

PPO's LoRA critic and its policy are two adapters on one base model: the critic forward runs with adapter "critic"
active and the policy forward with "default", and one backward then goes through both graphs. Gradient checkpointing
re-runs each checkpointed layer's forward during that backward, and a PEFT layer reads whichever adapter is active at
that moment, so without help the critic's layers would be recomputed with the policy adapter (wrong activations,
wrong gradients, no error). `bind_adapters_to_checkpoints` wraps the checkpoint function of every checkpointed
transformers layer (`GradientCheckpointingLayer._gradient_checkpointing_func`, set by `gradient_checkpointing_enable`)
so that the function it checkpoints records the layer's active adapters when it runs in the forward and re-activates
them, on that layer's PEFT modules only, when the backward runs it again. It works with `use_reentrant=True` and
`False` alike: the recorded adapters travel with the checkpointed function, not with torch's checkpoint internals.
"""

from functools import partial

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class _AdapterBoundCheckpoint:
    """A layer's checkpoint function whose checkpointed call runs with the adapters active when it was first made."""

    def __init__(self, checkpoint, tuner_layers: list[BaseTunerLayer]):
        self.checkpoint = checkpoint  # transformers' partial(torch.utils.checkpoint.checkpoint, **kwargs)
        self.tuner_layers = tuner_layers

    def __call__(self, function, *args, **kwargs):
        adapters = [list(layer.active_adapters) for layer in self.tuner_layers]
        return self.checkpoint(partial(self._run_with, adapters, function), *args, **kwargs)

    def _run_with(self, adapters: list[list[str]], function, *args, **kwargs):
        """`function` with each tuner layer's adapters set to `adapters` (a no-op in the forward, where they already
        are); the adapters active before are put back afterwards."""
        previous = [list(layer.active_adapters) for layer in self.tuner_layers]
        _activate(self.tuner_layers, adapters)
        try:
            return function(*args, **kwargs)
        finally:
            _activate(self.tuner_layers, previous)


def _activate(tuner_layers: list[BaseTunerLayer], adapters: list[list[str]]) -> None:
    """Make `adapters[i]` the active adapters of `tuner_layers[i]`, leaving every `requires_grad` as it was (PEFT's
    `set_adapter` freezes the inactive adapters; the trainer keeps both adapters trainable)."""
    for layer, names in zip(tuner_layers, adapters, strict=True):
        if list(layer.active_adapters) == names:
            continue
        flags = [(param, param.requires_grad) for param in layer.parameters()]
        layer.set_adapter(names)
        for param, flag in flags:
            param.requires_grad_(flag)


def bind_adapters_to_checkpoints(model: nn.Module) -> int:
    """Wrap the checkpoint function of every checkpointed layer of `model` that holds PEFT layers (idempotent: call
    it again after `gradient_checkpointing_enable`, which sets new functions). Returns the number of layers bound."""
    bound = 0
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if (
            not isinstance(module, GradientCheckpointingLayer)
            or not module.gradient_checkpointing
            or checkpoint is None
        ):
            continue
        if isinstance(checkpoint, _AdapterBoundCheckpoint):
            bound += 1
            continue
        tuner_layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
        if tuner_layers:
            module._gradient_checkpointing_func = _AdapterBoundCheckpoint(checkpoint, tuner_layers)
            bound += 1
    return bound
