"""The training loop the learned harmonizers share: progress bar, checkpoints, resume.

A run is identified by a *fingerprint* (a hash of the settings and the training data that
the caller computes). Every ``checkpoint_every`` steps the loop writes every network,
optimiser and learning-rate schedule of the run (a GAN's discriminator and its optimiser,
an EMA copy of the weights: anything with a ``state_dict``), the random generator and the
loss history to ``<checkpoint_dir>/<fingerprint>.pt`` atomically; a later run with the same
fingerprint continues from there and ends with exactly the state an uninterrupted run would
have had (the generator state is restored, and every step draws its randomness from it).

A :class:`Monitor` scores the model on held-out data every few steps and at the end, so a
model card can say whether training learned anything; its history is checkpointed too.

Under ``torchrun`` (:mod:`bids_harmony.nn.distributed`) every rank runs the same loop on its
own random stream; the step must call its networks through
:func:`~bids_harmony.nn.distributed.replicate` (checked after the first step: the ranks'
weights must agree), the recorded loss is the mean over the ranks, and rank 0 writes the
checkpoint with every rank's generator state, which each rank takes back on resume.
Running statistics (batch norm's) are averaged over the ranks whenever the model is
evaluated, checkpointed or returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bids_harmony.fileio import atomic_path
from bids_harmony.nn import distributed

LOGGER = logging.getLogger(__name__)

#: Loss of one step, computed from the generator (all randomness of a step comes from it).
StepLoss = Callable[[torch.Generator], torch.Tensor]
#: One whole training step (every update of every module), drawing its randomness from the
#: generator; returns the loss to record for the step.
TrainingStep = Callable[[torch.Generator], float]


@dataclass
class Monitor:
    """Held-out diagnostics of a run: ``evaluate()`` every ``every`` steps and after the last.

    ``evaluate`` must not draw from the training generator (it would change the run); it
    returns named scores, which are logged and kept with their step in ``history``.
    """

    evaluate: Callable[[], dict[str, float]]
    every: int
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, step: int, description: str) -> None:
        scores = {name: float(value) for name, value in self.evaluate().items()}
        self.history.append({"step": step, **scores})
        LOGGER.info("%s, step %d: %s", description, step,
                    ", ".join(f"{name} {value:.4g}" for name, value in scores.items()))


def warmup_schedule(
    optimiser: torch.optim.Optimizer, warmup_steps: int, total_steps: int, decay: str = "none"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a constant (``decay='none'``) or cosine
    (``'cosine'``, to 0 at ``total_steps``) learning rate.

    The warm-up keeps Adam's first, badly estimated moments from throwing a freshly
    initialised network off at learning rates that then train ten times faster.
    """
    if decay not in ("none", "cosine"):
        raise ValueError(f"decay must be 'none' or 'cosine', got {decay!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "none":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


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
    clip_norm: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    monitor: Monitor | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    description: str = "training",
) -> list[float]:
    """One network, one optimiser: ``steps`` optimiser steps of ``step_loss``.

    The common case of :func:`train_state`; returns the loss of every step. ``clip_norm``
    clips the gradient's global norm before each step; ``ema`` is updated after each step.
    """

    def step(rng: torch.Generator) -> float:
        loss = step_loss(rng)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip_norm)
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(network)
        return float(loss.detach())

    modules: dict[str, torch.nn.Module] = {"network": network}
    if ema is not None:
        modules["ema"] = ema
    state = TrainingState(
        modules, {"optimiser": optimiser},
        {} if scheduler is None else {"scheduler": scheduler},
    )
    return train_state(
        state, step, steps, generator, monitor=monitor,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, description=description,
    )


