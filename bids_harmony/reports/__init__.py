"""Everything the group level writes about a fit: tables, figures, evaluation, HTML pages.

One call, :func:`write_group_outputs`, from what the fit holds in memory (no NIfTI file is
read back).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bids_harmony.fileio import write_json, write_tsv
from bids_harmony.reports.evaluation import GroupImages, evaluate_group, read_ages
from bids_harmony.reports.group import image_counts, write_group_report
from bids_harmony.reports.participant import write_participant_pages
from bids_harmony.reports.tables import plot_histograms, qc_rows, summary
from bids_harmony.volume import EDGES
from bids_harmony.workflows.citations import Methods
from bids_harmony.workflows.group import GroupFit

LOGGER = logging.getLogger("bids_harmony")
EVALUATION_JSON = "group_evaluation.json"

__all__ = ["EVALUATION_JSON", "GroupImages", "write_group_outputs"]


def write_group_outputs(output_dir: Path, bids_dir: Path, fit: GroupFit,
                        methods: Methods, workers: int = 1) -> Path:
    """Write ``group_<suffix>.tsv`` and histograms, ``group_summary.json``, the evaluation,
    the group page (ending with the run's ``methods``) and the participant pages; returns
    the group report's path. Per-image measures and mosaics run on ``workers`` threads."""
    start = time.perf_counter()
    harmonizer = fit.harmonizer
    rows = qc_rows(fit.images, fit.volumes, fit.harmonized, harmonizer, workers)
    for row, flags, fitted in zip(rows, fit.qc_flags, fit.fitted_on):
        row["preprocessing_flags"] = ";".join(flags) or "n/a"
        row["fitted_on"] = fitted
    for suffix in sorted({im.suffix for im in fit.images}):
        write_tsv(output_dir / f"group_{suffix}.tsv",
                  [row for row in rows if row["suffix"] == suffix])
        plot_histograms(
            output_dir / f"group_{suffix}_histograms.png",
            [(im.site, vol, out) for im, vol, out in zip(fit.images, fit.volumes, fit.harmonized)
             if im.suffix == suffix],
            title=f"{suffix}: {harmonizer.name} to {harmonizer.target_site_}",
        )
    write_json(output_dir / "group_summary.json", summary(rows, harmonizer))
    group = GroupImages(fit.images, fit.volumes, fit.harmonized, rows)
    evaluation = evaluate_group(group, harmonizer.name, harmonizer.target_site_,
                                read_ages(bids_dir / "participants.tsv"), workers)
    evaluation["model_diagnostics"] = harmonizer.diagnostics()
    write_json(output_dir / EVALUATION_JSON, evaluation)
    report = write_group_report(output_dir, evaluation, methods)
    edges = [volume.channel(EDGES) > 0 for volume in fit.volumes]
    write_participant_pages(output_dir, group, edges, evaluation["images"], workers)
    LOGGER.info("group report %s written in %.0f s; structure flags: %s", report,
                time.perf_counter() - start, image_counts(evaluation["images"]))
    return report
