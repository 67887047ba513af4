"""Group level: fit the harmonizer on every preprocessed image, save it, and measure it.

Per image it records structure kept (structural SSIM, NCC vs the source) and style matched
(Wasserstein distance to the target reference). For traveling subjects it also compares each
source-site image, before and after harmonization, with the same subject's target-site image
of the same sequence (SSIM, PSNR, Pearson): the layout of the papers' Table 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from bids_harmony.bids.derivatives import atomic_write_text
from bids_harmony.bids.layout import AnatImage
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.errors import InputMissingError
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer, Volume
from bids_harmony.metrics import harmonization_qc
from bids_harmony.metrics.similarity import pearson, psnr, ssim
from bids_harmony.reports import GroupImages, write_reports
from bids_harmony.workflows.base import derivative_path, mask_desc

LOGGER = logging.getLogger("bids_harmony")


def load_preprocessed(config: RunConfig, image: AnatImage, template: TemplateFiles) -> Volume:
    """Read the ``desc-preproc`` image and its brain mask from the output directory."""
    data_path = derivative_path(config.output_dir, image, template.name, "preproc")
    mask_path = derivative_path(config.output_dir, image, template.name,
                                mask_desc("brain", image), "mask")
    for path in (data_path, mask_path):
        if not path.is_file():
            raise InputMissingError(
                f"{path} is missing; run the participant level for sub-{image.subject} first"
            )
    data = np.asarray(nb.load(data_path).dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(mask_path).dataobj) > 0
    return Volume(data, mask)


def build_harmonizer(config: RunConfig) -> Harmonizer:
    """A fresh ``--method`` harmonizer; learned ones get ``--preset``, ``--device``, ``--seed``
    and keep resumable training checkpoints in the work directory."""
    harmonizer_class = HARMONIZERS[config.method]
    if not harmonizer_class.presets:
        return harmonizer_class()
    harmonizer = harmonizer_class(preset=config.preset, device=config.device, seed=config.seed)
    harmonizer.checkpoint_dir = config.work_dir / "checkpoints" / config.method
    return harmonizer


def fit_and_report(config: RunConfig, images: Sequence[AnatImage],
                   template: TemplateFiles) -> Path:
    """Fit ``config.method`` on all images, save it, write group QC; returns the model dir."""
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
    rows = _qc_rows(images, volumes, harmonized, harmonizer)
    for suffix in sorted({im.suffix for im in images}):
        suffix_rows = [row for row in rows if row["suffix"] == suffix]
        _write_tsv(config.output_dir / f"group_{suffix}.tsv", suffix_rows)
        _plot_histograms(
            config.output_dir / f"group_{suffix}_histograms.png",
            [(im.site, vol, out) for im, vol, out in zip(images, volumes, harmonized)
             if im.suffix == suffix],
            title=f"{suffix}: {config.method} to {harmonizer.target_site_}",
        )
    summary = _summary(rows, harmonizer)
    atomic_write_text(config.output_dir / "group_summary.json",
                      json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_reports(config.output_dir, config.bids_dir, template.name,
                  GroupImages(images, volumes, harmonized, rows), harmonizer)
    return model_dir


def _qc_rows(images: Sequence[AnatImage], volumes: Sequence[Volume],
             harmonized: Sequence[np.ndarray], harmonizer: Harmonizer) -> list[dict[str, Any]]:
    target = harmonizer.target_site_
    target_scans = {(im.subject, im.suffix): vol for im, vol in zip(images, volumes)
                    if im.site == target}
    rows = []
    for image, volume, output in zip(images, volumes, harmonized):
        row: dict[str, Any] = {
            "image": image.key, "subject": image.subject, "session": image.session or "n/a",
            "site": image.site, "suffix": image.suffix, "is_target": image.site == target,
        }
        row.update(harmonization_qc(volume, output,
                                    harmonizer.reference_quantiles(image.suffix)))
        paired = target_scans.get((image.subject, image.suffix))
        if paired is not None and image.site != target:
            row.update(paired_metrics(volume, output, paired))
        rows.append(row)
    return rows


def paired_metrics(source: Volume, harmonized: np.ndarray, target: Volume) -> dict[str, float]:
    """Traveling-subject metrics vs the target-site scan, inside both brain masks."""
    mask = source.mask & target.mask
    out: dict[str, float] = {}
    for stage, image in (("before", source.data), ("after", harmonized)):
        out[f"paired_ssim_{stage}"] = ssim(image, target.data, mask)
        out[f"paired_psnr_{stage}"] = psnr(image, target.data, mask)
        out[f"paired_pcc_{stage}"] = pearson(image, target.data, mask)
    return out


def _summary(rows: Sequence[dict[str, Any]], harmonizer: Harmonizer) -> dict[str, Any]:
    """Mean of each metric per sequence and site, for users who plot their own."""
    summary: dict[str, Any] = {"method": harmonizer.name, "target_site": harmonizer.target_site_,
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
        summary["by_sequence"][suffix] = per_site
    return summary


def _write_tsv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_cell(row.get(c)) for c in columns))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _plot_histograms(path: Path, items: Sequence[tuple[str, Volume, np.ndarray]],
                     title: str) -> None:
    """Per-site brain-intensity histograms before and after harmonization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({site for site, _, _ in items})
    colours = dict(zip(sites, plt.cm.tab10.colors))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
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
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    partial.replace(path)
