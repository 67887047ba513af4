"""What every participant job pays before its first image, as the dataset grows: the BIDS
file-name validation, the listing that keys the pybids database, building that database
(the first job) or opening it (every later one), and selecting the participant.

A dataset of N participants is written with one tiny T1w each (hard links of one 4 mm
file, with its sidecar and a sessions table), so that only the number of files grows. A
participant job on it stops right after that work: the image checks refuse the 16 mm field
of view (exit 65), before any workflow. Timed for N = 100, 1000 and 4000, with validation
and with ``--skip-bids-validation``, the first job (database built) and a second one
(database reused). The README's "Scale" section extrapolates these to 10,000 participants.

Usage::

    python benchmarks/job_overhead.py [--out benchmarks/results]

Writes ``job_overhead.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import nibabel as nb
import numpy as np

SIZES = (100, 1000, 4000)


def _dataset(root: Path, participants: int) -> Path:
    image = root / "template_T1w.nii.gz"
    nb.Nifti1Image(np.ones((4, 4, 4), dtype=np.int16), np.diag([4.0, 4.0, 4.0, 1.0])
                   ).to_filename(image)
    sidecar = json.dumps({"Manufacturer": "Siemens", "MagneticFieldStrength": 3})
    bids = root / "bids"
    rows = ["participant_id\tsite"]
    for number in range(1, participants + 1):
        subject = f"sub-{number:05d}"
        anat = bids / subject / "anat"
        anat.mkdir(parents=True)
        os.link(image, anat / f"{subject}_T1w.nii.gz")
        (anat / f"{subject}_T1w.json").write_text(sidecar)
        rows.append(f"{subject}\tsite{number % 4}")
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "overhead", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    return bids


def _job(bids: Path, out: Path, *extra: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bids_harmony", bids, out, "participant",
                             "--participant-label", "00001", "--resolution", "2", *extra],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 65 or "field of view" not in result.stderr:
        sys.exit(f"expected the image checks' exit 65, got {result.returncode}:\n"
                 f"{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in SIZES:
            root = Path(scratch) / str(size)
            root.mkdir()
            bids = _dataset(root, size)
            out = root / "out"
            first = _job(bids, out)
            second = _job(bids, out)
            skipped = _job(bids, out, "--skip-bids-validation")
            rows.append((size, first, second, skipped))
            print(f"{size}: {first:.1f} s, {second:.1f} s, {skipped:.1f} s", flush=True)
    lines = [
        "# Per-job overhead against dataset size",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, local disk, Python "
        f"{platform.python_version()}; one participant job that stops after indexing "
        "(`benchmarks/job_overhead.py`). Seconds per job, the interpreter's start and "
        "imports included.",
        "",
        "| participants | first job (database built) | later job | later job, "
        "`--skip-bids-validation` |",
        "|---|---|---|---|",
    ]
    lines += [f"| {size} | {first:.1f} | {second:.1f} | {skipped:.1f} |"
              for size, first, second, skipped in rows]
    (base, *_), (large, *_) = rows[0], rows[-1]
    slope = (rows[-1][3] - rows[0][3]) / (large - base)
    lines += ["", f"Growth of a later job without validation: {1000 * slope:.2f} ms per "
              "participant."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "job_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
