"""Harmonizers behind one contract; importing this package fills the registry."""

from bids_harmony.harmonizers.base import HARMONIZERS, Harmonizer, Volume, register

from bids_harmony.harmonizers import histmatch, nyul, ssimh, whitestripe, zscore  # noqa: E402,F401

__all__ = ["HARMONIZERS", "Harmonizer", "Volume", "register", "get_harmonizer"]


def get_harmonizer(name: str) -> type[Harmonizer]:
    """The harmonizer class registered as ``name``."""
    return HARMONIZERS[name]
