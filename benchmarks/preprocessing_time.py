"""Wall time of the participant-level preprocessing per real head, at 2 mm and 1 mm, and
its ratio to the engines called directly in one process.

One real IXI T1w head (with skull, 2 mm) is written as a BIDS dataset twice: as it is, and
upsampled to 1 mm (trilinear) so that the 1 mm run sees a realistic 1 mm input. Each runs
``bids_harmony ... participant`` on a fresh output with ``--resolution`` matching the input
(affine, and SyN at 1 mm); the per-step times come from Nipype's node reports. The
reference is :func:`direct_engines`: the same image through SimpleITK's N4, deepbet,
antspyx's registration and resampling and SimpleITK's Canny in one Python process, with no
Nipype, no BIDS and no sinks; the ratio app / reference is what the pipeline costs.

Usage::

    python benchmarks/preprocessing_time.py [--ixi-dir ../shared/data/ixi] [--omp-nthreads 2]

Writes ``preprocessing_time.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
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

from common import write_head_dataset

STEPS = ("reorient", "n4", "skullstrip", "register", "warp_brain", "warp_mask", "normalize",
         "edges")


def _step_times(work: Path) -> dict[str, float]:
    times: dict[str, float] = defaultdict(float)
    for report in work.rglob("_report/report.rst"):
        node = report.parent.parent.name
        match = re.search(r"\* duration : ([\d.]+)", report.read_text())
        if match and node in STEPS:
            times[node] += float(match.group(1))
    return dict(times)


def direct_engines(head: Path, resolution: int, registration: str, threads: int,
                   scratch: Path) -> float:
    """Seconds for the pipeline's engines on ``head`` in this process (imports included)."""
    start = time.perf_counter()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    import SimpleITK as sitk

    from bids_harmony.data.templates import bundled_template
    from bids_harmony.imaging.edges import canny_edges_at_ratio
    from bids_harmony.interfaces.brainmask import deepbet_mask
    from bids_harmony.interfaces.n4 import n4_correct

    template = bundled_template(resolution, scratch / "templates")
    image = nb.as_closest_canonical(nb.load(head))
    data = image.get_fdata(dtype=np.float32)
    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    sitk_image.SetSpacing([float(z) for z in image.header.get_zooms()[:3]])
    corrected = sitk.GetArrayFromImage(n4_correct(sitk_image, None, 4)[0]).T
    corrected_image = nb.Nifti1Image(corrected.astype(np.float32), image.affine)
    mask = deepbet_mask(corrected_image)
    brain = scratch / f"brain{resolution}.nii.gz"
    nb.Nifti1Image(corrected * mask, image.affine).to_filename(brain)
    fixed = ants.image_read(str(template.brain), pixeltype="float")
    moving = ants.image_read(str(brain), pixeltype="float")
    result = ants.registration(fixed, moving, type_of_transform={"affine": "Affine",
                                                                 "syn": "SyN"}[registration],
                               mask=ants.image_read(str(template.mask), pixeltype="float"),
                               outprefix=str(scratch / f"direct{resolution}{registration}_"))
    warped = ants.apply_transforms(fixed, moving, result["fwdtransforms"]).numpy()
    inside = warped > 0
    low, high = np.percentile(warped[inside], (1, 99))
    normalized = np.clip((warped - low) / (high - low), 0, 1) * inside
    canny_edges_at_ratio(normalized, 0.08, spacing=(resolution,) * 3, mask=inside)
    return time.perf_counter() - start


def _reference_seconds(head: Path, resolution: int, registration: str, threads: int,
                       scratch: Path) -> float:
    """:func:`direct_engines` in a fresh interpreter, as the app pays its imports too."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from pathlib import Path; from preprocessing_time import direct_engines; "
            f"print(direct_engines(Path({str(head)!r}), {resolution}, {registration!r}, "
            f"{threads}, Path({str(scratch)!r})))")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True)
    return float(result.stdout.strip().splitlines()[-1])


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
        for spacing, registration in ((2, "affine"), (1, "affine"), (1, "syn")):
            label = f"{spacing} mm {registration}"
            bids = Path(scratch) / f"bids{spacing}"
            if not bids.exists():
                write_head_dataset(bids, heads[:1], spacing)
            out = Path(scratch) / f"out{spacing}{registration}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bids_harmony", str(bids), str(out),
                            "participant", "--resolution", str(spacing),
                            "--registration", registration,
                            "--omp-nthreads", str(args.omp_nthreads)],
                           check=True, capture_output=True)
            wall = time.perf_counter() - start
            reference = _reference_seconds(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
                                           spacing, registration, args.omp_nthreads,
                                           Path(scratch))
            results[label] = (wall, reference, _step_times(out / ".bids_harmony_work"))
    lines = [
        "# Preprocessing time per subject (participant level, one real IXI T1w head)",
        "",
        f"{date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"--omp-nthreads {args.omp_nthreads}, head {heads[0].name}. Reference: the engines "
        "called directly in one fresh Python process (N4, deepbet, antspyx registration and "
        "resampling, Canny; imports included), no Nipype, BIDS or sinks.",
        "",
        "| grid, registration | app wall (s, incl. start-up) | reference (s) | app / reference | "
        + " | ".join(STEPS) + " |",
        "|---|---|---|---|" + "---|" * len(STEPS),
    ]
    for label, (wall, reference, steps) in results.items():
        lines.append(f"| {label} | {wall:.1f} | {reference:.1f} | {wall / reference:.2f} | "
                     + " | ".join(f"{steps.get(s, float('nan')):.1f}" for s in STEPS) + " |")
    (args.out / "preprocessing_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
