"""vLLM weight sync of the policy only, for trainers that attach a critic to the trained model (PPO, VAPO).

TRL's `VLLMGeneration.sync_weights` walks `model.named_parameters()` of the model it was built with: for a PEFT model
it merges the *active* adapters, skips the LoRA weights and sends every other parameter under the base model's
names. A critic that is an attribute of that model (a value head, a separate value model) would be sent too, and a
critic adapter merged if it were active. `send_policy_only` wraps the sync so that, while it runs, the critic's
modules are out of the model's module tree and only the policy adapter is active; everything is put back after.
"""

from contextlib import contextmanager

from accelerate.utils import is_peft_model
from torch import nn


@contextmanager
def policy_only(model: nn.Module, critic_attributes: tuple[str, ...], policy_adapter: str):
    """While inside: `model` without its `critic_attributes` submodules, with only `policy_adapter` active (PEFT).

    On exit the submodules are back in their places, and the active adapters and every parameter's `requires_grad`
    are as they were (PEFT's `set_adapter` freezes the adapters it deactivates).
    """
    children = dict(model._modules)
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    active = model.active_adapter if is_peft_model(model) else None  # a PeftModel has one active adapter
    for name in critic_attributes:
        model._modules.pop(name, None)
    try:
        if active is not None and active != policy_adapter:
            model.set_adapter(policy_adapter)
        yield model
    finally:
        model._modules.clear()  # every child back, in its order, so that `named_parameters()` is unchanged
        model._modules.update(children)
        if active is not None and model.active_adapter != active:
            model.set_adapter(active)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def send_policy_only(generation, critic_attributes: tuple[str, ...], policy_adapter: str) -> None:
    """Make `generation.sync_weights` (a `trl.generation.vllm_generation.VLLMGeneration`) send only the policy.

    The instance's method is wrapped rather than the trainer's call sites because TRL syncs from three places
    (`_generate_single_turn`, `_generate` with a `rollout_func`, and `VLLMGeneration.generate` itself after sleep
    mode discarded the weights).
    """
    sync_weights = generation.sync_weights

    def sync_policy_weights():
        with policy_only(generation.model, critic_attributes, policy_adapter):
            sync_weights()

    generation.sync_weights = sync_policy_weights
