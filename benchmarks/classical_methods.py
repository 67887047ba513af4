"""Scoreboard of the classical harmonizers on the demo's traveling subjects, through the CLI.

Generates the demo dataset, preprocesses it once (timed), then for every registered
classical method runs the group level with a fixed target site and reads the paired metrics
of each source-site image against the same subject's target-site scan (SSIM, PSNR, Pearson,
inside both brain masks, template space) before and after harmonization, plus structural SSIM
against the source. The layout follows BlindHarmonyDiff's Table 1.

Usage::

    python benchmarks/classical_methods.py [--subjects 4] [--sites 3] [--out benchmarks/results]

Writes ``classical_methods.md`` and ``classical_methods.csv`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bids_harmony.harmonizers import HARMONIZERS

#: The registered methods without presets: every classical harmonizer, a new one included.
METHODS = tuple(name for name, info in HARMONIZERS.methods.items() if not info.presets)
TARGET = "SiemensTrio3T"
METRICS = ("paired_ssim", "paired_psnr", "paired_pcc")


def _cli(*args: object) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_harmony", *map(str, args)], check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - start


def _rows(tsv: Path) -> list[dict[str, str]]:
    with tsv.open() as handle:
        return [r for r in csv.DictReader(handle, delimiter="\t") if r["is_target"] == "False"]


def _mean(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "", "n/a")]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        bids, out = Path(scratch) / "bids", Path(scratch) / "out"
        generation = _cli_demo(bids, args.subjects, args.sites)
        common = ["--resolution", "2", "--nprocs", str(args.nprocs)]
        preprocessing = _cli(bids, out, "participant", *common)
        table: list[dict[str, object]] = []
        timings = {}
        for method in METHODS:
            timings[method] = _cli(bids, out, "group", *common, "--method", method,
                                   "--target-site", TARGET)
            for suffix in ("T1w", "T2w"):
                rows = _rows(out / f"group_{suffix}.tsv")
                if method == METHODS[0]:  # "before" is the same for every method
                    table.append({"method": "source", "suffix": suffix, "n": len(rows),
                                  **{m: _mean(rows, f"{m}_before") for m in METRICS},
                                  "structural_ssim": 1.0})
                table.append({"method": method, "suffix": suffix, "n": len(rows),
                              **{m: _mean(rows, f"{m}_after") for m in METRICS},
                              "structural_ssim": _mean(rows, "structural_ssim")})
        n_images = args.subjects * args.sites * 2
    _write(args.out, table, generation, preprocessing, n_images, timings, args)


def _cli_demo(bids: Path, subjects: int, sites: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_harmony.cli.demo", str(bids), "--subjects",
                    str(subjects), "--sites", str(sites)], check=True, capture_output=True)
    return time.perf_counter() - start


def _write(out: Path, table: list[dict[str, object]], generation: float, preprocessing: float,
           n_images: int, timings: dict[str, float], args: argparse.Namespace) -> None:
    order = ["source", *METHODS]
    table = sorted(table, key=lambda row: (str(row["suffix"]), order.index(str(row["method"]))))
    fields = ["method", "suffix", "n", *METRICS, "structural_ssim"]
    with (out / "classical_methods.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    lines = [
        "# Classical harmonizers on the demo traveling subjects",
        "",
        f"{date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; demo {args.subjects} subjects x {args.sites} "
        f"sites x T1w/T2w at 2 mm ({n_images} images); target site {TARGET}. Each source-site "
        "image is compared with the same subject's target-site scan in template space, inside "
        "both brain masks; structural SSIM is against the un-harmonized source.",
        "",
        f"Demo generation {generation:.0f} s; preprocessing {preprocessing:.0f} s for "
        f"{n_images} images ({preprocessing / n_images:.1f} s per image, --nprocs "
        f"{args.nprocs}); group fit + QC per method: "
        + ", ".join(f"{m} {t:.0f} s" for m, t in timings.items()) + ".",
        "",
        "| method | sequence | n | SSIM | PSNR (dB) | PCC | structural SSIM vs source |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['method']} | {row['suffix']} | {row['n']} | {row['paired_ssim']:.3f} | "
            f"{row['paired_psnr']:.2f} | {row['paired_pcc']:.3f} | "
            f"{row['structural_ssim']:.3f} |"
        )
    (out / "classical_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
