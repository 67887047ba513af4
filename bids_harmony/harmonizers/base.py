"""The contract every harmonizer follows and the model card it saves.

A harmonizer works on images already in template space and normalised to [0, 1] inside the
brain mask (the pipeline's ``desc-preproc`` output). It is fitted once (``group`` level) on
many images with their site and sequence labels, saved without pickle (``.npz`` or
safetensors beside ``model_card.json``) and applied per image (``participant`` level).

Fitted state lives in attributes ending in ``_`` that only ``fit`` and ``load`` set, as in
scikit-learn; ``transform`` and ``save`` before that raise :class:`NotFittedError`. The state
file holds ``<sequence>/<name>`` arrays and, for arrays that serve every sequence (one network
for T1w and T2w), ``_shared/<name>`` once.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from bids_harmony import __version__
from bids_harmony.errors import DataError, InputMissingError, NotFittedError, UsageError
from bids_harmony.fileio import atomic_directory, sha256_file
from bids_harmony.metrics.similarity import sorted_values, wasserstein_sorted
from bids_harmony.volume import Volume

MODEL_CARD = "model_card.json"
UNIFIED = "unified"
AUTO = "auto"
# Quantiles of the target reference's brain intensities, kept for every method so QC can
# measure how close a harmonized image's distribution came to the target (Wasserstein).
REFERENCE_QUANTILES = "reference_quantiles"
#: Prefix of the state-file arrays that serve every sequence. BIDS suffixes are alphanumeric,
#: so no sequence can take this name.
SHARED = "_shared"


@dataclass(frozen=True)
class TrainingSet:
    """What a fit may learn from, by sequence: the target site's reference images and every
    image with its site. Blind methods learn from ``references`` only; multi-site methods
    (SGCD, UMH: a first stage on all sites) also need ``images`` and ``sites``."""

    target_site: str
    references: Mapping[str, Sequence[Volume]]
    images: Mapping[str, Sequence[Volume]]
    sites: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class FittedState:
    """What ``_fit_sequences`` learned: arrays per sequence and arrays shared by all of them."""

    sequences: dict[str, dict[str, np.ndarray]]
    shared: dict[str, np.ndarray] = field(default_factory=dict)


class Harmonizer(ABC):
    """Base of all harmonizers: ``fit`` / ``transform`` / ``save`` / ``load``.

    Subclasses implement ``_transform_sequence`` and either ``_fit_sequence`` (learn one
    sequence's arrays from its target reference images) or, to fit every sequence at once
    and share arrays between them, ``_fit_sequences``. ``_transform_sequence`` sees the
    sequence's arrays together with the shared ones.
    """

    name: ClassVar[str]
    #: Size presets of a learned harmonizer (``--preset``); classical ones have none.
    presets: ClassVar[tuple[str, ...]] = ()
    #: The paper of the method, listed under References in logs/CITATION.md ("" for none).
    citation: ClassVar[str] = ""

    def __init__(self, *, checkpoint_dir: Path | None = None, **params: Any) -> None:
        """``params`` are the settings the model card records; ``checkpoint_dir`` is where a
        learned harmonizer keeps training checkpoints to resume from (the group level passes
        the work directory's ``checkpoints/<method>``; ``None`` trains without them)."""
        self.params: dict[str, Any] = dict(params)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)

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
        references: dict[str, list[Volume]] = {}
        for sequence in sorted(set(sequences)):
            references[sequence] = [
                im for im, site, s in zip(images, sites, sequences)
                if s == sequence and (target_site == UNIFIED or site == target_site)
            ]
            if not references[sequence]:
                raise DataError(
                    f"target site '{target_site}' has no {sequence} image to learn from; "
                    "choose another --target-site or drop that --suffix"
                )
        fitted = self._fit_sequences(TrainingSet(
            target_site=target_site,
            references=references,
            images={seq: [im for im, s in zip(images, sequences) if s == seq] for seq in references},
            sites={seq: [site for site, s in zip(sites, sequences) if s == seq]
                   for seq in references},
        ))
        per_sequence = {sequence: dict(arrays) for sequence, arrays in fitted.sequences.items()}
        for sequence, reference in references.items():
            per_sequence.setdefault(sequence, {})[REFERENCE_QUANTILES] = np.quantile(
                np.concatenate([im.brain for im in reference]), np.linspace(0.0, 1.0, 1001)
            ).astype(np.float32)
        # transform hands a sequence's arrays and the shared ones over in one mapping.
        clashes = set(fitted.shared) & {key for arrays in per_sequence.values() for key in arrays}
        if clashes:
            raise ValueError(f"{self.name} fitted {sorted(clashes)} both shared and per sequence")
        self.state_ = per_sequence
        self.shared_state_ = dict(fitted.shared)
        self.target_site_ = target_site
        self.training_ = {
            "sites": sorted(set(sites)),
            "sequences": sorted(set(sequences)),
            "n_images": len(images),
            # The target-site images per sequence: all that a blind method learns from.
            "reference_images": {sequence: len(ims) for sequence, ims in references.items()},
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
        out = self._transform_sequence(image, {**self.shared_state_, **self.state_[sequence]})
        mask = image.mask.astype(bool)
        return np.where(mask, out, 0.0).astype(np.float32)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the state file and ``model_card.json`` into ``directory`` atomically."""
        self._check_fitted()
        directory = Path(directory)
        owners = {**self.state_, SHARED: self.shared_state_}
        arrays = {
            f"{owner}/{key}": np.ascontiguousarray(value)
            for owner, owned in owners.items()
            for key, value in owned.items()
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
        card = verify_model(directory, cls.name)
        state_path = directory / cls.state_file
        state: dict[str, dict[str, np.ndarray]] = {}
        for key, value in cls._read_state(state_path).items():
            owner, name = key.split("/", 1)
            state.setdefault(owner, {})[name] = value
        harmonizer = cls(**card["parameters"])
        harmonizer.shared_state_ = state.pop(SHARED, {})
        harmonizer.state_ = state
        harmonizer.target_site_ = card["target_site"]
        harmonizer.training_ = card["training"]
        return harmonizer

    def reference_quantiles(self, sequence: str) -> np.ndarray:
        """Brain-intensity quantiles of the target reference for ``sequence``."""
        self._check_fitted()
        return self.state_[sequence][REFERENCE_QUANTILES]

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per sequence, what training measured on held-out data and whether the model
        learned (learned harmonizers); a method with nothing to learn has none."""
        return {}

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
    def _fit_sequences(self, training: TrainingSet) -> FittedState:
        """Fit every sequence at once. The default fits each on its own from its target
        reference images; a method whose weights serve several sequences (or that learns
        from every site) overrides this and returns shared weights in ``FittedState.shared``."""
        return FittedState({
            sequence: self._fit_sequence(reference)
            for sequence, reference in training.references.items()
        })

    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        """Return the fitted arrays of one sequence."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _fit_sequence "
                                  "nor _fit_sequences")

    @abstractmethod
    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        """Harmonize one image with its sequence's fitted arrays and the shared ones."""

    # -- helpers ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise NotFittedError(
                f"the {self.name} harmonizer is not fitted; run the group level first "
                "or pass --model DIR"
            )


H = TypeVar("H", bound=Harmonizer)


def read_model_card(directory: Path) -> dict[str, Any]:
    """Read ``model_card.json`` with an error that says how to get one."""
    card_path = Path(directory) / MODEL_CARD
    if not card_path.is_file():
        raise InputMissingError(
            f"{card_path} not found; fit a model with the group level or pass another --model"
        )
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{card_path} is not valid JSON ({error}); the model is damaged: refit "
                        "it at the group level") from None
    missing = [key for key in CARD_KEYS if not isinstance(card, dict) or key not in card]
    if missing:
        raise DataError(f"{card_path} lacks {', '.join(missing)}; the model is damaged or not "
                        "bids_harmony's: refit it at the group level")
    return card


