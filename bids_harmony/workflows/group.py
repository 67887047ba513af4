"""Group level: load every preprocessed image, fit the harmonizer, save it, transform.

A short driver: what to write about the result (tables, figures, pages) is
:func:`bids_harmony.reports.write_group_outputs`'s job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_harmony.bids.layout import AnatImage
from bids_harmony.bids.paths import preprocessed_paths, sidecar_path
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.errors import DataError
from bids_harmony.harmonizers import Harmonizer, from_options
from bids_harmony.volume import EDGES, Volume, load_volume

LOGGER = logging.getLogger("bids_harmony")


@dataclass(frozen=True)
class GroupFit:
    """A fitted, saved harmonizer and what it made of every image of the group."""

    harmonizer: Harmonizer
    model_dir: Path
    images: Sequence[AnatImage]
    volumes: Sequence[Volume]
    harmonized: Sequence[np.ndarray]
    #: Per image, the preprocessing QC flags of its ``desc-preproc`` sidecar (empty: passed).
    qc_flags: Sequence[Sequence[str]]
    #: Per image, whether the harmonizer was fitted on it (flagged images are not, unless
    #: ``--keep-flagged``); every image is transformed.
    fitted_on: Sequence[bool]


def load_preprocessed(config: RunConfig, image: AnatImage, template: TemplateFiles) -> Volume:
    """Read the ``desc-preproc`` image, its brain mask and its Canny edge map."""
    paths = preprocessed_paths(config.output_dir, image, template.name)
    return load_volume(paths["preproc"], paths["mask"], {EDGES: paths["edges"]})


def preprocessing_flags(config: RunConfig, image: AnatImage, template: TemplateFiles
                        ) -> list[str]:
    """The ``QCFlags`` the participant level wrote in the image's ``desc-preproc`` sidecar
    (:mod:`bids_harmony.metrics.preprocessing`)."""
    sidecar = sidecar_path(preprocessed_paths(config.output_dir, image, template.name)["preproc"])
    if not sidecar.exists():  # written by an older version or another tool: not checked
        LOGGER.warning("%s is missing: its preprocessing QC is unknown", sidecar)
        return []
    try:
        return list(json.loads(sidecar.read_text()).get("QCFlags", []))
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(f"{sidecar}: cannot read its QCFlags ({error}); delete the image's "
                        "desc-preproc files and rerun") from error


def _images_to_fit(images: Sequence[AnatImage], flags: Sequence[Sequence[str]],
                   keep_flagged: bool) -> list[bool]:
    """Which images the harmonizer learns from: those whose preprocessing passed its QC (or
    all with ``keep_flagged``); a site or sequence left with none is an error."""
    fitted_on = [keep_flagged or not flag for flag in flags]
    flagged = [f"{im.key} ({', '.join(flag)})" for im, flag in zip(images, flags) if flag]
    if flagged and not keep_flagged:
        LOGGER.warning("left out of fitting, preprocessing QC flagged %d image(s): %s; look at "
                       "them, or pass --keep-flagged to fit on them", len(flagged),
                       "; ".join(flagged))
    for kind, values in (("site", [im.site for im in images]),
                         ("sequence", [im.suffix for im in images])):
        lost = sorted(set(values) - {v for v, kept in zip(values, fitted_on) if kept})
        if lost:
            raise DataError(f"preprocessing QC flagged every image of {kind} "
                            f"{', '.join(lost)}: {'; '.join(flagged)}; check the inputs and "
                            "their desc-preproc images, or pass --keep-flagged")
    return fitted_on


def build_harmonizer(config: RunConfig) -> Harmonizer:
    """A fresh ``--method`` harmonizer with its ``--harmonizer-param`` values; learned ones
    also get ``--preset``, ``--device``, ``--seed`` and keep resumable training checkpoints
    in the work directory."""
    return from_options(
        config.method, preset=config.preset, device=config.device, seed=config.seed,
        checkpoint_dir=config.work_dir / "checkpoints" / config.method,
        params=dict(config.harmonizer_params),
    )


def fit_group(config: RunConfig, images: Sequence[AnatImage], template: TemplateFiles
              ) -> GroupFit | None:
    """Load all images, fit ``config.method`` on those preprocessing QC passed (all with
    ``--keep-flagged``), save it under ``models/``, transform them all.

    Under ``torchrun`` every rank fits (the learned harmonizers train data-parallel, see
    :mod:`bids_harmony.nn.distributed`) and rank 0 alone saves and transforms; the others
    return ``None``.
    """
    volumes = [load_preprocessed(config, image, template) for image in images]
    flags = [preprocessing_flags(config, image, template) for image in images]
    fitted_on = _images_to_fit(images, flags, config.keep_flagged)
    kept = [index for index, fit in enumerate(fitted_on) if fit]
    harmonizer = build_harmonizer(config).fit(
        [volumes[i] for i in kept], [images[i].site for i in kept],
        [images[i].suffix for i in kept], target=config.target_site,
    )
    from bids_harmony.nn import distributed

    if not distributed.is_main():
        return None
    model_dir = config.output_dir / "models" / f"{config.method}_{harmonizer.target_site_}"
    harmonizer.save(model_dir)
    LOGGER.info("fitted %s to target site %s; saved to %s", config.method,
                harmonizer.target_site_, model_dir)
    harmonized = [harmonizer.transform(vol, im.suffix) for vol, im in zip(volumes, images)]
    return GroupFit(harmonizer, model_dir, images, volumes, harmonized, flags, fitted_on)
