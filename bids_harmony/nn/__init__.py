"""Neural-network backbones, objectives, samplers and the training loop of the learned
harmonizers."""

from __future__ import annotations

from bids_harmony.nn.stages import run_stage
from bids_harmony.nn.training import TrainingState, checkpoint_path, fingerprint, train, train_state
from bids_harmony.nn.unet import VelocityUNet

__all__ = [
    "TrainingState", "VelocityUNet", "checkpoint_path", "fingerprint", "run_stage", "train",
    "train_state",
]
