"""What the learned harmonizers share: safetensors weights, a model card with the training
loss curve (thinned in the JSON, full as a PNG beside it) and the held-out diagnostics that say
whether the model learned anything, the brain-box crop they train and infer on, the stage
cache that spares a rerun with unchanged inputs, and the training time announced up front."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from safetensors.numpy import load_file, save_file

from bids_harmony.errors import DataError, UsageError
from bids_harmony.harmonizers.base import Harmonizer
from bids_harmony.harmonizers.registry import AUTO_PRESET, MACHINE_PRESET
from bids_harmony.metrics.similarity import wasserstein
from bids_harmony.nn import distributed
from bids_harmony.nn.device import resolve_device
from bids_harmony.nn.stages import StageResult, run_stage
from bids_harmony.volume import Volume

if TYPE_CHECKING:
    import torch

S = TypeVar("S")

LOGGER = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
NETWORK_PREFIX = "net."
LOSS_HISTORY = "loss_history"
#: Points kept of the loss curve in the model card (window means over the whole run).
CARD_CURVE_POINTS = 500
#: State keys of the brain box: (3, 2) start and stop voxel per axis, and the grid it is in.
BRAIN_BOX = "brain_box"
BRAIN_BOX_GRID = "brain_box_grid"
#: Folder of finished training stages, inside the harmonizer's checkpoint directory.
STAGES_DIR = "stages"
#: State-key prefixes of the diagnostics: the monitor's scores per recorded step, the
#: model-free baselines they are judged against, and whether they were held out.
MONITOR_PREFIX, BASELINE_PREFIX, HELD_OUT = "monitor.", "baseline.", "monitor_held_out"
NO_DIAGNOSTICS = "no held-out diagnostics were recorded"


class LearnedHarmonizer(Harmonizer):
    """A harmonizer whose state is network weights (``net.*``) and a loss history.

    Subclasses name their loss in ``loss_label`` for the card's plot.
    """

    state_file: ClassVar[str] = WEIGHTS_FILE
    loss_label: ClassVar[str] = "training loss"

    def _write_state(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        save_file(arrays, str(path))

    @classmethod
    def _read_state(cls, path: Path) -> dict[str, np.ndarray]:
        return load_file(str(path))

    def _add_to_card(self, card: dict[str, Any], staging: Path) -> None:
        """The training loss per sequence: a thinned curve in the card and a PNG beside it;
        the diagnostics and, where they say the model learned nothing, a warning (also
        logged, and shown by the group report); how many ``torchrun`` processes trained it."""
        card["loss_curve"] = {}
        card["training_processes"] = distributed.world_size()
        card["diagnostics"] = self.diagnostics()
        for sequence, diagnostics in card["diagnostics"].items():
            for warning in diagnostics["warnings"]:
                LOGGER.warning("%s model, %s: %s", self.name, sequence, warning)
        for sequence, seq_state in self.state_.items():
            steps, losses = summarise_losses(seq_state[LOSS_HISTORY])
            card["loss_curve"][sequence] = {"step": steps, "loss": losses}
            plot_loss_curve(
                seq_state[LOSS_HISTORY], f"{type(self).__name__}, {sequence}",
                self.loss_label, staging / f"loss_{sequence}.png",
            )

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per sequence: the monitor's history, its baselines, what it scored (held-out or
        training images), the warnings of :meth:`_diagnose` (or that there is no history)
        and ``learned`` (no warning)."""
        report = {}
        for sequence, seq_state in self.state_.items():
            diagnostics = read_diagnostics(seq_state)
            diagnostics["warnings"] = (
                self._diagnose(diagnostics) if diagnostics["history"] else [NO_DIAGNOSTICS]
            )
            diagnostics["learned"] = not diagnostics["warnings"]
            report[sequence] = diagnostics
        return report

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """Warnings for a model whose diagnostics (a non-empty history) say it learned
        nothing; none by default."""
        return []

    def _announce(self, steps: int, seconds_per_step: float | None) -> None:
        """Log the expected training time before training starts, from a measured step time
        on 2 CPU cores (``None``: not measured for this preset, or on a GPU)."""
        if seconds_per_step is None:
            LOGGER.info("%s: training %d steps (preset %s)", self.name, steps,
                        self.params.get("preset"))
            return
        seconds = steps * seconds_per_step
        expected = f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
        LOGGER.warning(
            "%s: training %d steps, expected about %s on 2 CPU cores (preset %s); "
            "a GPU (--device cuda) trains --preset fast far quicker", self.name, steps,
            expected, self.params.get("preset"),
        )

    def _stage(self, stage: str, key: str, compute: Callable[[], StageResult]) -> StageResult:
        """``compute()`` through the stage cache beside the checkpoints (none without a
        ``checkpoint_dir``): a refit on the same inputs loads the finished weights."""
        store = None if self.checkpoint_dir is None else self.checkpoint_dir / STAGES_DIR
        return run_stage(store, f"{self.name}-{stage}", key, compute)


