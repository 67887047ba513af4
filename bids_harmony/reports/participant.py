"""``OUTPUT_DIR/sub-<label>.html``: what harmonization did to each of a participant's images.

Per image: a mosaic in three planes (rows: source, harmonized, the Canny edge map of the
source over the harmonized image, harmonized minus source) and its QC numbers with traffic
lights (thresholds in :mod:`bids_harmony.reports.evaluation`). Rendered from the arrays the
group level holds, so the pages exist before the participant level writes any harmonized file.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_harmony.fileio import atomic_path, atomic_write_text
from bids_harmony.reports.evaluation import AMBER_BELOW, FLAGGED_MEASURES, RED_BELOW, GroupImages
from bids_harmony.reports.group import FIGURES, REPORT_NAME
from bids_harmony.reports.html import figure, flag_dot, number, page
from bids_harmony.reports.threads import map_in_threads

# Where in the brain's extent along each axis the three slices of a plane are cut.
SLICE_FRACTIONS = (0.35, 0.5, 0.65)
PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))
QC_COLUMNS = ("structural_ssim", "ncc_vs_source", "ssim_vs_source", "wd_source_vs_target",
              "wd_vs_target", "paired_ssim_before", "paired_ssim_after", "paired_psnr_before",
              "paired_psnr_after")


def write_participant_pages(output_dir: Path, group: GroupImages,
                            edges: Sequence[np.ndarray],
                            rows: Sequence[Mapping[str, Any]], workers: int = 1) -> list[Path]:
    """One page per participant; ``rows`` are the evaluated per-image rows (with flags);
    the mosaics are drawn on ``workers`` threads."""
    (output_dir / FIGURES).mkdir(parents=True, exist_ok=True)

    def draw(index: int) -> tuple[list[tuple[str, int]], float]:
        volume = group.volumes[index]
        return _plot_mosaic(output_dir / _mosaic_name(group.images[index].key), volume.data,
                            group.harmonized[index], edges[index], volume.mask,
                            voxel_mm=min(volume.spacing))

    drawn = map_in_threads(draw, range(len(group.images)), workers)
    by_subject: dict[str, list[int]] = {}
    for index, image in enumerate(group.images):
        by_subject.setdefault(image.subject, []).append(index)
    pages = []
    for subject, indices in sorted(by_subject.items()):
        sections = []
        for index in sorted(indices, key=lambda i: group.images[i].key):
            image = group.images[index]
            slices, limit = drawn[index]
            sections.append(_image_section(image.key, image.site, rows[index],
                                           _mosaic_name(image.key),
                                           _mosaic_caption(slices, limit)))
        body = "\n".join([
            f"<h1>sub-{html.escape(subject)}</h1>",
            f"<p><a href=\"{REPORT_NAME}\">group report</a></p>",
            f"<p class=\"note\">Traffic lights: red when a measure of structure kept (structural "
            f"SSIM, NCC vs the source) is below {RED_BELOW}, amber below {AMBER_BELOW}, green "
            "otherwise: a harmonizer should change intensities, not anatomy.</p>",
            *sections,
        ])
        path = output_dir / f"sub-{subject}.html"
        atomic_write_text(path, page(f"sub-{subject}: bids_harmony", body))
        pages.append(path)
    return pages


def _mosaic_name(key: str) -> str:
    return f"{FIGURES}/{key}_mosaic.png"


def _image_section(key: str, site: str, row: Mapping[str, Any], mosaic: str,
                   caption: str) -> str:
    cells = []
    for column in QC_COLUMNS:
        if column not in row:
            continue
        css = ""
        if column in FLAGGED_MEASURES:
            value = float(row[column])
            css = "red" if value < RED_BELOW else "amber" if value < AMBER_BELOW else ""
        cells.append((column, number(row[column]), css))
    qc_table = "<table><tbody>" + "".join(
        f"<tr><th class=\"text\">{name}</th>"
        f"<td{f' class=flag-{css}' if css else ''}>{value}</td></tr>"
        for name, value, css in cells) + "</tbody></table>"
    return "\n".join([
        f"<h2 id=\"{html.escape(key)}\">{html.escape(key)}</h2>",
        f"<p>site {html.escape(site)}{' (target)' if row.get('is_target') else ''}; "
        f"structure kept: {flag_dot(row['flag'])}</p>",
        _preprocessing_note(row),
        qc_table,
        figure(mosaic, f"{key}: source, harmonized, edges, difference"),
        f"<p class=\"note\">{html.escape(caption)}</p>",
    ])


def _preprocessing_note(row: Mapping[str, Any]) -> str:
    """A red line when preprocessing QC flagged the image, else nothing."""
    flags = row.get("preprocessing_flags", "n/a")
    if flags == "n/a":
        return ""
    fitted = ("the model was fitted on it (--keep-flagged)" if row.get("fitted_on")
              else "left out of fitting")
    return (f"<p class=\"alarm\">Preprocessing QC flagged this image: "
            f"{html.escape(flags)} (registration: it does not sit on the template; "
            f"not_brain_like: no brain's structure or size there); {fitted}.</p>")


def _plot_mosaic(path: Path, source: np.ndarray, harmonized: np.ndarray, edges: np.ndarray,
                 mask: np.ndarray, voxel_mm: float) -> tuple[list[tuple[str, int]], float]:
    """Rows: source, harmonized, source edges (red) over harmonized, harmonized - source
    (blue-white-red, ± a limit); each row the nine slices side by side (:func:`_strip`),
    white between them. Returns the slices (plane, index) and the limit, for the caption.

    The rows are composed as one RGB array and written as a PNG: Matplotlib's axes, text
    and colour bar took 0.55 s a mosaic, half of the group report's time; the labels are
    in the page's caption instead (:func:`_mosaic_caption`). Each voxel is drawn as a
    block of :data:`PIXELS_PER_MM` pixels per mm, so 1 and 2 mm grids show at one size.
    """
    from matplotlib import colormaps
    from PIL import Image

    cuts = _slice_positions(mask)
    slices = [(plane, axis, position) for plane, axis in PLANES for position in cuts[axis]]
    difference = np.where(mask, harmonized - source, 0.0)
    limit = max(float(np.abs(difference).max()), 1e-6)
    gray = np.clip(_strip(source, slices), 0.0, 1.0)
    harmonized_strip = np.clip(_strip(harmonized, slices), 0.0, 1.0)
    edge_strip = _strip(edges, slices) > 0.5
    difference_strip = _strip(difference, slices) / (2 * limit) + 0.5

    def as_rgb(strip: np.ndarray) -> np.ndarray:
        return np.repeat(np.nan_to_num(strip, nan=1.0)[..., None], 3, axis=2)

    overlay = as_rgb(harmonized_strip)
    overlay[edge_strip] = (1.0, 0.1, 0.0)
    diverging = colormaps["RdBu_r"](np.nan_to_num(difference_strip, nan=0.5))[..., :3]
    diverging[np.isnan(difference_strip)] = 1.0
    rows = [as_rgb(gray), as_rgb(harmonized_strip), overlay, diverging]
    gap = np.ones((ROW_GAP, gray.shape[1], 3))
    picture = np.concatenate([part for row in rows for part in (row[::-1], gap)][:-1])
    scale = max(1, round(PIXELS_PER_MM * voxel_mm))
    pixels = np.round(picture * 255).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path) as partial:
        Image.fromarray(pixels).save(partial, format="PNG", compress_level=PNG_COMPRESSION)
    return [(plane, position) for plane, _, position in slices], limit


def _mosaic_caption(slices: Sequence[tuple[str, int]], limit: float) -> str:
    """What the mosaic shows, row by row and slice by slice."""
    where = ", ".join(f"{plane} {position}" for plane, position in slices)
    return (f"rows: source; harmonized; source edges (red) over harmonized; harmonized − "
            f"source (blue −{limit:.3f} to red +{limit:.3f}). Slices (voxel index): {where}")


#: Blank columns between two slices of a mosaic row, and blank rows between two rows.
STRIP_GAP = 4
ROW_GAP = 3
#: Mosaic pixels per mm of the template grid.
PIXELS_PER_MM = 1.0
#: zlib level of the mosaic PNGs: 1 writes them 4x faster than the default 6, 20 % larger.
PNG_COMPRESSION = 1


def _strip(volume: np.ndarray, slices: Sequence[tuple[str, int, int]]) -> np.ndarray:
    """The slices of ``volume`` (each transposed to display with the origin at the bottom)
    side by side, bottom-aligned, NaN between and above them."""
    cuts = [volume[(slice(None),) * axis + (position,)].T for _, axis, position in slices]
    height = max(cut.shape[0] for cut in cuts)
    width = sum(cut.shape[1] for cut in cuts) + STRIP_GAP * (len(cuts) - 1)
    strip = np.full((height, width), np.nan, dtype=np.float32)
    left = 0
    for cut in cuts:
        strip[:cut.shape[0], left:left + cut.shape[1]] = cut
        left += cut.shape[1] + STRIP_GAP
    return strip


def _slice_positions(mask: np.ndarray) -> dict[int, list[int]]:
    """Per axis, the voxel indices at :data:`SLICE_FRACTIONS` of the brain's extent."""
    positions = {}
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low, high = (present[0], present[-1]) if present.size else (0, mask.shape[axis] - 1)
        positions[axis] = [int(round(low + f * (high - low))) for f in SLICE_FRACTIONS]
    return positions
