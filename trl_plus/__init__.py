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
    ReinforcePPConfig,
    ReinforcePPTrainer,
    ReMaxConfig,
    ReMaxTrainer,
    RLOOConfig,
    RLOOTrainer,
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
    "RLOOConfig",
    "RLOOTrainer",
    "ReMaxConfig",
    "ReMaxTrainer",
    "ReinforcePPConfig",
    "ReinforcePPTrainer",
]
