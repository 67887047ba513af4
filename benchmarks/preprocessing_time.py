"""Wall time of the participant-level preprocessing per real head, at 2 mm and 1 mm.

One real IXI T1w head (with skull, 2 mm) is written as a BIDS dataset twice: as it is, and
upsampled to 1 mm (trilinear) so that the 1 mm run sees a realistic 1 mm input. Each runs
``bids_harmony ... participant`` on a fresh output with ``--resolution`` matching the input;
the per-step times come from Nipype's node reports.

Usage::

    python benchmarks/preprocessing_time.py [--ixi-dir ../shared/data/ixi] [--omp-nthreads 2]

Writes ``preprocessing_time.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

STEPS = ("reorient", "n4", "skullstrip", "register", "warp_brain", "warp_mask", "normalize",
         "edges")


def _bids_with_head(root: Path, head: Path, spacing: int) -> None:
    image = nb.load(head)
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    if spacing == 1:
        data = ndimage.zoom(data, 2, order=1)
        affine[:3, :3] /= 2
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nb.Nifti1Image(data.astype(np.int16), affine).to_filename(anat / "sub-01_T1w.nii.gz")
    (anat / "sub-01_T1w.json").write_text(json.dumps(
        {"Manufacturer": "Philips", "ManufacturersModelName": "Intera", "MagneticFieldStrength": 3}
    ))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "IXI head", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))


def _step_times(work: Path) -> dict[str, float]:
    times: dict[str, float] = defaultdict(float)
    for report in work.rglob("_report/report.rst"):
        node = report.parent.parent.name
        match = re.search(r"\* duration : ([\d.]+)", report.read_text())
        if match and node in STEPS:
            times[node] += float(match.group(1))
    return dict(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ixi-dir", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi")
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    heads = sorted((args.ixi_dir / "nifti").glob("*.nii.gz"))
    if not heads:
        sys.exit(f"no IXI heads in {args.ixi_dir / 'nifti'}; pass --ixi-dir")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for spacing in (2, 1):
            bids, out = Path(scratch) / f"bids{spacing}", Path(scratch) / f"out{spacing}"
            _bids_with_head(bids, heads[0], spacing)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bids_harmony", str(bids), str(out),
                            "participant", "--resolution", str(spacing),
                            "--omp-nthreads", str(args.omp_nthreads)],
                           check=True, capture_output=True)
            results[spacing] = (time.perf_counter() - start,
                                _step_times(out / ".bids_harmony_work"))
    lines = [
        "# Preprocessing time per subject (participant level, one real IXI T1w head)",
        "",
        f"{date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"--omp-nthreads {args.omp_nthreads}, affine registration, head {heads[0].name}.",
        "",
        "| grid | total wall (s, incl. start-up) | " + " | ".join(STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for spacing, (wall, steps) in results.items():
        lines.append(f"| {spacing} mm | {wall:.1f} | "
                     + " | ".join(f"{steps.get(s, float('nan')):.1f}" for s in STEPS) + " |")
    (args.out / "preprocessing_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
