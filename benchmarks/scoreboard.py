"""The project's scoreboard: every registered harmonizer on real IXI heads under simulated
scanners, through the CLI, with the group evaluation's measures.

Builds a traveling-subject dataset from the real IXI T1w heads (``--anatomy ixi``: each head
"scanned" at every simulated site), preprocesses it once (the participant level resumes
across methods), then runs the group level once per registered method with a fixed target
site and reads ``group_evaluation.json``:

- traveling subjects: SSIM, PSNR, Pearson, Wasserstein vs the target-site scan (Table 1s);
- site effect: site-classification balanced accuracy (chance = 1 / sites), mean pairwise site
  Wasserstein distance, mean luminance SSIM between site mean images;
- anatomy: tissue Dice and anatomical-preservation score vs the source, Dice vs the target
  scan's segmentation; brain-age MAE (ridge, participant folds).

Usage::

    python benchmarks/scoreboard.py [--subjects 4] [--sites 3] [--out benchmarks/results]

Writes ``scoreboard.md`` and ``scoreboard.csv`` in ``--out`` (date, machine and budget in the
header). Not a test: rerun it whenever a method changes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

from common import run_cli

from bids_harmony.data.demo import DEFAULT_IXI_DIR, SITE_PROFILES, generate_demo_dataset
from bids_harmony.harmonizers import HARMONIZERS

SUFFIX = "T1w"
TISSUES = ("CSF", "GM", "WM")
COLUMNS = (
    ("paired_ssim", "SSIM vs target"), ("paired_psnr", "PSNR vs target (dB)"),
    ("paired_pcc", "Pearson vs target"), ("paired_wd", "WD vs target"),
    ("site_bacc", "site bal. acc."), ("site_wd", "site WD"), ("site_lum", "site lum. SSIM"),
    ("dice_source", "Dice vs source"), ("aps_source", "APS vs source"),
    ("dice_target", "Dice vs target"), ("age_mae", "brain-age MAE (y)"),
    ("group_s", "group time (s)"),
)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _stage_row(result: Mapping[str, Any], stage: str) -> dict[str, float | None]:
    """The measures of one stage (``before`` = source images, ``after`` = harmonized)."""
    traveling = result["traveling_subjects"].values()
    row: dict[str, float | None] = {
        key: _mean([site[f"{key}_{stage}"] for site in traveling])
        for key in ("paired_ssim", "paired_psnr", "paired_pcc", "paired_wd")
    }
    classification = result["site_classification"]
    row["site_bacc"] = classification.get(stage, {}).get("balanced_accuracy")
    row["site_wd"] = result["site_wasserstein"][f"mean_{stage}"]
    row["site_lum"] = result["site_luminance_ssim"][f"mean_{stage}"]
    tissues = result["tissues"]
    if stage == "after":
        row["dice_source"] = _mean([tissues["vs_source"][f"dice_{t}"] for t in TISSUES])
        row["aps_source"] = _mean([tissues["vs_source"][f"aps_{t}"] for t in TISSUES])
    row["dice_target"] = _mean([tissues["vs_target"][f"dice_{t}_{stage}"] for t in TISSUES])
    row["age_mae"] = result["brain_age"].get(stage, {}).get("mae")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--preset", default="tiny",
                        help="size preset of learned harmonizers: part of the stated budget")
    parser.add_argument("--ixi-dir", type=Path, default=DEFAULT_IXI_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    target = SITE_PROFILES[0].label
    common = ["--resolution", "2", "--nprocs", str(args.nprocs)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        bids, out = Path(scratch) / "bids", Path(scratch) / "out"
        generate_demo_dataset(bids, n_subjects=args.subjects, n_sites=args.sites, seed=0,
                              anatomy="ixi", ixi_dir=args.ixi_dir)
        preprocessing = run_cli(bids, out, "participant", *common)
        for method in sorted(HARMONIZERS):
            preset = ["--preset", args.preset] if HARMONIZERS.methods[method].presets else []
            seconds = run_cli(bids, out, "group", *common, "--method", method,
                              "--target-site", target, *preset)
            result = json.loads((out / "group_evaluation.json").read_text())["sequences"][SUFFIX]
            if not rows:
                rows.append({"method": "source (no harmonization)",
                             **_stage_row(result, "before")})
            rows.append({"method": method, **_stage_row(result, "after"), "group_s": seconds})
            chance = result["site_classification"].get("before", {}).get("chance_level")
            note = result["site_classification"].get("before", {}).get("validation", {})
    _write(args, rows, target, preprocessing, chance, note.get("note", "not computed"))


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], target: str,
           preprocessing: float, chance: float | None, fold_note: str) -> None:
    keys = [key for key, _ in COLUMNS]
    with (args.out / "scoreboard.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", *keys])
        writer.writeheader()
        writer.writerows(rows)
    n_images = args.subjects * args.sites
    lines = [
        "# Scoreboard: harmonizers on real IXI heads under simulated scanners",
        "",
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, no GPU, "
        f"Python {platform.python_version()}. Budget: {args.subjects} IXI T1w heads x "
        f"{args.sites} simulated sites ({n_images} images) at 2 mm, --nprocs {args.nprocs}; "
        f"preprocessing once ({preprocessing:.0f} s), then one `group` run per method "
        f"(fit + QC + evaluation + reports) with target site {target}; learned methods at "
        f"--preset {args.preset}.",
        "",
        "Traveling-subject measures compare each source-site image with the same head's "
        "target-site scan (template space, inside both brain masks). Site balanced accuracy: "
        f"logistic regression on hand-made image features, chance {chance or float('nan'):.2f}"
        f" ({fold_note}). Site WD / luminance SSIM: mean over site pairs. Tissues: 3-class "
        "intensity k-means; APS = 1 - relative tissue-volume difference.",
        "",
        "| method | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [_format(row.get(key), key) for key in keys]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    (args.out / "scoreboard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _format(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    if key in ("paired_psnr", "age_mae"):
        return f"{value:.2f}"
    if key == "group_s":
        return f"{value:.0f}"
    return f"{value:.3f}"


if __name__ == "__main__":
    main()
