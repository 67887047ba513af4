"""The group level's tables and histograms: per-image QC (``group_<suffix>.tsv``), the
summary (``group_summary.json``) and per-site brain-intensity histograms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_harmony.bids.layout import AnatImage, traveling_pairs
from bids_harmony.harmonizers import Harmonizer
from bids_harmony.metrics import harmonization_qc
from bids_harmony.metrics.similarity import pearson, psnr, ssim
from bids_harmony.reports.html import save_figure
from bids_harmony.reports.threads import map_in_threads
from bids_harmony.volume import Volume


def qc_rows(images: Sequence[AnatImage], volumes: Sequence[Volume],
            harmonized: Sequence[np.ndarray], harmonizer: Harmonizer,
            workers: int = 1) -> list[dict[str, Any]]:
    """One row per image: identity, per-image QC and, for a traveling subject's source-site
    image, the paired metrics against its target-site image (images on ``workers``
    threads)."""
    target = harmonizer.target_site_
    pairs = traveling_pairs(images, target)

    def row_of(index: int) -> dict[str, Any]:
        image, volume, output = images[index], volumes[index], harmonized[index]
        row: dict[str, Any] = {
            "image": image.key, "subject": image.subject, "session": image.session or "n/a",
            "site": image.site, "suffix": image.suffix, "is_target": image.site == target,
        }
        row.update(harmonization_qc(volume, output,
                                    harmonizer.reference_quantiles(image.suffix)))
        if index in pairs:
            row.update(paired_metrics(volume, output, volumes[pairs[index]]))
        return row

    return map_in_threads(row_of, range(len(images)), workers)


def paired_metrics(source: Volume, harmonized: np.ndarray, target: Volume) -> dict[str, float]:
    """Traveling-subject metrics vs the target-site scan, inside both brain masks."""
    mask = source.mask & target.mask
    out: dict[str, float] = {}
    for stage, image in (("before", source.data), ("after", harmonized)):
        out[f"paired_ssim_{stage}"] = ssim(image, target.data, mask)
        out[f"paired_psnr_{stage}"] = psnr(image, target.data, mask)
        out[f"paired_pcc_{stage}"] = pearson(image, target.data, mask)
    return out


def summary(rows: Sequence[dict[str, Any]], harmonizer: Harmonizer) -> dict[str, Any]:
    """Mean of each metric per sequence and site, for users who plot their own."""
    out: dict[str, Any] = {"method": harmonizer.name, "target_site": harmonizer.target_site_,
                           "model_card": harmonizer.model_card(), "by_sequence": {}}
    for suffix in sorted({r["suffix"] for r in rows}):
        per_site: dict[str, dict[str, float]] = {}
        for site in sorted({r["site"] for r in rows if r["suffix"] == suffix}):
            site_rows = [r for r in rows if r["suffix"] == suffix and r["site"] == site]
            numeric = {k for r in site_rows for k, v in r.items()
                       if isinstance(v, float) and not isinstance(v, bool)}
            per_site[site] = {
                k: float(np.nanmean([r[k] for r in site_rows if k in r])) for k in sorted(numeric)
            }
            per_site[site]["n_images"] = len(site_rows)
        out["by_sequence"][suffix] = per_site
    return out


def plot_histograms(path: Path, items: Sequence[tuple[str, Volume, np.ndarray]],
                    title: str) -> None:
    """Per-site brain-intensity histograms before and after harmonization."""
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    sites = sorted({site for site, _, _ in items})
    colours = dict(zip(sites, colormaps["tab10"].colors))
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2, sharey=True)
    bins = np.linspace(0.0, 1.0, 101)
    for axis, stage in zip(axes, ("before", "after")):
        for site in sites:
            values = np.concatenate([
                (vol.brain if stage == "before" else out[vol.mask.astype(bool)])
                for s, vol, out in items if s == site
            ])
            axis.hist(values, bins=bins, density=True, histtype="step", lw=1.5,
                      color=colours[site], label=site)
        axis.set_title(f"{stage} harmonization")
        axis.set_xlabel("normalised intensity (brain)")
    axes[0].set_ylabel("density")
    axes[1].legend(title="site", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
