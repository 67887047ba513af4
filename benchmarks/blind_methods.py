"""The blind harmonizers against source, histogram matching and SSIMH, trained on the target
site only: BlindHarmonyDiff's Table 1 layout and BlindHarmony's simulated experiment.

1. Generates a traveling-subject dataset (every head "scanned" at every simulated site; real
   IXI heads with ``--anatomy ixi``) and preprocesses it once through the CLI (participant
   level, 2 mm, resumable with ``--work``).
2. Splits the subjects: the target-site scans of the first ``--train-subjects`` heads are the
   only training data of every method; the other heads are held out.
3. **Table 1** (BlindHarmonyDiff): each held-out head's scans at the other sites are
   harmonized and compared with the same head's target-site scan (SSIM, PSNR, PCC inside
   both brain masks) and with the source (SSIM structure term: anatomy kept).
4. **Simulated domains** (BlindHarmony Table 1): each held-out head's target-site scan is
   min-max normalised in the brain, passed through exp(x), log(1 + 3x) or x^0.7 (the public
   code's transforms) and min-max normalised again; the methods map it back and are scored
   against the untouched scan (PSNR, SSIM).

The learned methods train on CPU under the budget given on the command line (steps and
network sizes are written into the results); the GPU run of the ``fast`` presets is separate.

Usage::

    python benchmarks/blind_methods.py [--anatomy ixi] [--subjects 7] [--train-subjects 4]
        [--bh-steps 800] [--bhd-steps 400] [--work DIR] [--out benchmarks/results]

Writes ``blind_methods.md`` and ``blind_methods.csv`` in ``--out``. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from common import run_cli

from bids_harmony.data.demo import DEFAULT_IXI_DIR, SITE_PROFILES, generate_demo_dataset
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer
from bids_harmony.volume import Volume
from bids_harmony.metrics import pearson, psnr
from bids_harmony.metrics.similarity import ssim_components

SUFFIX = "T1w"
TEMPLATE = "MNI152NLin2009aSym"
SIMULATED_DOMAINS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "log": lambda x: np.log1p(3.0 * x),
    "gamma 0.7": lambda x: x**0.7,
}


def _load_scans(bids: Path, out: Path) -> dict[tuple[str, str], Volume]:
    """Preprocessed T1w volumes by (subject, site), read from the derivatives."""
    scans: dict[tuple[str, str], Volume] = {}
    for sessions_tsv in sorted(bids.glob("sub-*/sub-*_sessions.tsv")):
        subject = sessions_tsv.parent.name
        rows = [line.split("\t") for line in sessions_tsv.read_text().splitlines()[1:]]
        for session, site in rows:
            anat = out / subject / session / "anat"
            stem = f"{subject}_{session}_space-{TEMPLATE}"
            data = nb.load(anat / f"{stem}_desc-preproc_{SUFFIX}.nii.gz").get_fdata()
            mask = np.asarray(nb.load(anat / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
            scans[(subject, site.strip())] = Volume(data.astype(np.float32), mask)
    return scans


def _simulated_source(volume: Volume, transform: Callable[[np.ndarray], np.ndarray]) -> Volume:
    """BlindHarmony's simulated domain: min-max, transform, min-max (inside the brain)."""
    brain = volume.mask
    data = volume.data.astype(np.float64)
    low, high = data[brain].min(), data[brain].max()
    shifted = transform((data - low) / (high - low))
    low, high = shifted[brain].min(), shifted[brain].max()
    out = np.where(brain, (shifted - low) / (high - low), 0.0)
    return Volume(out.astype(np.float32), brain)


def _scores(out: np.ndarray, truth: Volume, source: Volume) -> dict[str, float]:
    both = truth.mask & source.mask
    return {
        "ssim": ssim_components(out, truth.data, both)["ssim"],
        "psnr": psnr(out, truth.data, both),
        "pcc": pearson(out, truth.data, both),
        "structural_ssim": ssim_components(out, source.data, source.mask)["structure"],
    }


