"""``OUTPUT_DIR/group_report.html``: the evidence that the site effect went and anatomy stayed.

Sections per sequence: intensity histograms per site, site Wasserstein and luminance-SSIM
heatmaps, site classification with its chance level, brain age, traveling-subject measures,
tissue Dice / anatomical-preservation scores; then a sortable table of every image linking
to its participant page. ``group_evaluation.json`` and ``group_site_classification.tsv``
hold the same numbers for users who plot their own.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_harmony.fileio import atomic_write_text, write_tsv
from bids_harmony.metrics.anatomy import TISSUES
from bids_harmony.reports.evaluation import STAGES
from bids_harmony.reports.html import figure, flag_dot, number, page, save_figure, table
from bids_harmony.workflows.citations import Methods

FIGURES = "figures"
REPORT_NAME = "group_report.html"
CLASSIFICATION_TSV = "group_site_classification.tsv"
IMAGE_COLUMNS = ("structural_ssim", "ncc_vs_source", "wd_source_vs_target", "wd_vs_target",
                 "paired_ssim_before", "paired_ssim_after")


def write_group_report(output_dir: Path, evaluation: Mapping[str, Any],
                       methods: Methods) -> Path:
    """Write the site heatmaps, the classification TSV and the HTML page, which ends with
    the methods text of ``logs/CITATION.md``; returns the page."""
    (output_dir / FIGURES).mkdir(parents=True, exist_ok=True)
    sections = []
    for suffix, result in evaluation["sequences"].items():
        heatmap = f"{FIGURES}/group_{suffix}_site_heatmaps.png"
        _plot_site_heatmaps(output_dir / heatmap, result, suffix)
        sections.append(_sequence_section(suffix, result, heatmap))
    _write_classification_tsv(output_dir / CLASSIFICATION_TSV, evaluation)
    body = "\n".join([
        f"<h1>bids_harmony group report: {html.escape(evaluation['method'])} "
        f"to {html.escape(evaluation['target_site'])}</h1>",
        f"<p class=\"note\">{len(evaluation['images'])} images; bids_harmony "
        f"{html.escape(evaluation['bids_harmony_version'])}. Before = preprocessed source "
        "images, after = harmonized images, both in template space inside the brain mask. "
        f"Machine-readable: <a href=\"group_evaluation.json\">group_evaluation.json</a>, "
        f"<a href=\"{CLASSIFICATION_TSV}\">{CLASSIFICATION_TSV}</a>.</p>",
        _diagnostics_section(evaluation.get("model_diagnostics", {})),
        *sections,
        _images_section(evaluation),
        _methods_section(methods),
    ])
    path = output_dir / REPORT_NAME
    atomic_write_text(path, page(f"bids_harmony group report ({evaluation['method']})", body))
    return path


def _sequence_section(suffix: str, result: Mapping[str, Any], heatmap: str) -> str:
    wd, lum = result["site_wasserstein"], result["site_luminance_ssim"]
    parts = [
        f"<h2>{html.escape(suffix)} ({result['n_images']} images, "
        f"{len(result['sites'])} sites)</h2>",
        "<h3>Intensity distributions per site</h3>",
        figure(f"group_{suffix}_histograms.png", f"{suffix} histograms before and after"),
        "<h3>Site distances</h3>",
        f"<p>Mean pairwise Wasserstein distance between sites' mean brain-intensity "
        f"distributions: {number(wd['mean_before'], 4)} before, "
        f"{number(wd['mean_after'], 4)} after (lower = sites more alike). Mean luminance SSIM "
        f"between site mean images: {number(lum['mean_before'], 4)} before, "
        f"{number(lum['mean_after'], 4)} after (higher = more alike).</p>",
        figure(heatmap, f"{suffix} site Wasserstein and luminance SSIM heatmaps"),
        "<h3>Site classification</h3>",
        _classification_table(result["site_classification"]),
        "<h3>Brain age</h3>",
        _brain_age_table(result["brain_age"]),
        "<h3>Traveling subjects vs their target-site scan</h3>",
        _traveling_table(result["traveling_subjects"]),
        "<h3>Anatomy kept: tissue segmentation</h3>",
        _tissue_tables(result["tissues"]),
    ]
    return "\n".join(parts)


def _classification_table(classification: Mapping[str, Any]) -> str:
    if "skipped" in classification:
        return f"<p class=\"note\">Not computed: {html.escape(classification['skipped'])}</p>"
    rows = []
    for stage in STAGES:
        c = classification[stage]
        validation = c["validation"]
        rows.append([
            stage,
            f"{number(c['balanced_accuracy'])} ± {number(c['balanced_accuracy_sd'])}",
            f"{number(c['macro_f1'])} ± {number(c['macro_f1_sd'])}",
            number(c["chance_level"]),
            f"{validation['n_splits']}-fold × {validation['n_repeats']}",
            str(validation["n_samples"]),
        ])
    before, after = classification["before"], classification["after"]
    verdict = (
        f"Before harmonization the site is predicted with balanced accuracy "
        f"{number(before['balanced_accuracy'], 2)} (chance {number(before['chance_level'], 2)}); "
        f"after, {number(after['balanced_accuracy'], 2)}. Lower = less site information left."
    )
    return "\n".join([
        table(["stage", "balanced accuracy", "macro F1", "chance level", "cross-validation",
               "images"], rows),
        f"<p>{verdict}</p>",
        f"<p class=\"note\">{html.escape(before['validation']['note'])}. Logistic regression "
        "on standardized hand-made features (brain and tissue intensity quantiles, gradient "
        "and local-std quantiles): no pretrained deep features are available offline.</p>",
    ])


def _brain_age_table(brain_age: Mapping[str, Any]) -> str:
    if "skipped" in brain_age:
        return f"<p class=\"note\">Not computed: {html.escape(brain_age['skipped'])}</p>"
    rows = [[stage, f"{number(brain_age[stage]['mae'], 2)} ± "
                    f"{number(brain_age[stage]['mae_sd'], 2)}",
             number(brain_age[stage]["baseline_mae"], 2),
             f"{brain_age[stage]['validation']['n_splits']}-fold × "
             f"{brain_age[stage]['validation']['n_repeats']}"] for stage in STAGES]
    return "\n".join([
        table(["stage", "MAE (years)", "predict-the-mean MAE", "cross-validation"], rows),
        "<p class=\"note\">Ridge regression on the same features, folds split by participant. "
        f"{html.escape(brain_age['before']['validation']['note'])}.</p>",
    ])


def _traveling_table(traveling: Mapping[str, Mapping[str, float]]) -> str:
    if not traveling:
        return "<p class=\"note\">No participant was scanned at the target site and another.</p>"
    measures = (("SSIM", "paired_ssim"), ("PSNR (dB)", "paired_psnr"),
                ("Pearson", "paired_pcc"), ("Wasserstein", "paired_wd"))
    headers = ["source site"] + [f"{name} {stage}" for name, _ in measures for stage in STAGES]
    rows = [[html.escape(site)] + [number(values.get(f"{key}_{stage}"))
                                   for _, key in measures for stage in STAGES]
            for site, values in traveling.items()]
    return table(headers, rows) + (
        "<p class=\"note\">Mean over the participants scanned at both sites; higher SSIM, "
        "PSNR and Pearson and lower Wasserstein distance after = closer to the target scan."
        "</p>")


def _tissue_tables(tissues: Mapping[str, Any]) -> str:
    if "skipped" in tissues:
        return f"<p class=\"note\">Not computed: {html.escape(tissues['skipped'])}</p>"
    source, target = tissues["vs_source"], tissues["vs_target"]
    rows = [[t, number(source.get(f"dice_{t}")), number(source.get(f"aps_{t}"))]
            + [number(target.get(f"{m}_{t}_{stage}")) for m in ("dice", "aps")
               for stage in STAGES]
            for t in TISSUES]
    headers = ["tissue", "Dice vs source", "APS vs source", "Dice vs target before",
               "Dice vs target after", "APS vs target before", "APS vs target after"]
    return table(headers, rows) + (
        f"<p class=\"note\">Segmentation: {html.escape(tissues['method'])}. Dice: overlap of "
        "tissue labels; APS: anatomical-preservation score, 1 − relative tissue-volume "
        "difference (Parida et al. 2024). Vs source: harmonized vs its own input (1 = "
        f"anatomy untouched). Vs target: {tissues['n_pairs']} traveling-subject pairs, the "
        "source before / after harmonization against the target-site scan.</p>")


def _images_section(evaluation: Mapping[str, Any]) -> str:
    thresholds = evaluation["flag_thresholds"]
    headers = ["image", "site", "sequence", "flag", "preprocessing QC", *IMAGE_COLUMNS]
    rows = []
    for row in evaluation["images"]:
        link = f"sub-{row['subject']}.html#{row['image']}"
        rows.append([
            f"<a href=\"{html.escape(link)}\">{html.escape(row['image'])}</a>",
            html.escape(row["site"]) + (" (target)" if row["is_target"] else ""),
            html.escape(row["suffix"]), flag_dot(row["flag"]), _preprocessing_cell(row),
            *(number(row.get(column)) for column in IMAGE_COLUMNS),
        ])
    return "\n".join([
        "<h2>Every image</h2>",
        f"<p class=\"note\">Click a column header to sort. Flag: red when structural SSIM or "
        f"NCC with the source falls below {thresholds['red_below']}, amber below "
        f"{thresholds['amber_below']} (structure not kept: look at the participant page), "
        "and red whenever preprocessing QC flagged the image (misregistered to the template "
        "or not brain-like; left out of fitting unless --keep-flagged).</p>",
        table(headers, rows, sortable=True, text_columns=5),
    ])


def _preprocessing_cell(row: Mapping[str, Any]) -> str:
    flags = row.get("preprocessing_flags", "n/a")
    if flags == "n/a":
        return "passed"
    fitted = "fitted on" if row.get("fitted_on") else "left out of fitting"
    return f"<span class=\"alarm\">{html.escape(flags)}</span> ({fitted})"


def _diagnostics_section(diagnostics: Mapping[str, Mapping[str, Any]]) -> str:
    """What the learned model scored on held-out target data during training, with a
    warning box where it learned nothing; empty for methods without training."""
    if not diagnostics:
        return ""
    parts = ["<h2>Model diagnostics</h2>"]
    for suffix, result in diagnostics.items():
        for warning in result["warnings"]:
            parts.append(f"<p class=\"warning\"><b>{html.escape(suffix)}: the model did not "
                         f"learn.</b> {html.escape(warning)}</p>")
        history = result["history"]
        if not history:
            continue
        names = [name for name in history[-1] if name != "step"]
        final = ", ".join(f"{html.escape(name)} {number(history[-1][name], 3)}" for name in names)
        baselines = ", ".join(f"{html.escape(name)} {number(value, 3)}"
                              for name, value in result["baselines"].items())
        parts.append(
            f"<p>{html.escape(suffix)}: after step {history[-1]['step']}, on "
            f"{html.escape(result['scored_on'])} target images: {final}"
            + (f" (baseline: {baselines})" if baselines else "")
            + ". The full history is in the model card.</p>"
        )
    return "\n".join(parts)


def _methods_section(methods: Methods) -> str:
    """The run's methods text with its numbered references, ready to cite."""
    paragraphs = "\n".join(f"<p>{html.escape(text)}</p>" for text in methods.paragraphs)
    references = "\n".join(f"<li>{html.escape(text)}</li>" for text in methods.references)
    return "\n".join([
        "<h2>Methods</h2>",
        "<p class=\"note\">Text to adapt for a paper's methods section; the same in "
        "<a href=\"logs/CITATION.md\">logs/CITATION.md</a>.</p>",
        paragraphs,
        "<h3>References</h3>",
        f"<ol>\n{references}\n</ol>",
    ])


