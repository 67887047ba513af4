"""The training loop the learned harmonizers share: progress bar, checkpoints, resume.

A run is identified by a *fingerprint* (a hash of the settings and the training data that
the caller computes). Every ``checkpoint_every`` steps the loop writes every network,
optimiser and learning-rate schedule of the run (a GAN's discriminator and its optimiser,
an EMA copy of the weights: anything with a ``state_dict``), the random generator and the
loss history to ``<checkpoint_dir>/<fingerprint>.pt`` atomically; a later run with the same
fingerprint continues from there and ends with exactly the state an uninterrupted run would
have had (the generator state is restored, and every step draws its randomness from it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bids_harmony.fileio import atomic_path

LOGGER = logging.getLogger(__name__)

#: Loss of one step, computed from the generator (all randomness of a step comes from it).
StepLoss = Callable[[torch.Generator], torch.Tensor]
#: One whole training step (every update of every module), drawing its randomness from the
#: generator; returns the loss to record for the step.
TrainingStep = Callable[[torch.Generator], float]


@dataclass(frozen=True)
class TrainingState:
    """Everything a run updates, by name: what a checkpoint saves and a resume restores.

    ``modules`` holds the networks and any module-shaped extra state (e.g. an EMA of the
    weights as ``torch.optim.swa_utils.AveragedModel``); names are the checkpoint's keys.
    """

    modules: Mapping[str, torch.nn.Module]
    optimisers: Mapping[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler] = field(
        default_factory=dict
    )

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {
            group: {name: part.state_dict() for name, part in parts.items()}
            for group, parts in self._groups().items()
        }

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        for group, parts in self._groups().items():
            for name, part in parts.items():
                part.load_state_dict(state[group][name])

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    def _groups(self) -> dict[str, Mapping[str, Any]]:
        return {
            "modules": self.modules, "optimisers": self.optimisers, "schedulers": self.schedulers
        }


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
    """One network, one optimiser: ``steps`` optimiser steps of ``step_loss``.

    The common case of :func:`train_state`; returns the loss of every step.
    """

    def step(rng: torch.Generator) -> float:
        loss = step_loss(rng)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        return float(loss.detach())

    state = TrainingState(
        {"network": network}, {"optimiser": optimiser},
        {} if scheduler is None else {"scheduler": scheduler},
    )
    return train_state(
        state, step, steps, generator,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, description=description,
    )


def train_state(
    state: TrainingState,
    step: TrainingStep,
    steps: int,
    generator: torch.Generator,
    *,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    description: str = "training",
) -> list[float]:
    """Run ``steps`` calls of ``step`` on ``state``; returns the loss of every step.

    Resumes from ``checkpoint`` when it exists (steps already done are not repeated) and
    removes it once training is complete, since the saved model then holds the result.
    The progress bar also runs when stderr is not a terminal (batch jobs), refreshed every
    30 s there so that the log shows the loss and the ETA without filling up.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    state.train()
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start, losses = _restore(checkpoint, state, generator)
        LOGGER.info("%s: resuming from step %d of %d (%s)", description, start, steps,
                    checkpoint)
    progress = tqdm(
        total=steps, initial=start, desc=description, unit="step", dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0, disable=False,
    )
    try:
        for done in range(start + 1, steps + 1):
            losses.append(step(generator))
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            progress.update()
            if checkpoint is not None and done % checkpoint_every == 0 and done < steps:
                _save(checkpoint, done, losses, state, generator)
    finally:
        progress.close()
    state.train(False)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return losses


def _save(
    path: Path, step: int, losses: list[float], state: TrainingState,
    generator: torch.Generator,
) -> None:
    """Write the checkpoint beside its final name, then rename it into place."""
    content = {
        "step": step,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "generator": generator.get_state(),
        **state.state_dict(),
    }
    with atomic_path(path) as partial:
        torch.save(content, partial)


def _restore(
    path: Path, state: TrainingState, generator: torch.Generator
) -> tuple[int, list[float]]:
    """Load a checkpoint written by :func:`_save` (tensors only: ``weights_only``).

    Read onto the CPU: ``load_state_dict`` copies weights and optimiser moments onto the
    devices their modules already live on.
    """
    content = torch.load(path, map_location="cpu", weights_only=True)
    state.load_state_dict(content)
    generator.set_state(content["generator"])
    return int(content["step"]), [float(v) for v in content["losses"]]
