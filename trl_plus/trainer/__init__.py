from .grpo import GRPOConfig, GRPOTrainer
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
    "RLOOConfig",
    "RLOOTrainer",
    "ReMaxConfig",
    "ReMaxTrainer",
    "ReinforcePPConfig",
    "ReinforcePPTrainer",
]
