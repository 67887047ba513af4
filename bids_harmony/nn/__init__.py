"""Neural-network backbones shared by the learned harmonizers."""

from __future__ import annotations

from bids_harmony.nn.training import checkpoint_path, fingerprint, train
from bids_harmony.nn.unet import VelocityUNet

__all__ = ["VelocityUNet", "checkpoint_path", "fingerprint", "train"]
