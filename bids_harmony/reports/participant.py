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

from bids_harmony.fileio import atomic_write_text
from bids_harmony.reports.evaluation import AMBER_BELOW, FLAGGED_MEASURES, RED_BELOW, GroupImages
from bids_harmony.reports.group import FIGURES, REPORT_NAME
from bids_harmony.reports.html import figure, flag_dot, number, page, save_figure

# Where in the brain's extent along each axis the three slices of a plane are cut.
SLICE_FRACTIONS = (0.35, 0.5, 0.65)
PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))
QC_COLUMNS = ("structural_ssim", "ncc_vs_source", "ssim_vs_source", "wd_source_vs_target",
              "wd_vs_target", "paired_ssim_before", "paired_ssim_after", "paired_psnr_before",
              "paired_psnr_after")


def write_participant_pages(output_dir: Path, group: GroupImages,
                            edges: Sequence[np.ndarray],
                            rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """One page per participant; ``rows`` are the evaluated per-image rows (with flags)."""
    (output_dir / FIGURES).mkdir(parents=True, exist_ok=True)
    by_subject: dict[str, list[int]] = {}
    for index, image in enumerate(group.images):
        by_subject.setdefault(image.subject, []).append(index)
    pages = []
    for subject, indices in sorted(by_subject.items()):
        sections = []
        for index in sorted(indices, key=lambda i: group.images[i].key):
            image = group.images[index]
            mosaic = f"{FIGURES}/{image.key}_mosaic.png"
            _plot_mosaic(output_dir / mosaic, group.volumes[index].data,
                         group.harmonized[index], edges[index], group.volumes[index].mask,
                         title=f"{image.key} ({image.site})")
            sections.append(_image_section(image.key, image.site, rows[index], mosaic))
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


def _image_section(key: str, site: str, row: Mapping[str, Any], mosaic: str) -> str:
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
                 mask: np.ndarray, title: str) -> None:
    """Rows: source, harmonized, source edges (red) over harmonized, harmonized - source.

    Each row is one image, the nine slices side by side (:func:`_strip`): four axes instead of
    one per slice, which made these pages most of the group report's time (36 axes a figure).
    """
    from matplotlib.figure import Figure

    cuts = _slice_positions(mask)
    slices = [(plane, axis, position) for plane, axis in PLANES for position in cuts[axis]]
    difference = np.where(mask, harmonized - source, 0.0)
    limit = max(float(np.abs(difference).max()), 1e-6)
    strips = {name: _strip(volume, slices) for name, volume in (
        ("source", source), ("harmonized", harmonized), ("difference", difference),
        ("edges", edges.astype(np.float32)))}
    height, width = strips["source"][0].shape
    figure_ = Figure(figsize=(1.6 * len(slices), 6.4))
    axes = figure_.subplots(4, 1, gridspec_kw={"hspace": 0.08})
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1, "origin": "lower", "aspect": "equal"}
    axes[0].imshow(strips["source"][0], **gray)
    axes[1].imshow(strips["harmonized"][0], **gray)
    axes[2].imshow(strips["harmonized"][0], **gray)
    axes[2].imshow(np.ma.masked_less(strips["edges"][0], 0.5), cmap="autumn", vmin=1, vmax=2,
                   origin="lower", interpolation="nearest", aspect="equal")
    shown = axes[3].imshow(strips["difference"][0], cmap="RdBu_r", vmin=-limit, vmax=limit,
                           origin="lower", aspect="equal")
    for (plane, _, position), left in zip(slices, strips["source"][1]):
        axes[0].text(left + 2, height + 2, f"{plane} {position}", fontsize=7, va="bottom")
    for axis, label in zip(axes, ("source", "harmonized", "edges / harmonized",
                                  "harmonized − source")):
        axis.set_axis_off()
        axis.set_xlim(-0.5, width - 0.5)
        axis.text(-0.005, 0.5, label, transform=axis.transAxes, rotation=90, ha="right",
                  va="center", fontsize=8)
    figure_.colorbar(shown, cax=axes[3].inset_axes((1.005, 0.1, 0.008, 0.8)))
    figure_.suptitle(title, fontsize=9)
    save_figure(figure_, path)


#: Blank columns between two slices of a mosaic row.
STRIP_GAP = 4


def _strip(volume: np.ndarray, slices: Sequence[tuple[str, int, int]]
           ) -> tuple[np.ndarray, list[int]]:
    """The slices of ``volume`` (each transposed to display with the origin at the bottom)
    side by side, bottom-aligned, NaN between and above them; and each slice's first column."""
    cuts = [np.take(volume, position, axis=axis).T for _, axis, position in slices]
    height = max(cut.shape[0] for cut in cuts)
    width = sum(cut.shape[1] for cut in cuts) + STRIP_GAP * (len(cuts) - 1)
    strip = np.full((height, width), np.nan, dtype=np.float32)
    lefts, left = [], 0
    for cut in cuts:
        strip[:cut.shape[0], left:left + cut.shape[1]] = cut
        lefts.append(left)
        left += cut.shape[1] + STRIP_GAP
    return strip, lefts


def _slice_positions(mask: np.ndarray) -> dict[int, list[int]]:
    """Per axis, the voxel indices at :data:`SLICE_FRACTIONS` of the brain's extent."""
    positions = {}
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low, high = (present[0], present[-1]) if present.size else (0, mask.shape[axis] - 1)
        positions[axis] = [int(round(low + f * (high - low))) for f in SLICE_FRACTIONS]
    return positions
