"""Where the learned harmonizers run: the GPU when torch sees one, else the CPU."""

from __future__ import annotations

import torch

from bids_harmony.config import DEVICE_PATTERN
from bids_harmony.errors import UsageError


def validate_device(device: str) -> None:
    """Reject a device string that is neither ``auto``, ``cpu`` nor ``cuda[:N]``."""
    if not DEVICE_PATTERN.match(device):
        raise UsageError(f"device must be auto, cpu or cuda[:N], got {device!r}")


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
