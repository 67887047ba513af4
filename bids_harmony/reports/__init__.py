"""Evaluation and HTML reports of the group level: one call, :func:`write_reports`."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from bids_harmony.bids.derivatives import atomic_write_text
from bids_harmony.bids.layout import AnatImage
from bids_harmony.errors import InputMissingError
from bids_harmony.harmonizers.base import Harmonizer
from bids_harmony.reports.evaluation import GroupImages, evaluate_group, read_ages
from bids_harmony.reports.group import image_counts, write_group_report
from bids_harmony.reports.participant import write_participant_pages
from bids_harmony.workflows.base import derivative_path, mask_desc

LOGGER = logging.getLogger("bids_harmony")
EVALUATION_JSON = "group_evaluation.json"

__all__ = ["EVALUATION_JSON", "GroupImages", "write_reports"]


def write_reports(output_dir: Path, bids_dir: Path, template_name: str, group: GroupImages,
                  harmonizer: Harmonizer) -> Path:
    """Evaluate, then write ``group_evaluation.json``, the group page and participant pages.

    Returns the group report's path.
    """
    start = time.perf_counter()
    evaluation = evaluate_group(group, harmonizer.name, harmonizer.target_site_,
                                read_ages(bids_dir / "participants.tsv"))
    atomic_write_text(output_dir / EVALUATION_JSON,
                      json.dumps(_finite(evaluation), indent=2, allow_nan=False)
                      + "\n")
    report = write_group_report(output_dir, evaluation)
    edges = [_edge_map(output_dir, image, template_name) for image in group.images]
    write_participant_pages(output_dir, group, edges, evaluation["images"])
    LOGGER.info("group report %s written in %.0f s; structure flags: %s", report,
                time.perf_counter() - start, image_counts(evaluation["images"]))
    return report


def _edge_map(output_dir: Path, image: AnatImage, template_name: str) -> np.ndarray:
    path = derivative_path(output_dir, image, template_name, mask_desc("edges", image), "mask")
    if not path.is_file():
        raise InputMissingError(
            f"{path} is missing; run the participant level for sub-{image.subject} first"
        )
    return np.asarray(nb.load(path).dataobj) > 0


def _finite(value: Any) -> Any:
    """JSON-ready copy: numpy scalars become Python numbers, NaN and infinity become null
    (strict JSON has no NaN; e.g. PSNR of identical images is infinite)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