def _learned_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The CPU budget of each learned method: preset ``fast`` with smaller nets and steps."""
    return {
        "blindharmony": {
            "preset": "fast", "steps": args.bh_steps, "steps_per_level": 2,
            "hidden_channels": 32, "residual_blocks": 1, "batch_size": 16, "seed": 0,
        },
        "blindharmonydiff": {
            "preset": "fast", "steps": args.bhd_steps, "base_channels": 16, "patch_size": 32,
            "batch_size": 2, "sampling_steps": 8, "seed": 0,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy", choices=["ixi", "mni"], default="ixi")
    parser.add_argument("--subjects", type=int, default=7)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--train-subjects", type=int, default=4)
    parser.add_argument("--bh-steps", type=int, default=800)
    parser.add_argument("--bhd-steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+",
                        default=["histmatch", "ssimh", "blindharmony", "blindharmonydiff"])
    parser.add_argument("--simulated-methods", nargs="+",
                        default=["histmatch", "ssimh", "blindharmony"],
                        help="methods of the simulated-domain experiment (BlindHarmony's)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--ixi-dir", type=Path, default=DEFAULT_IXI_DIR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bids_harmony_blind_bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    for key, value in (("NIPYPE_NO_ET", "1"), ("HF_HUB_OFFLINE", "1"), ("MPLBACKEND", "Agg")):
        os.environ.setdefault(key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    bids, out = args.work / "bids", args.work / "out"
    if not bids.exists():
        generate_demo_dataset(bids, n_subjects=args.subjects, n_sites=args.sites, seed=0,
                              anatomy=args.anatomy, ixi_dir=args.ixi_dir,
                              sequences=[SUFFIX])
    preprocessing = run_cli(bids, out, "participant", "--resolution", "2", "--nprocs", args.nprocs,
                         "--work-dir", args.work / "work")
    scans = _load_scans(bids, out)
    target = SITE_PROFILES[0].label
    subjects = sorted({subject for subject, _ in scans})
    train, held_out = subjects[:args.train_subjects], subjects[args.train_subjects:]
    sources = sorted({site for _, site in scans} - {target})
    training = [scans[(s, target)] for s in train]
    budgets = _learned_settings(args)

    table1: list[dict[str, Any]] = []
    simulated: list[dict[str, Any]] = []
    timings: dict[str, dict[str, float]] = {}
    for method in ["source", *args.methods]:
        harmonizer: Harmonizer | None = None
        if method != "source":
            harmonizer = HARMONIZERS[method](**budgets.get(method, {}))
            start = time.perf_counter()
            harmonizer.fit(training, [target] * len(training), [SUFFIX] * len(training), target)
            timings[method] = {"fit_s": time.perf_counter() - start}

        def apply(volume: Volume) -> np.ndarray:
            if harmonizer is None:
                return volume.data
            start = time.perf_counter()
            result = harmonizer.transform(volume, SUFFIX)
            timings[method].setdefault("transform_s", []).append(time.perf_counter() - start)
            return result

        for site in sources:
            rows = [_scores(apply(scans[(s, site)]), scans[(s, target)], scans[(s, site)])
                    for s in held_out]
            table1.append({"method": method, "source_site": site,
                           **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}})
        for domain, transform in SIMULATED_DOMAINS.items():
            if method != "source" and method not in args.simulated_methods:
                continue
            rows = []
            for s in held_out:
                truth = scans[(s, target)]
                source = _simulated_source(truth, transform)
                rows.append(_scores(apply(source), truth, source))
            simulated.append({"method": method, "domain": domain,
                              **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}})
        if method in timings and "transform_s" in timings[method]:
            timings[method]["transform_s"] = float(np.mean(timings[method]["transform_s"]))
        print(f"{method}: done", timings.get(method, {}), flush=True)
    _write(args, table1, simulated, timings, budgets, target, train, held_out, preprocessing,
           scans[(train[0], target)].data.shape)


def _write(args: argparse.Namespace, table1: list[dict[str, Any]],
           simulated: list[dict[str, Any]], timings: dict[str, dict[str, float]],
           budgets: dict[str, dict[str, Any]], target: str, train: list[str],
           held_out: list[str], preprocessing: float, grid: tuple[int, ...]) -> None:
    with (args.out / "blind_methods.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "method", "source", "ssim", "psnr", "pcc",
                         "structural_ssim"])
        for row in table1:
            writer.writerow(["table1", row["method"], row["source_site"], row["ssim"],
                             row["psnr"], row["pcc"], row["structural_ssim"]])
        for row in simulated:
            writer.writerow(["simulated", row["method"], row["domain"], row["ssim"],
                             row["psnr"], row["pcc"], row["structural_ssim"]])
    sources = sorted({row["source_site"] for row in table1})
    lines = [
        "# Blind harmonizers: BlindHarmonyDiff Table 1 and BlindHarmony's simulated domains",
        "",
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, no GPU, "
        f"Python {platform.python_version()}. Data: {args.anatomy.upper()} anatomy, "
        f"{len(train) + len(held_out)} heads x {args.sites} simulated sites, preprocessed by "
        f"the CLI at 2 mm (grid {grid}; {preprocessing:.0f} s). Training data of every method: "
        f"the {len(train)} target-site ({target}) scans of {', '.join(train)}; scored on the "
        f"held-out {', '.join(held_out)}.",
        "",
        "CPU budget of the learned methods (everything else is the `fast` preset):",
        "",
    ]
    for method, settings in budgets.items():
        if method in timings:
            fit, apply = timings[method]["fit_s"], timings[method].get("transform_s", 0.0)
            lines.append(f"- `{method}`: {settings}; training {fit:.0f} s, "
                         f"{apply:.1f} s per volume.")
    lines += [
        "",
        f"## Table 1 layout: real-style site effects, vs the same head at {target}",
        "",
        "SSIM / PSNR (dB) / PCC against the target-site scan inside both brain masks; "
        "structural SSIM (SSIM's structure term) against the source scan.",
        "",
        "| method | " + " | ".join(f"{s} SSIM | PSNR | PCC" for s in sources)
        + " | structural SSIM vs source |",
        "|---|" + "---|---|---|" * len(sources) + "---|",
    ]
    for method in dict.fromkeys(row["method"] for row in table1):
        rows = [r for r in table1 if r["method"] == method]
        cells = [f"{r['ssim']:.3f} | {r['psnr']:.2f} | {r['pcc']:.3f}" for r in rows]
        structural = np.mean([r["structural_ssim"] for r in rows])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {structural:.3f} |")
    domains = list(SIMULATED_DOMAINS)
    lines += [
        "",
        "## BlindHarmony Table 1 layout: simulated domains of the target site",
        "",
        "PSNR (dB) / SSIM of the harmonized image against the untouched target-site scan.",
        "",
        "| method | " + " | ".join(f"{d} PSNR | SSIM" for d in domains) + " |",
        "|---|" + "---|---|" * len(domains),
    ]
    for method in dict.fromkeys(row["method"] for row in simulated):
        rows = [r for r in simulated if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(
            f"{r['psnr']:.2f} | {r['ssim']:.3f}" for r in rows) + " |")
    (args.out / "blind_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