def _plot_site_heatmaps(path: Path, result: Mapping[str, Any], suffix: str) -> None:
    """Paper 002 Fig. 5 layout: site x site Wasserstein distances, before and after, on one
    colour scale; below them the luminance SSIM between site mean images."""
    from matplotlib.figure import Figure

    rows = (("site_wasserstein", "Wasserstein distance", "magma_r"),
            ("site_luminance_ssim", "luminance SSIM", "viridis"))
    sites = result["site_wasserstein"]["sites"]
    size = max(3.2, 0.9 * len(sites) + 1.5)
    figure = Figure(figsize=(2 * size + 1.5, 2 * size))
    axes = figure.subplots(2, 2, squeeze=False)
    for row_axes, (key, label, colours) in zip(axes, rows):
        matrices = [np.asarray(result[key][stage]) for stage in STAGES]
        low = min(m.min() for m in matrices)
        high = max(m.max() for m in matrices)
        for axis, stage, matrix in zip(row_axes, STAGES, matrices):
            shown = axis.imshow(matrix, cmap=colours, vmin=low, vmax=high)
            axis.set_xticks(range(len(sites)), sites, rotation=45, ha="right", fontsize=7)
            axis.set_yticks(range(len(sites)), sites if stage == STAGES[0] else [],
                            fontsize=7)
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                          color="white" if (value - low) > 0.5 * (high - low) else "black")
            axis.set_title(f"{label}, {stage}", fontsize=9)
        figure.colorbar(shown, ax=list(row_axes), shrink=0.8)
    figure.suptitle(f"{suffix}: distances between sites")
    save_figure(figure, path)


def _write_classification_tsv(path: Path, evaluation: Mapping[str, Any]) -> None:
    columns = ["suffix", "stage", "balanced_accuracy", "balanced_accuracy_sd", "macro_f1",
               "macro_f1_sd", "chance_level", "n_sites", "n_samples", "n_splits", "n_repeats",
               "note"]
    rows = []
    for suffix, result in evaluation["sequences"].items():
        classification = result["site_classification"]
        if "skipped" in classification:
            continue
        for stage in STAGES:
            rows.append({**classification[stage], **classification[stage]["validation"],
                         "suffix": suffix, "stage": stage})
    write_tsv(path, rows, columns)


def image_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of images per flag colour (for the log line)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["flag"]] = counts.get(row["flag"], 0) + 1
    return counts
