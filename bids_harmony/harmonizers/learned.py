"""What the learned harmonizers share: safetensors weights and a model card with the
training loss curve (thinned in the JSON, full as a PNG beside it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from safetensors.numpy import load_file, save_file

from bids_harmony.errors import UsageError
from bids_harmony.harmonizers.base import Harmonizer

if TYPE_CHECKING:
    import torch

S = TypeVar("S")

WEIGHTS_FILE = "model.safetensors"
NETWORK_PREFIX = "net."
LOSS_HISTORY = "loss_history"
#: Points kept of the loss curve in the model card (window means over the whole run).
CARD_CURVE_POINTS = 500


class LearnedHarmonizer(Harmonizer):
    """A harmonizer whose state is network weights (``net.*``) and a loss history.

    Subclasses name their loss in ``loss_label`` for the card's plot.
    """

    state_file: ClassVar[str] = WEIGHTS_FILE
    loss_label: ClassVar[str] = "training loss"
    _state_keys: ClassVar[tuple[str, ...]] = (LOSS_HISTORY,)

    def _write_state(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        save_file(arrays, str(path))

    @classmethod
    def _read_state(cls, path: Path) -> dict[str, np.ndarray]:
        return load_file(str(path))

    def _add_to_card(self, card: dict[str, Any], staging: Path) -> None:
        """The training loss per sequence: a thinned curve in the card and a PNG beside it."""
        card["loss_curve"] = {}
        for sequence, seq_state in self.state_.items():
            steps, losses = summarise_losses(seq_state[LOSS_HISTORY])
            card["loss_curve"][sequence] = {"step": steps, "loss": losses}
            plot_loss_curve(
                seq_state[LOSS_HISTORY], f"{type(self).__name__}, {sequence}",
                self.loss_label, staging / f"loss_{sequence}.png",
            )


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