@dataclass(frozen=True)
class BrainBox:
    """The bounding box of the union of the training brain masks, grown to the sides a
    network needs, on the template grid ``grid``.

    Learned methods train and infer inside it: the template grid is mostly background, which
    would cost compute and, for patch training, dilute the batches. Each side is rounded up
    to a multiple of its ``multiples`` entry, growing the box evenly around the brain and
    shifting it to stay inside the grid; a side that would outgrow the grid takes the whole
    grid side (the network then pads as before). Outputs are 0 outside the box: a voxel no
    training brain reached has no target style to learn from.
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]
    grid: tuple[int, ...]

    @classmethod
    def around(cls, masks: Sequence[np.ndarray], multiples: Sequence[int]) -> BrainBox:
        shapes = {np.shape(mask) for mask in masks}
        if len(shapes) > 1:
            raise DataError(
                f"the training images lie on different template grids {sorted(shapes)}; "
                "preprocess them all with the same --resolution"
            )
        union = np.logical_or.reduce([np.asarray(mask, dtype=bool) for mask in masks])
        if not union.any():
            raise DataError("the training brain masks are empty; check the brain extraction")
        start, stop = [], []
        for axis, multiple in enumerate(multiples):
            grid_side = union.shape[axis]
            other_axes = tuple(a for a in range(union.ndim) if a != axis)
            occupied = np.flatnonzero(union.any(axis=other_axes))
            low, side = int(occupied[0]), int(occupied[-1]) - int(occupied[0]) + 1
            grown = min(grid_side, math.ceil(side / multiple) * multiple)
            first = min(max(0, low - (grown - side) // 2), grid_side - grown)
            start.append(first)
            stop.append(first + grown)
        return cls(tuple(start), tuple(stop), tuple(union.shape))

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> BrainBox:
        box = np.asarray(state[BRAIN_BOX])
        return cls(
            tuple(int(v) for v in box[:, 0]), tuple(int(v) for v in box[:, 1]),
            tuple(int(v) for v in state[BRAIN_BOX_GRID]),
        )

    def to_state(self) -> dict[str, np.ndarray]:
        return {
            BRAIN_BOX: np.array([self.start, self.stop], dtype=np.int64).T.copy(),
            BRAIN_BOX_GRID: np.array(self.grid, dtype=np.int64),
        }

    @property
    def index(self) -> tuple[slice, ...]:
        return tuple(slice(low, high) for low, high in zip(self.start, self.stop))

    def crop(self, image: Volume) -> Volume:
        """``image`` (intensities, mask and channels) inside the box."""
        if image.data.shape != self.grid:
            raise DataError(
                f"image grid {image.data.shape} differs from the grid the model was trained "
                f"on {self.grid}; use the same --resolution as the group run"
            )
        return Volume(
            image.data[self.index], image.mask[self.index], image.spacing,
            {name: channel[self.index] for name, channel in image.channels.items()},
        )

    def uncrop(self, data: np.ndarray) -> np.ndarray:
        """``data`` of the box's shape placed on the full grid, 0 outside the box."""
        full = np.zeros(self.grid, dtype=data.dtype)
        full[self.index] = data
        return full


def machine_preset(preset: str, device: str) -> str:
    """``auto``: ``cpu`` where the model would train on the CPU, else ``fast``."""
    if preset != AUTO_PRESET:
        return preset
    return MACHINE_PRESET if resolve_device(device).type == "cpu" else "fast"


