from .grpo import GRPOConfig, GRPOTrainer
from .ppo import PPOConfig, PPOTrainer, VAPOConfig, VAPOTrainer
from .presets import (
    ASPOConfig,
    ASPOTrainer,
    DAPOConfig,
    DAPOTrainer,
    GSPOConfig,
    GSPOTrainer,
    ReinforcePPConfig,
    ReinforcePPTrainer,
    ReMaxConfig,
    ReMaxTrainer,
    RLOOConfig,
    RLOOTrainer,
)

__all__ = [
    "ASPOConfig",
    "ASPOTrainer",
    "DAPOConfig",
    "DAPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "GSPOConfig",
    "GSPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "RLOOConfig",
    "RLOOTrainer",
    "VAPOConfig",
    "VAPOTrainer",
    "ReMaxConfig",
    "ReMaxTrainer",
    "ReinforcePPConfig",
    "ReinforcePPTrainer",
]
