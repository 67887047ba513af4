"""The training loop the learned harmonizers share: progress bar, checkpoints, resume.

A run is identified by a *fingerprint* (a hash of the settings and the training data that
the caller computes). Every ``checkpoint_every`` steps the loop writes the network, the
optimiser, the learning-rate schedule, the random generator and the loss history to
``<checkpoint_dir>/<fingerprint>.pt`` atomically; a later run with the same fingerprint
continues from there and ends with exactly the weights an uninterrupted run would have had
(the generator state is restored, and every step draws its randomness from it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bids_harmony.fileio import atomic_path

LOGGER = logging.getLogger(__name__)

#: Loss of one step, computed from the generator (all randomness of a step comes from it).
StepLoss = Callable[[torch.Generator], torch.Tensor]


def fingerprint(settings: dict[str, Any], arrays: list[np.ndarray]) -> str:
    """A short hash of the settings and the training arrays: the name of a run."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array))  # hashed in place: volumes can be large
    return digest.hexdigest()[:20]


def checkpoint_path(checkpoint_dir: Path | None, fingerprint: str) -> Path | None:
    """Where the run ``fingerprint`` keeps its checkpoint (``None``: no checkpoints)."""
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{fingerprint}.pt"


def train(
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    step_loss: StepLoss,
    steps: int,
    generator: torch.Generator,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    description: str = "training",
) -> list[float]:
    """Run ``steps`` optimiser steps of ``step_loss``; returns the loss of every step.

    Resumes from ``checkpoint`` when it exists (steps already done are not repeated) and
    removes it once training is complete, since the saved model then holds the result.
    The progress bar also runs when stderr is not a terminal (batch jobs), refreshed every
    30 s there so that the log shows the loss and the ETA without filling up.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    network.train()
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start, losses = _restore(checkpoint, network, optimiser, scheduler, generator)
        LOGGER.info("%s: resuming from step %d of %d (%s)", description, start, steps,
                    checkpoint)
    progress = tqdm(
        total=steps, initial=start, desc=description, unit="step", dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0, disable=False,
    )
    try:
        for step in range(start + 1, steps + 1):
            loss = step_loss(generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            progress.update()
            if checkpoint is not None and step % checkpoint_every == 0 and step < steps:
                _save(checkpoint, step, losses, network, optimiser, scheduler, generator)
    finally:
        progress.close()
    network.eval()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return losses


def _save(
    path: Path,
    step: int,
    losses: list[float],
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
) -> None:
    """Write the checkpoint beside its final name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "step": step,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "network": network.state_dict(),
        "optimiser": optimiser.state_dict(),
        "generator": generator.get_state(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    with atomic_path(path) as partial:
        torch.save(state, partial)


def _restore(
    path: Path,
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    """Load a checkpoint written by :func:`_save` (tensors only: ``weights_only``)."""
    device = next(network.parameters()).device
    state = torch.load(path, map_location=device, weights_only=True)
    network.load_state_dict(state["network"])
    optimiser.load_state_dict(state["optimiser"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"].cpu())
    return int(state["step"]), [float(v) for v in state["losses"]]