def resolve_settings(
    method: str, presets: Mapping[str, S], preset: str, overrides: Mapping[str, Any]
) -> S:
    """``presets[preset]`` with ``overrides`` replacing single fields; an unknown preset or
    field is a one-line UsageError that lists the known ones."""
    if preset not in presets:
        raise UsageError(
            f"unknown {method} preset '{preset}'; choose one of {', '.join(presets)}"
        )
    known = [field.name for field in fields(presets[preset])]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UsageError(
            f"unknown {method} parameter(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return replace(presets[preset], **overrides)  # type: ignore[type-var]


def network_arrays(network: torch.nn.Module, losses: Sequence[float]) -> dict[str, np.ndarray]:
    """A trained network's weights (``net.*``) and its loss history: a sequence's state."""
    state = {
        NETWORK_PREFIX + name: tensor.detach().cpu().numpy()
        for name, tensor in network.state_dict().items()
    }
    state[LOSS_HISTORY] = np.asarray(losses, dtype=np.float32)
    return state


def network_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``net.*`` arrays of a sequence's state, with the prefix removed."""
    return {
        name[len(NETWORK_PREFIX):]: np.array(value)
        for name, value in state.items()
        if name.startswith(NETWORK_PREFIX)
    }


def module_arrays(module: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """A module's state dict as ``prefix``-named arrays, so several networks share a state."""
    return {prefix + name: tensor.detach().cpu().numpy().copy()
            for name, tensor in module.state_dict().items()}


def module_state(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`module_arrays`: the ``prefix`` arrays as a state dict."""
    import torch

    return {name[len(prefix):]: torch.from_numpy(np.array(value))
            for name, value in state.items() if name.startswith(prefix)}


def padded_shape(shape: Sequence[int], divisor: int, minimum: int = 1) -> tuple[int, ...]:
    """Each side rounded up to a multiple of ``divisor`` and to at least ``minimum``."""
    return tuple(max(minimum, math.ceil(side / divisor) * divisor) for side in shape)


def pad_end(array: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """``array`` at the low corner of a ``shape`` array filled with ``fill``."""
    padded = np.full(tuple(shape), fill, dtype=array.dtype)
    padded[tuple(slice(0, side) for side in array.shape)] = array
    return padded


def split_validation(images: Sequence[Volume], count: int) -> tuple[list[Volume], list[Volume]]:
    """The last ``count`` images held out for the diagnostics, when at least two stay to train
    on; otherwise none (the diagnostics then score training images, and the card says so)."""
    if count < 1 or len(images) - count < 2:
        return list(images), []
    return list(images[:-count]), list(images[-count:])


def monitor_arrays(
    history: Sequence[Mapping[str, float]], baselines: Mapping[str, float], held_out: bool
) -> dict[str, np.ndarray]:
    """A run's diagnostics as state arrays, so they travel with the weights (and the stage
    cache): one array per score over the recorded steps, one per baseline."""
    arrays = {HELD_OUT: np.array([int(held_out)], dtype=np.int64)}
    for name in dict.fromkeys(key for record in history for key in record):
        arrays[MONITOR_PREFIX + name] = np.array(
            [record[name] for record in history], dtype=np.float64
        )
    for name, value in baselines.items():
        arrays[BASELINE_PREFIX + name] = np.array([value], dtype=np.float64)
    return arrays


def read_diagnostics(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`monitor_arrays`: history records, baselines and what was scored."""
    columns = {
        name[len(MONITOR_PREFIX):]: np.asarray(value).tolist()
        for name, value in state.items() if name.startswith(MONITOR_PREFIX)
    }
    steps = len(next(iter(columns.values()), []))
    history = [
        {name: (int(values[k]) if name == "step" else round(float(values[k]), 6))
         for name, values in columns.items()}
        for k in range(steps)
    ]
    baselines = {
        name[len(BASELINE_PREFIX):]: round(float(np.asarray(value).ravel()[0]), 6)
        for name, value in state.items() if name.startswith(BASELINE_PREFIX)
    }
    held_out = bool(np.asarray(state[HELD_OUT]).ravel()[0]) if HELD_OUT in state else False
    return {"history": history, "baselines": baselines,
            "scored_on": "held-out" if held_out else "training"}


def between_site_wd(brains: Sequence[np.ndarray], sites: Sequence[str]) -> float:
    """Mean pairwise WD between the sites' pooled brain intensities (``brains``: one array of
    brain values per image): how far apart the diagnostics find the sites."""
    pooled = {site: np.concatenate([b for b, s in zip(brains, sites) if s == site])
              for site in sorted(set(sites))}
    names = list(pooled)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if not pairs:
        return 0.0
    return float(np.mean([wasserstein(pooled[a], pooled[b]) for a, b in pairs]))


def summarise_losses(losses: np.ndarray) -> tuple[list[int], list[float]]:
    """At most ``CARD_CURVE_POINTS`` window means of the loss, with each window's last step."""
    losses = np.asarray(losses, dtype=np.float64)
    windows = np.array_split(np.arange(losses.size), min(CARD_CURVE_POINTS, max(losses.size, 1)))
    windows = [w for w in windows if w.size]
    return (
        [int(w[-1]) + 1 for w in windows],
        [round(float(losses[w].mean()), 6) for w in windows],
    )


def plot_loss_curve(losses: np.ndarray, title: str, label: str, path: Path) -> None:
    """Training loss per step (and its running mean) as a PNG."""
    from matplotlib.figure import Figure

    losses = np.asarray(losses, dtype=np.float64)
    window = max(1, losses.size // 50)
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.plot(np.arange(1, losses.size + 1), losses, lw=0.5, alpha=0.4, label="per step")
    axis.plot(np.arange(window, losses.size + 1), running, lw=1.5, label=f"mean of {window}")
    axis.set_xlabel("training step")
    axis.set_ylabel(label)
    if np.all(losses > 0):
        axis.set_yscale("log")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
