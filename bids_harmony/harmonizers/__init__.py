"""Harmonizers behind one contract, listed by :data:`HARMONIZERS` (see ``registry.py``).

Importing the package imports no harmonizer (nor numpy): ``Harmonizer`` is loaded on first
access, each method's module when its class is asked for, so ``--help`` stays instant.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_harmony.errors import DataError
from bids_harmony.harmonizers.registry import HARMONIZERS, from_options, register

if TYPE_CHECKING:
    from bids_harmony.harmonizers.base import Harmonizer

__all__ = ["HARMONIZERS", "Harmonizer", "from_options", "load_harmonizer", "register"]

#: Names this package exports from modules that import numpy, loaded when first used.
LAZY_EXPORTS = {"Harmonizer": "bids_harmony.harmonizers.base"}


def __getattr__(name: str) -> Any:
    """PEP 562: ``from bids_harmony.harmonizers import Harmonizer`` imports ``base`` then."""
    if name in LAZY_EXPORTS:
        return getattr(importlib.import_module(LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_harmonizer(directory: Path) -> Harmonizer:
    """Load whichever harmonizer ``directory/model_card.json`` names."""
    from bids_harmony.harmonizers.base import read_model_card

    method = read_model_card(Path(directory))["method"]
    if method not in HARMONIZERS:
        raise DataError(
            f"{directory} holds a '{method}' model, which this version of bids_harmony does "
            f"not know; known: {', '.join(HARMONIZERS)}"
        )
    return HARMONIZERS[method].load(directory)
