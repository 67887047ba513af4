"""BlindHarmonyDiff inference in fp32 and bf16: time per volume and how far bf16 drifts.

Trains one BlindHarmonyDiff model (fp32, on the CPU) on the nilearn MNI152 T1 template at
4 mm (brain-extracted, normalised in the mask as the pipeline does), then harmonizes a
"source scan" (the same template under a gamma contrast change, as another scanner would
give it) twice from the same weights, edge map, noise and seed: once with every network
evaluation of the ODE in fp32 and once under ``torch.autocast`` in bf16. Reports the time per
volume of each and the PSNR, SSIM and max / mean absolute difference of the bf16 output
against the fp32 one (in the brain mask, intensities in [0, 1]).

Usage::

    NIPYPE_NO_ET=1 python benchmarks/bhd_precision.py [--preset tiny] [--steps 200] \
        [--device cpu] [--out benchmarks/results]

Writes ``bhd_precision.md`` in ``--out`` (date, machine and budget in the header). Not a test:
rerun it on a GPU (``--device cuda``) for the numbers ``precision=auto`` is chosen for.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bids_harmony.volume import Volume
from bids_harmony.harmonizers.blindharmonydiff import BlindHarmonyDiff
from bids_harmony.metrics import psnr, ssim

SEQUENCE = "T1w"
SITE = "reference"
#: The source scanner's contrast: intensities raised to this power inside the brain.
SOURCE_GAMMA = 1.5
#: Every 4th voxel of nilearn's 1 mm template: a 4 mm grid the CPU samples in bf16 in minutes.
STRIDE_MM = 4


def mni_volume(gamma: float = 1.0) -> Volume:
    """The MNI152 T1 template at 4 mm in the pipeline's [0, 1] brain normalisation."""
    from nilearn import datasets  # heavy import, needed only here

    crop = (slice(None, None, STRIDE_MM),) * 3
    data = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, np.float32)[crop]
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj)[crop] > 0.5
    low, high = np.percentile(data[mask], [1, 99])
    normalised = np.clip((data - low) / (high - low), 0.0, 1.0) ** gamma
    return Volume(np.where(mask, normalised, 0.0).astype(np.float32), mask)


def with_precision(fitted: BlindHarmonyDiff, precision: str) -> BlindHarmonyDiff:
    """``fitted``'s weights under another inference precision (same seed, same noise)."""
    params = {k: v for k, v in fitted.params.items() if k not in ("preset", "precision")}
    twin = BlindHarmonyDiff(preset=fitted.params["preset"], **params, precision=precision)
    twin.state_, twin.shared_state_, twin.target_site_, twin.training_ = (
        fitted.state_, fitted.shared_state_, fitted.target_site_, fitted.training_
    )
    return twin


def timed_transform(
    harmonizer: BlindHarmonyDiff, source: Volume
) -> tuple[np.ndarray, float, float]:
    """The harmonized image, wall seconds and this process's CPU seconds (all threads): CPU
    time is the steadier measure when other jobs share the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = harmonizer.transform(source, SEQUENCE)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (AVX-512 BF16 or AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{model} ({', '.join(native) if native else 'no native bf16: no AVX-512 BF16 / AMX'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    reference, source = mni_volume(), mni_volume(SOURCE_GAMMA)
    start = time.perf_counter()
    fitted = BlindHarmonyDiff(
        preset=args.preset, steps=args.steps, device=args.device, precision="fp32"
    ).fit([reference], [SITE], [SEQUENCE], target=SITE)
    training_s = time.perf_counter() - start
    fp32_out, fp32_s, fp32_cpu_s = timed_transform(fitted, source)
    bf16_out, bf16_s, bf16_cpu_s = timed_transform(with_precision(fitted, "bf16"), source)
    load_after = os.getloadavg()[0]

    mask = source.mask
    difference = np.abs(bf16_out - fp32_out)[mask]
    settings = fitted.settings
    losses = fitted.state_[SEQUENCE]["loss_history"]
    lines = [
        "# BlindHarmonyDiff inference precision: fp32 vs bf16",
        "",
        f"{date.today().isoformat()}; {'CPU' if args.device == 'cpu' else args.device} "
        f"numbers: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; load "
        f"average {load_before:.1f} at the start, {load_after:.1f} at the end. "
        "The GPU measurement, the case `precision=auto` picks bf16 for, is pending.",
        "",
        f"Budget: preset `{args.preset}` (base channels {settings.base_channels}, patch "
        f"{settings.patch_size}³, batch {settings.batch_size}) trained {settings.steps} steps "
        f"in fp32 on one volume ({training_s:.0f} s, loss {losses[:10].mean():.3f} → "
        f"{losses[-10:].mean():.3f} over the first / last 10 steps); the nilearn MNI152 T1 "
        f"template at {STRIDE_MM} mm ({'x'.join(map(str, reference.data.shape))} voxels, "
        f"{int(mask.sum())} in the brain). Source: the template with intensities to the "
        f"power {SOURCE_GAMMA}. Sampling: {settings.sampling_steps} {settings.solver} ODE "
        f"steps ({settings.sampling_steps * (2 if settings.solver == 'midpoint' else 1)} "
        f"network evaluations), {settings.refinement_steps} NCC refinement steps "
        f"({settings.refinement_schedule}); same weights, edge map, noise and seed for both; "
        "one timed run each, Canny edges included.",
        "",
        "| precision | time per volume (s) | CPU time per volume (s) | PSNR vs fp32 (dB) | "
        "SSIM vs fp32 | max abs diff | mean abs diff |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 | {fp32_s:.1f} | {fp32_cpu_s:.1f} | — | — | — | — |",
        f"| bf16 (autocast) | {bf16_s:.1f} | {bf16_cpu_s:.1f} | "
        f"{psnr(bf16_out, fp32_out, mask):.2f} | "
        f"{ssim(bf16_out, fp32_out, mask):.5f} | {difference.max():.4f} | "
        f"{difference.mean():.5f} |",
        "",
        f"bf16 / fp32: {bf16_s / fp32_s:.1f}x the time, {bf16_cpu_s / fp32_cpu_s:.1f}x the "
        "CPU time. Differences are in the harmonized "
        "[0, 1] intensities, inside the brain mask.",
    ]
    if args.device == "cpu":
        lines += [
            "",
            "Without native bf16 the CPU runs bf16 3D convolutions through PyTorch's generic "
            "`slow_conv3d` kernel (seen in the profiler), hence the slowdown; this is why "
            "`precision=auto` stays fp32 on a CPU.",
        ]
    (args.out / "bhd_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
