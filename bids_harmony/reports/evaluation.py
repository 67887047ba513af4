"""The group evaluation: did the site effect go and did the anatomy stay, per sequence.

Computed on the template-space volumes and harmonized arrays the group level already holds,
before (source images) and after (harmonized images):

- site effect: site classification from image features, pairwise site Wasserstein distances
  and luminance SSIM between site mean images, brain-age error when ages are known;
- traveling subjects: each source-site scan vs the same subject's target-site scan;
- anatomy: tissue Dice and anatomical-preservation score of harmonized vs source and, for
  traveling subjects, vs the target scan's segmentation.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bids_harmony import __version__
from bids_harmony.bids.layout import AnatImage, traveling_pairs
from bids_harmony.errors import DataError
from bids_harmony.volume import Volume
from bids_harmony.metrics.anatomy import (
    INTENSITY_ORDER,
    TISSUES,
    anatomical_preservation,
    segment_tissues,
    tissue_dice,
)
from bids_harmony.metrics.similarity import wasserstein
from bids_harmony.metrics.site_effect import (
    classify_sites,
    image_features,
    off_diagonal,
    predict_brain_age,
    site_luminance_ssim,
    site_wasserstein_matrix,
)
from bids_harmony.reports.threads import map_in_threads

STAGES = ("before", "after")
FEATURES_NOTE = (
    "Site classification uses hand-made features (brain and per-tissue intensity quantiles, "
    "gradient-magnitude and local-standard-deviation quantiles), not the papers' deep ResNet "
    "features: no pretrained weights are available offline."
)
# Traffic lights of the hallucination guard on structure kept vs the source (structural SSIM
# and NCC): below RED_BELOW the harmonizer changed anatomy, below AMBER_BELOW look at it.
# Intensity-only methods keep both above 0.97 on the demo; paper 002 reports structural
# SSIM 0.97 after harmonization.
RED_BELOW = 0.90
AMBER_BELOW = 0.95
FLAGGED_MEASURES = ("structural_ssim", "ncc_vs_source")


@dataclass(frozen=True)
class GroupImages:
    """What the group level holds for each image: identity, source volume, harmonized data."""

    images: Sequence[AnatImage]
    volumes: Sequence[Volume]
    harmonized: Sequence[np.ndarray]
    qc_rows: Sequence[Mapping[str, Any]]


def structure_flag(row: Mapping[str, Any]) -> str:
    """``red`` / ``amber`` / ``green`` from the worst of :data:`FLAGGED_MEASURES`; ``red``
    whatever they say when preprocessing QC flagged the image (a misregistered or non-brain
    input keeps its own structure perfectly)."""
    if row.get("preprocessing_flags", "n/a") != "n/a":
        return "red"
    values = [float(row[k]) for k in FLAGGED_MEASURES if _is_number(row.get(k))]
    if not values:
        return "grey"
    worst = min(values)
    if worst < RED_BELOW:
        return "red"
    return "amber" if worst < AMBER_BELOW else "green"


def read_ages(participants_tsv: Path, column: str = "age") -> dict[str, float]:
    """Participant label (no ``sub-``) -> age, from ``participants.tsv``; empty if absent."""
    if not participants_tsv.is_file():
        return {}
    with participants_tsv.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    ages = {}
    for row in rows:
        value = row.get(column)
        if _is_number(value):
            ages[row["participant_id"].removeprefix("sub-")] = float(value)
    return ages


def evaluate_group(group: GroupImages, method: str, target_site: str,
                   ages: Mapping[str, float], workers: int = 1) -> dict[str, Any]:
    """Every measure, per sequence, as JSON-ready numbers (plus per-image rows: the QC rows
    with the paired and tissue measures and the structure flag added); per-image measures
    on ``workers`` threads."""
    image_rows = [dict(row) for row in group.qc_rows]
    sequences = {}
    for suffix in sorted({im.suffix for im in group.images}):
        indices = [i for i, im in enumerate(group.images) if im.suffix == suffix]
        sequences[suffix], columns = _evaluate_sequence(group, indices, target_site, ages,
                                                        workers)
        for k, index in enumerate(indices):
            image_rows[index].update(columns[k])
    for row in image_rows:
        row["flag"] = structure_flag(row)
    return {
        "method": method, "target_site": target_site, "bids_harmony_version": __version__,
        "features_note": FEATURES_NOTE,
        "flag_thresholds": {"measures": list(FLAGGED_MEASURES), "red_below": RED_BELOW,
                            "amber_below": AMBER_BELOW},
        "sequences": sequences, "images": image_rows,
    }


def _evaluate_sequence(group: GroupImages, indices: Sequence[int], target_site: str,
                       ages: Mapping[str, float], workers: int
                       ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The sequence's measures, and the columns each of its images adds to its row."""
    images = [group.images[i] for i in indices]
    stages = {
        "before": [group.volumes[i] for i in indices],
        "after": [Volume(group.harmonized[i], group.volumes[i].mask) for i in indices],
    }
    suffix = images[0].suffix
    sites = [im.site for im in images]
    result: dict[str, Any] = {"sites": sorted(set(sites)), "n_images": len(images)}
    labels = _segmentations(stages, suffix, workers)

    def features_of(stage: str, k: int) -> list[float]:
        return list(image_features(stages[stage][k], labels[stage][k] if labels else None,
                                   TISSUES if labels else ()).values())

    features = {
        stage: np.array(map_in_threads(lambda k, stage=stage: features_of(stage, k),
                                       range(len(images)), workers))
        for stage in STAGES
    }
    result["site_classification"] = _per_stage(
        lambda stage: classify_sites(features[stage], sites).to_dict())
    known = [k for k, im in enumerate(images) if im.subject in ages]
    result["brain_age"] = (
        _per_stage(lambda stage: predict_brain_age(
            features[stage][known], [ages[images[k].subject] for k in known],
            [images[k].subject for k in known]).to_dict())
        if known else {"skipped": "participants.tsv has no age column"}
    )
    result["site_wasserstein"] = _site_matrices(stages, sites, _wasserstein_by_site)
    result["site_luminance_ssim"] = _site_matrices(stages, sites, _luminance_by_site)
    columns: list[dict[str, float]] = [{} for _ in indices]
    result["traveling_subjects"], paired_columns = _traveling(
        images, stages, target_site, [group.qc_rows[i] for i in indices])
    for k, values in paired_columns.items():
        columns[k].update(values)
    if labels:
        result["tissues"], tissue_columns = _tissues(images, labels, target_site)
        for k, values in enumerate(tissue_columns):
            columns[k].update(values)
    else:
        result["tissues"] = {"skipped": f"no tissue intensity order known for {suffix}"}
    return result, columns