#: What every saved model card holds (``save`` writes them; ``load`` needs them).
CARD_KEYS = ("method", "parameters", "target_site", "training", "state_file", "state_sha256")


def verify_model(directory: Path, method: str,
                 sequences: Sequence[str] = ()) -> dict[str, Any]:
    """The card of a saved model, after checking it is ``method``'s, fitted for every one of
    ``sequences``, and that its state file is the one the card's checksum names (a truncated
    or edited state gave an all-zero image whose QC read 1.0). Cheap enough to run before
    preprocessing starts."""
    card = read_model_card(directory)
    card_path = Path(directory) / MODEL_CARD
    if card["method"] != method:
        raise UsageError(f"{card_path} holds a '{card['method']}' model, not '{method}'; "
                         f"pass --method {card['method']} or another --model")
    fitted = card["training"].get("sequences", [])
    unfitted = sorted(set(sequences) - set(fitted))
    if unfitted:
        raise DataError(f"the model in {directory} was fitted on {', '.join(fitted)} but not "
                        f"{', '.join(unfitted)}; select those with --suffix, or refit it with "
                        "them at the group level")
    state_path = Path(directory) / card["state_file"]
    if not state_path.is_file():
        raise InputMissingError(f"{state_path} not found; refit the model at the group level")
    if sha256_file(state_path) != card["state_sha256"]:
        raise DataError(f"{state_path} does not match the SHA-256 its model card records: it "
                        "was modified or truncated; restore it or refit the model")
    return card


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
    spread: dict[str, float] = {}
    for site in known:
        brains = [sorted_values(im.brain) for im, s in zip(images, sites) if s == site]
        pairs = [
            wasserstein_sorted(a, b) for i, a in enumerate(brains) for b in brains[i + 1:]
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