def train_state(
    state: TrainingState,
    step: TrainingStep,
    steps: int,
    generator: torch.Generator,
    *,
    monitor: Monitor | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    description: str = "training",
    term_log: dict[str, list[float]] | None = None,
) -> list[float]:
    """Run ``steps`` calls of ``step`` on ``state``; returns the loss of every step.

    ``monitor`` (if any) runs with the modules in eval mode every ``monitor.every`` steps
    and after the last step, whatever ``every`` is. ``term_log`` is where a step with several
    loss terms appends each one per step (this rank's values); it travels with the
    checkpoint, so a resumed run's log has every step.

    Resumes from ``checkpoint`` when it exists (steps already done are not repeated) and
    removes it once training is complete, since the saved model then holds the result.
    The progress bar also runs when stderr is not a terminal (batch jobs), refreshed every
    30 s there so that the log shows the loss and the ETA without filling up.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    state.train()
    distributed.rank_stream(generator)
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start, losses = _restore(checkpoint, state, generator, monitor, term_log)
        LOGGER.info("%s: resuming from step %d of %d (%s)", description, start, steps,
                    checkpoint)
    progress = tqdm(
        total=steps, initial=start, desc=description, unit="step", dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0, disable=not distributed.is_main(),
    )
    try:
        for done in range(start + 1, steps + 1):
            losses.append(distributed.mean(step(generator)))
            if done == start + 1:
                _check_replicas(state, description)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            progress.update()
            evaluate_now = monitor is not None and (done % monitor.every == 0 or done == steps)
            checkpoint_now = checkpoint is not None and done % checkpoint_every == 0
            if evaluate_now or checkpoint_now:
                _average_buffers(state)
            if evaluate_now:
                state.train(False)
                monitor.record(done, description)
                state.train()
            if checkpoint_now and done < steps:
                _save(checkpoint, done, losses, state, generator, monitor, term_log)
    finally:
        progress.close()
    _average_buffers(state)
    state.train(False)
    if checkpoint is not None and distributed.is_main():
        checkpoint.unlink(missing_ok=True)
    return losses


def _average_buffers(state: TrainingState) -> None:
    """Under ``torchrun``: the ranks' running statistics (batch norm's, computed on each
    rank's own batches; DDP copies rank 0's before each forward pass, so they drift by one
    step) averaged, before the model is evaluated, checkpointed or returned."""
    for module in state.modules.values():
        distributed.average_buffers(module)


def _check_replicas(state: TrainingState, description: str) -> None:
    """Under ``torchrun``, fail at once when a step trained a network outside its
    ``replicate`` wrapper: the ranks' weights would drift apart unnoticed."""
    for name, module in state.modules.items():
        if any(True for _ in module.parameters()) and not distributed.parameters_agree(module):
            raise RuntimeError(
                f"{description}: the ranks' '{name}' weights differ after one step; its "
                "training step must call it through bids_harmony.nn.distributed.replicate"
            )


def _save(
    path: Path, step: int, losses: list[float], state: TrainingState,
    generator: torch.Generator, monitor: Monitor | None,
    term_log: Mapping[str, list[float]] | None = None,
) -> None:
    """Rank 0 writes the checkpoint beside its final name, then renames it into place; the
    other ranks wait for it (a rank that resumes reads what rank 0 wrote)."""
    generators = distributed.gather(generator.get_state())
    if distributed.is_main():
        content = {
            "step": step,
            "losses": torch.tensor(losses, dtype=torch.float64),
            "generators": generators,
            "monitor": [] if monitor is None else monitor.history,
            "terms": {name: torch.tensor(values, dtype=torch.float64)
                      for name, values in (term_log or {}).items()},
            **state.state_dict(),
        }
        with atomic_path(path) as partial:
            torch.save(content, partial)
    distributed.barrier()


def _restore(
    path: Path, state: TrainingState, generator: torch.Generator, monitor: Monitor | None,
    term_log: dict[str, list[float]] | None = None,
) -> tuple[int, list[float]]:
    """Load a checkpoint written by :func:`_save` (tensors only: ``weights_only``).

    Read onto the CPU: ``load_state_dict`` copies weights and optimiser moments onto the
    devices their modules already live on. Each rank takes back its own generator state; a
    run resumed on another number of ranks keeps the weights and draws its own streams on
    from there (not the uninterrupted run's, which had other ranks).
    """
    content = torch.load(path, map_location="cpu", weights_only=True)
    state.load_state_dict(content)
    # Checkpoints from before multi-process training held one state under "generator".
    generators = content.get("generators") or [content["generator"]]
    if len(generators) == distributed.world_size():
        generator.set_state(generators[distributed.rank()])
    else:
        LOGGER.warning("%s was written by %d process(es), resumed on %d: the random streams "
                       "go on from a new seed", path, len(generators), distributed.world_size())
        generator.manual_seed(generator.initial_seed() + int(content["step"]))
    if monitor is not None:
        monitor.history[:] = [dict(record) for record in content.get("monitor", [])]
    if term_log is not None:
        term_log.clear()
        term_log.update({name: [float(v) for v in values]
                         for name, values in content.get("terms", {}).items()})
    return int(content["step"]), [float(v) for v in content["losses"]]
