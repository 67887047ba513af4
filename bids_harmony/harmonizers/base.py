"""The contract every harmonizer follows, its registry, and the model card it saves.

A harmonizer works on images already in template space and normalised to [0, 1] inside the
brain mask (the pipeline's ``desc-preproc`` output). It is fitted once (``group`` level) on
many images with their site and sequence labels, saved without pickle (``.npz`` or
safetensors beside ``model_card.json``) and applied per image (``participant`` level).

Fitted state lives in attributes ending in ``_`` that only ``fit`` and ``load`` set, as in
scikit-learn; ``transform`` and ``save`` before that raise :class:`NotFittedError`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from bids_harmony import __version__
from bids_harmony.errors import DataError, InputMissingError, NotFittedError, UsageError
from bids_harmony.fileio import atomic_directory, sha256_file
from bids_harmony.volume import Volume

MODEL_CARD = "model_card.json"
UNIFIED = "unified"
AUTO = "auto"
# Quantiles of the target reference's brain intensities, kept for every method so QC can
# measure how close a harmonized image's distribution came to the target (Wasserstein).
REFERENCE_QUANTILES = "reference_quantiles"


class Harmonizer(ABC):
    """Base of all harmonizers: ``fit`` / ``transform`` / ``save`` / ``load``.

    Subclasses implement ``_fit_sequence`` (learn the state for one sequence from the target
    reference images and, when useful, all images) and ``_transform_sequence``, and declare
    ``_state_keys``: the names of the fitted arrays saved in ``state.npz`` per sequence.
    """

    name: ClassVar[str]
    supports_unified: ClassVar[bool] = True
    #: Size presets of a learned harmonizer (``--preset``); classical ones have none.
    presets: ClassVar[tuple[str, ...]] = ()
    _state_keys: ClassVar[tuple[str, ...]] = ()
    #: Where a learned harmonizer keeps training checkpoints to resume from (the work dir's
    #: ``checkpoints/``, set by the group level); ``None`` trains without checkpoints.
    checkpoint_dir: Path | None = None

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)

    # -- public contract -------------------------------------------------------------------
    def fit(
        self,
        images: Sequence[Volume],
        sites: Sequence[str],
        sequences: Sequence[str],
        target: str = AUTO,
    ) -> Harmonizer:
        """Learn, for each sequence, how to map any image to the target site's style."""
        if not (len(images) == len(sites) == len(sequences)) or not images:
            raise DataError(
                f"fit needs one site and one sequence per image, got {len(images)} images, "
                f"{len(sites)} sites, {len(sequences)} sequences"
            )
        target_site = resolve_target_site(images, sites, target)
        if target_site == UNIFIED and not self.supports_unified:
            raise UsageError(
                f"--target-site unified is not supported by {self.name}; name a site or use auto"
            )
        state: dict[str, dict[str, np.ndarray]] = {}
        reference_counts: dict[str, int] = {}
        for sequence in sorted(set(sequences)):
            seq_images = [im for im, s in zip(images, sequences) if s == sequence]
            seq_sites = [site for site, s in zip(sites, sequences) if s == sequence]
            reference = [
                im for im, site in zip(seq_images, seq_sites)
                if target_site == UNIFIED or site == target_site
            ]
            if not reference:
                raise DataError(
                    f"target site '{target_site}' has no {sequence} image to learn from; "
                    "choose another --target-site or drop that --suffix"
                )
            reference_counts[sequence] = len(reference)
            state[sequence] = self._fit_sequence(reference)
            state[sequence][REFERENCE_QUANTILES] = np.quantile(
                np.concatenate([im.brain for im in reference]), np.linspace(0.0, 1.0, 1001)
            ).astype(np.float32)
        self.state_ = state
        self.target_site_ = target_site
        self.training_ = {
            "sites": sorted(set(sites)),
            "sequences": sorted(set(sequences)),
            "n_images": len(images),
            # The target-site images per sequence: all that a blind method learns from.
            "reference_images": reference_counts,
            "checksum": checksum_images(images),
        }
        return self

    def transform(self, image: Volume, sequence: str) -> np.ndarray:
        """Harmonize one image; returns float32 data on the same grid, 0 outside the mask."""
        self._check_fitted()
        if sequence not in self.state_:
            raise DataError(
                f"the {self.name} model was fitted on {sorted(self.state_)} but not {sequence}; "
                "refit it at the group level with that --suffix"
            )
        out = self._transform_sequence(image, self.state_[sequence])
        mask = image.mask.astype(bool)
        return np.where(mask, out, 0.0).astype(np.float32)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the state file and ``model_card.json`` into ``directory`` atomically."""
        self._check_fitted()
        directory = Path(directory)
        arrays = {
            f"{sequence}/{key}": np.ascontiguousarray(value)
            for sequence, seq_state in self.state_.items()
            for key, value in seq_state.items()
        }
        with atomic_directory(directory) as staging:
            self._write_state(arrays, staging / self.state_file)
            card = self.model_card()
            card["state_file"] = self.state_file
            card["state_sha256"] = sha256_file(staging / self.state_file)
            self._add_to_card(card, staging)
            (staging / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls: type[H], directory: str | os.PathLike[str]) -> H:
        """Rebuild a fitted harmonizer from ``save``'s output (no pickle involved)."""
        directory = Path(directory)
        card = read_model_card(directory)
        if card["method"] != cls.name:
            raise DataError(
                f"{directory / MODEL_CARD} holds a '{card['method']}' model, not '{cls.name}'; "
                f"pass --method {card['method']} or another --model"
            )
        state_path = directory / cls.state_file
        if not state_path.is_file():
            raise InputMissingError(f"{state_path} not found; refit the model at the group level")
        state: dict[str, dict[str, np.ndarray]] = {}
        for key, value in cls._read_state(state_path).items():
            sequence, name = key.split("/", 1)
            state.setdefault(sequence, {})[name] = value
        harmonizer = cls(**card["parameters"])
        harmonizer.state_ = state
        harmonizer.target_site_ = card["target_site"]
        harmonizer.training_ = card["training"]
        return harmonizer

    def reference_quantiles(self, sequence: str) -> np.ndarray:
        """Brain-intensity quantiles of the target reference for ``sequence``."""
        self._check_fitted()
        return self.state_[sequence][REFERENCE_QUANTILES]

    def model_card(self) -> dict[str, Any]:
        """What was fitted, on what, with which parameters: the JSON saved beside the state."""
        self._check_fitted()
        return {
            "method": self.name,
            "description": (type(self).__doc__ or "").strip().splitlines()[0],
            "bids_harmony_version": __version__,
            "parameters": self.params,
            "target_site": self.target_site_,
            "training": self.training_,
        }

    # -- storage (learned harmonizers override: safetensors, loss curves) ------------------
    state_file: ClassVar[str] = "state.npz"

    def _write_state(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        np.savez(path, **arrays)

    @classmethod
    def _read_state(cls, path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    def _add_to_card(self, card: dict[str, Any], staging: Path) -> None:
        """Add method-specific entries to the card (and files to ``staging``) before saving."""

    # -- to implement ----------------------------------------------------------------------
    @abstractmethod
    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        """Return the fitted arrays for one sequence (keys as in ``_state_keys``)."""

    @abstractmethod
    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        """Harmonize one image with one sequence's fitted arrays."""

    # -- helpers ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise NotFittedError(
                f"the {self.name} harmonizer is not fitted; run the group level first "
                "or pass --model DIR"
            )


H = TypeVar("H", bound=Harmonizer)


class HarmonizerRegistry(Mapping[str, type[Harmonizer]]):
    """Harmonizers by name. Learned ones are registered by module path and imported on
    first use, so listing the names (``--help``, the descriptor) never imports PyTorch."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Harmonizer]] = {}
        self._lazy_modules: dict[str, str] = {}

    def add(self, name: str, harmonizer_class: type[Harmonizer]) -> None:
        if name in self._classes:
            raise ValueError(f"harmonizer name '{name}' registered twice")
        self._classes[name] = harmonizer_class

    def add_lazy(self, name: str, module: str) -> None:
        """Announce ``name``; ``module`` registers the class when first imported."""
        self._lazy_modules[name] = module

    def __getitem__(self, name: str) -> type[Harmonizer]:
        if name not in self._classes and name in self._lazy_modules:
            importlib.import_module(self._lazy_modules[name])
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._classes) | set(self._lazy_modules)))

    def __len__(self) -> int:
        return len(set(self._classes) | set(self._lazy_modules))


HARMONIZERS = HarmonizerRegistry()


def register(name: str) -> Callable[[type[H]], type[H]]:
    """Class decorator: make a harmonizer available as ``--method name``."""

    def decorator(cls: type[H]) -> type[H]:
        cls.name = name
        HARMONIZERS.add(name, cls)
        return cls

    return decorator


def read_model_card(directory: Path) -> dict[str, Any]:
    """Read ``model_card.json`` with an error that says how to get one."""
    card_path = Path(directory) / MODEL_CARD
    if not card_path.is_file():
        raise InputMissingError(
            f"{card_path} not found; fit a model with the group level or pass another --model"
        )
    return json.loads(card_path.read_text())


def resolve_target_site(images: Sequence[Volume], sites: Sequence[str], target: str) -> str:
    """Turn ``--target-site`` into a site label (or ``unified``).

    ``auto`` picks the site whose scans are most alike: the lowest mean pairwise 1-D
    Wasserstein distance between the brain intensity distributions of its images, the rule
    the SGCD paper uses to choose its target. A site with a single image has no spread to
    measure, so it is only chosen when no site has two images.
    """
    known = sorted(set(sites))
    if target == UNIFIED:
        return UNIFIED
    if target != AUTO:
        if target not in known:
            raise DataError(
                f"--target-site '{target}' is not a site of this dataset; known sites: "
                f"{', '.join(known)} (or use auto / unified)"
            )
        return target
    from scipy.stats import wasserstein_distance

    spread: dict[str, float] = {}
    for site in known:
        brains = [im.brain for im, s in zip(images, sites) if s == site]
        pairs = [
            wasserstein_distance(a, b) for i, a in enumerate(brains) for b in brains[i + 1:]
        ]
        spread[site] = float(np.mean(pairs)) if pairs else float("inf")
    return min(known, key=lambda s: (spread[s], s))


def checksum_images(images: Sequence[Volume]) -> str:
    """SHA-256 over the training images and masks, recorded in the model card."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(np.ascontiguousarray(image.data, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(image.mask, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def model_checksum(directory: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a saved model's card: what every harmonized sidecar records."""
    return f"sha256:{sha256_file(Path(directory) / MODEL_CARD)}"
