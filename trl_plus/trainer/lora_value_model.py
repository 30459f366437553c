"""A separate value model trained with a LoRA adapter of its own: the critic of a LoRA policy initialized from a reward
model (InstructGPT, arXiv 2203.02155: the value function is initialized from the reward model).

The reward model's transformer body gets a LoRA adapter named "critic" (its base weights stay frozen, as the policy's
do) and its scalar head (`score`, or `classifier`) stays fully trainable: the head becomes the value head. Only those
parameters change, so only they are saved, in one safetensors file `value_model/critic.safetensors` of a checkpoint
(not PEFT's `adapter_model.safetensors`: the Trainer would try to load any checkpoint subfolder holding that file as an
adapter of the policy).
"""

import copy

import safetensors.torch
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .checkpoints import check_shapes, read_file, reading, safetensors_shapes

ADAPTER_NAME = "critic"
STATE_FILE = "critic.safetensors"
HEAD_NAMES = ("score", "classifier")


def value_head(model: nn.Module) -> nn.Module | None:
    """The model's scalar head (`score` of a sequence / token classification model, or `classifier`)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is not None:
            return head
    return None


def add_lora(value_model: nn.Module, lora_config) -> PeftModel:
    """`value_model` with a trainable LoRA adapter "critic" on its body and its head trainable, everything else
    frozen. `lora_config` is copied; its `task_type` is cleared (the critic calls the body and head itself, so no
    task wrapper is wanted) and `modules_to_save` too (the head is trained in place, not through a copy)."""
    config = copy.deepcopy(lora_config)
    config.task_type, config.modules_to_save, config.inference_mode = None, None, False
    config.base_model_name_or_path = getattr(value_model, "name_or_path", None)  # not the policy's
    if config.is_prompt_learning:
        raise ValueError("The critic adapter must be a layer adapter such as LoRA, not a prompt-learning method.")
    head = value_head(value_model)
    if head is None:
        raise ValueError(f"{type(value_model).__name__} has no `score` or `classifier` head to read values from.")
    peft_model = get_peft_model(value_model, config, adapter_name=ADAPTER_NAME)
    head.requires_grad_(True)
    return peft_model


def trainable_state(value_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter and head weights, by parameter name: what training changes and a checkpoint saves."""
    return {name: param for name, param in value_model.named_parameters() if param.requires_grad}


def save(value_model: PeftModel, directory: str) -> None:
    safetensors.torch.save_file(
        {name: tensor.detach().contiguous().cpu() for name, tensor in trainable_state(value_model).items()},
        f"{directory}/{STATE_FILE}",
    )


def read_checked(checkpoint: str, folder: str, value_model: PeftModel) -> dict[str, torch.Tensor]:
    """The saved adapter and head weights, after checking that every one of `value_model`'s is there with its shape
    (raises `trl_plus.trainer.checkpoints` errors naming the file otherwise)."""
    name, holds = f"{folder}/{STATE_FILE}", "the value model's LoRA adapter and value head"
    shapes = read_file(checkpoint, name, holds, safetensors_shapes)
    with reading(checkpoint, name, holds):
        check_shapes(shapes, {key: tuple(param.shape) for key, param in trainable_state(value_model).items()})
    return read_file(checkpoint, name, holds, safetensors.torch.load_file)


@torch.no_grad()
def load(value_model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    for name, param in trainable_state(value_model).items():
        param.copy_(state[name])
