"""trl_plus: modern RL-for-LLM algorithms as drop-in TRL trainers."""

from .trainer import (
    ASPOConfig,
    ASPOTrainer,
    DAPOConfig,
    DAPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    GSPOConfig,
    GSPOTrainer,
    PPOConfig,
    PPOTrainer,
    ReinforcePPConfig,
    ReinforcePPTrainer,
    ReMaxConfig,
    ReMaxTrainer,
    RLOOConfig,
    RLOOTrainer,
    VAPOConfig,
    VAPOTrainer,
)

__version__ = "0.1.0"

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
