"""Neural-network backbones, objectives, samplers and the training loop of the learned
harmonizers."""

from __future__ import annotations

from bids_harmony.nn.stages import run_stage
from bids_harmony.nn.training import (
    Monitor,
    TrainingState,
    checkpoint_path,
    fingerprint,
    train,
    train_state,
    warmup_schedule,
)
from bids_harmony.nn.unet import VelocityUNet

__all__ = [
    "Monitor", "TrainingState", "VelocityUNet", "checkpoint_path", "fingerprint", "run_stage",
    "train", "train_state", "warmup_schedule",
]
