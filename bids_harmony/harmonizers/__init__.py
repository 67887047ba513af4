"""Harmonizers behind one contract; importing this package fills the registry (learned
harmonizers are imported on first use)."""

from __future__ import annotations

from pathlib import Path

from bids_harmony.errors import DataError
from bids_harmony.harmonizers import histmatch, nyul, ssimh, whitestripe, zscore  # noqa: F401
from bids_harmony.harmonizers.base import (
    HARMONIZERS,
    Harmonizer,
    Volume,
    read_model_card,
    register,
)

HARMONIZERS.add_lazy("blindharmony", "bids_harmony.harmonizers.blindharmony")
HARMONIZERS.add_lazy("blindharmonydiff", "bids_harmony.harmonizers.blindharmonydiff")

__all__ = ["HARMONIZERS", "Harmonizer", "Volume", "register", "load_harmonizer"]


def load_harmonizer(directory: Path) -> Harmonizer:
    """Load whichever harmonizer ``directory/model_card.json`` names."""
    method = read_model_card(Path(directory))["method"]
    if method not in HARMONIZERS:
        raise DataError(
            f"{directory} holds a '{method}' model, which this version of bids_harmony does "
            f"not know; known: {', '.join(sorted(HARMONIZERS))}"
        )
    return HARMONIZERS[method].load(directory)
