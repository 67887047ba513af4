"""A content-addressed cache of finished training stages in the work directory.

A learned method's fit is a chain of stages (e.g. a site-independent encoder, then a
target-specific decoder). Each stage's result is stored under a key the caller computes
from everything that decides it (settings and training data, see
:func:`bids_harmony.nn.training.fingerprint`) and the package version, so a rerun with the
same inputs loads the result instead of training again, and a changed input (another
``--target-site``, other images, other settings) only reruns the stages it reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from bids_harmony import __version__
from bids_harmony.fileio import atomic_path

LOGGER = logging.getLogger(__name__)

#: The arrays a stage produces, by name (e.g. a network's weights and its loss history).
StageResult = dict[str, np.ndarray]


def stage_path(store: Path, stage: str, key: str) -> Path:
    """The file of stage ``stage`` run on inputs ``key`` (the version is part of the name:
    another release may train differently)."""
    return Path(store) / f"{stage}-{key}-v{__version__}.safetensors"


def run_stage(
    store: Path | None, stage: str, key: str, compute: Callable[[], StageResult]
) -> StageResult:
    """``compute()``, or its stored result when this stage already ran on inputs ``key``.

    ``store=None`` (no work directory) always computes. The result is written atomically
    once complete, so an interrupted stage is never mistaken for a finished one.
    """
    if store is None:
        return compute()
    path = stage_path(store, stage, key)
    if path.is_file():
        LOGGER.info("%s: inputs unchanged, loading the finished stage from %s", stage, path)
        return load_file(str(path))
    result = compute()
    with atomic_path(path) as partial:
        save_file({name: np.ascontiguousarray(a) for name, a in result.items()}, str(partial))
    return result