def _segmentations(stages: Mapping[str, Sequence[Volume]], suffix: str, workers: int
                   ) -> dict[str, list[np.ndarray]] | None:
    if suffix not in INTENSITY_ORDER:
        return None
    return {stage: map_in_threads(lambda vol: segment_tissues(vol, suffix), stages[stage],
                                  workers)
            for stage in STAGES}


def _per_stage(measure: Any) -> dict[str, Any]:
    """``{before: ..., after: ...}``, or ``{skipped: reason}`` when the data cannot support it."""
    try:
        return {stage: measure(stage) for stage in STAGES}
    except DataError as error:
        return {"skipped": str(error)}


def _wasserstein_by_site(volumes: Sequence[Volume], sites: Sequence[str]
                         ) -> tuple[list[str], np.ndarray]:
    by_site: dict[str, list[np.ndarray]] = {}
    for vol, site in zip(volumes, sites):
        by_site.setdefault(site, []).append(vol.brain)
    return site_wasserstein_matrix(by_site)


def _luminance_by_site(volumes: Sequence[Volume], sites: Sequence[str]
                       ) -> tuple[list[str], np.ndarray]:
    common = np.logical_and.reduce([vol.mask.astype(bool) for vol in volumes])
    means = {
        site: np.mean([vol.data for vol, s in zip(volumes, sites) if s == site], axis=0)
        for site in set(sites)
    }
    return site_luminance_ssim(means, common)


def _site_matrices(stages: Mapping[str, Sequence[Volume]], sites: Sequence[str],
                   measure: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in STAGES:
        names, matrix = measure(stages[stage], sites)
        pairs = off_diagonal(matrix)
        out["sites"] = names
        out[stage] = matrix.tolist()
        out[f"mean_{stage}"] = float(pairs.mean()) if pairs.size else float("nan")
        out[f"sd_{stage}"] = float(pairs.std()) if pairs.size else float("nan")
    return out


def _traveling(images: Sequence[AnatImage], stages: Mapping[str, Sequence[Volume]],
               target_site: str, qc_rows: Sequence[Mapping[str, Any]]
               ) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """Paired measures of each source scan vs its subject's target-site scan, per site, and
    the columns they add to each paired image's row.

    SSIM, PSNR and Pearson come from the group QC rows (``paired_*``); the histogram
    Wasserstein distance to the target scan's brain intensities is computed here.
    """
    per_site: dict[str, list[dict[str, float]]] = {}
    columns: dict[int, dict[str, float]] = {}
    for k, paired in traveling_pairs(images, target_site).items():
        image = images[k]
        source, target = stages["before"][k], stages["before"][paired]
        harmonized = stages["after"][k].data
        measures = {key: float(value) for key, value in qc_rows[k].items()
                    if key.startswith("paired_")}
        measures["paired_wd_before"] = wasserstein(source.brain, target.brain)
        measures["paired_wd_after"] = wasserstein(harmonized[source.mask.astype(bool)],
                                                  target.brain)
        columns[k] = {"paired_wd_before": measures["paired_wd_before"],
                      "paired_wd_after": measures["paired_wd_after"]}
        per_site.setdefault(image.site, []).append(measures)
    return {site: _mean_rows(rows) for site, rows in sorted(per_site.items())}, columns


def _tissues(images: Sequence[AnatImage], labels: Mapping[str, Sequence[np.ndarray]],
             target_site: str) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Dice and APS of harmonized vs source (every image) and vs the target scan (pairs),
    and the columns the vs-source measures add to each image's row."""
    pairs = traveling_pairs(images, target_site)
    vs_source, vs_target, columns = [], [], []
    for k in range(len(images)):
        before, after = labels["before"][k], labels["after"][k]
        measures = {f"dice_{t}": v for t, v in tissue_dice(before, after).items()}
        measures.update({f"aps_{t}": v for t, v in anatomical_preservation(before, after).items()})
        columns.append({f"tissue_{name}_vs_source": value for name, value in measures.items()})
        vs_source.append(measures)
        if k in pairs:
            reference = labels["before"][pairs[k]]
            paired: dict[str, float] = {}
            for stage, seg in (("before", before), ("after", after)):
                paired.update({f"dice_{t}_{stage}": v
                               for t, v in tissue_dice(reference, seg).items()})
                paired.update({f"aps_{t}_{stage}": v
                               for t, v in anatomical_preservation(reference, seg).items()})
            vs_target.append(paired)
    return {"method": "3-class k-means of brain intensities (scikit-learn)",
            "vs_source": _mean_rows(vs_source), "vs_target": _mean_rows(vs_target),
            "n_pairs": len(vs_target)}, columns


def _mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({key for row in rows for key in row})
    return {key: float(np.nanmean([row[key] for row in rows if key in row])) for key in keys}


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
