"""Group level: load every preprocessed image, fit the harmonizer, save it, transform.

A short driver: what to write about the result (tables, figures, pages) is
:func:`bids_harmony.reports.write_group_outputs`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_harmony.bids.layout import AnatImage
from bids_harmony.bids.paths import preprocessed_paths
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles
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


def load_preprocessed(config: RunConfig, image: AnatImage, template: TemplateFiles) -> Volume:
    """Read the ``desc-preproc`` image, its brain mask and its Canny edge map."""
    paths = preprocessed_paths(config.output_dir, image, template.name)
    return load_volume(paths["preproc"], paths["mask"], {EDGES: paths["edges"]})


def build_harmonizer(config: RunConfig) -> Harmonizer:
    """A fresh ``--method`` harmonizer with its ``--harmonizer-param`` values; learned ones
    also get ``--preset``, ``--device``, ``--seed`` and keep resumable training checkpoints
    in the work directory."""
    return from_options(
        config.method, preset=config.preset, device=config.device, seed=config.seed,
        checkpoint_dir=config.work_dir / "checkpoints" / config.method,
        params=dict(config.harmonizer_params),
    )


def fit_group(config: RunConfig, images: Sequence[AnatImage], template: TemplateFiles) -> GroupFit:
    """Load all images, fit ``config.method``, save it under ``models/``, transform them all."""
    volumes = [load_preprocessed(config, image, template) for image in images]
    harmonizer = build_harmonizer(config).fit(
        volumes, [im.site for im in images], [im.suffix for im in images],
        target=config.target_site,
    )
    model_dir = config.output_dir / "models" / f"{config.method}_{harmonizer.target_site_}"
    harmonizer.save(model_dir)
    LOGGER.info("fitted %s to target site %s; saved to %s", config.method,
                harmonizer.target_site_, model_dir)
    harmonized = [harmonizer.transform(vol, im.suffix) for vol, im in zip(volumes, images)]
    return GroupFit(harmonizer, model_dir, images, volumes, harmonized)
