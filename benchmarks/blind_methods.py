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
   against the untouched scan (PSNR, SSIM). A fourth, non-monotone domain (|x - 0.5|: CSF
   brighter than grey matter, as a sequence change can make it) shows what no intensity
   mapping can undo. The paper's own numbers stand beside ours.
5. **Diagnostics and budget curves**: each learned model's held-out diagnostics over its
   training steps (the model card's), as a table and ``blind_methods_curves.png``.
6. **Inference cost** of BlindHarmonyDiff at 2 mm (measured on the held-out volumes) and at
   1 mm (the same network and sampler on a box of twice the side, weights irrelevant).

The learned methods train at their ``cpu`` preset (the default without a GPU) unless
``--preset`` says otherwise; ``blindharmony-noflow`` is BlindHarmony's own model applied with
alpha = 0 (Algorithm 1 without the flow step). Trained weights go to the stage cache under
``--work``, so a rerun with the same data and settings does not train again.

Usage::

    python benchmarks/blind_methods.py [--anatomy ixi] [--subjects 7] [--train-subjects 4]
        [--preset cpu] [--work DIR] [--out benchmarks/results]

Writes ``blind_methods.md``, ``blind_methods.csv`` and ``blind_methods_curves.png`` in
``--out``. Not a test.
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

import numpy as np

from common import load_scans, run_cli

from bids_harmony.data.demo import DEFAULT_IXI_DIR, SITE_PROFILES, generate_demo_dataset
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer
from bids_harmony.volume import Volume
from bids_harmony.metrics import pearson, psnr
from bids_harmony.metrics.similarity import ssim_components

SUFFIX = "T1w"
SIMULATED_DOMAINS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "log": lambda x: np.log1p(3.0 * x),
    "gamma 0.7": lambda x: x**0.7,
    "non-monotone": lambda x: np.abs(x - 0.5),
}
#: BlindHarmony's Table 1 (PSNR dB, SSIM) on its own data, for the rows it has.
PAPER_SIMULATED = {
    "source": {"exp": (22.6, 0.952), "log": (21.4, 0.958), "gamma 0.7": (21.6, 0.955)},
    "blindharmony": {"exp": (29.7, 0.985), "log": (28.7, 0.979), "gamma 0.7": (27.5, 0.971)},
    "histmatch": {"exp": (26.5, 0.961), "log": (26.5, 0.961), "gamma 0.7": (26.5, 0.961)},
    "ssimh": {"exp": (26.1, 0.971), "log": (25.8, 0.972), "gamma 0.7": (26.2, 0.945)},
}
LEARNED = ("blindharmony", "blindharmonydiff")
#: Benchmark rows that are a learned method's model applied with other settings.
ABLATIONS = {"blindharmony-noflow": ("blindharmony", {"alpha": 0.0})}


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


def _build(method: str, args: argparse.Namespace) -> Harmonizer:
    """The harmonizer of a benchmark row: learned ones at ``--preset`` with the stage cache
    under ``--work``; an ablation is its method with the ablation's settings."""
    name, overrides = ABLATIONS.get(method, (method, {}))
    if name in LEARNED:
        return HARMONIZERS[name](preset=args.preset, checkpoint_dir=args.work / "checkpoints",
                                 **overrides)
    return HARMONIZERS[name](**overrides)


def _one_mm_seconds(model: Harmonizer, volume: Volume) -> float:
    """Seconds BlindHarmonyDiff's sampler and refinement take on a 1 mm brain box: the
    network of ``model``'s settings on a box of twice the 2 mm box's sides (random weights:
    the cost does not depend on them), plus the Canny map of a 1 mm volume."""
    import torch
    from scipy import ndimage

    from bids_harmony.harmonizers.blindharmonydiff import (
        BrainBox, build_network, padded_shape, pipeline_edge_map, sample_and_refine,
    )

    settings = model.settings  # type: ignore[attr-defined]
    network = build_network(settings).eval()
    box = BrainBox.from_state(model.state_[SUFFIX])
    shape = padded_shape([2 * (b - a) for a, b in zip(box.start, box.stop)], network.divisor, 1)
    fine = Volume(ndimage.zoom(volume.data, 2, order=1),
                  ndimage.zoom(volume.mask.astype(np.uint8), 2, order=0) > 0, (1.0, 1.0, 1.0))
    start = time.perf_counter()
    pipeline_edge_map(fine, settings.edge_ratio)
    condition = torch.zeros((1, 4, *shape))
    noise = torch.randn((1, 1, *shape))
    source = torch.rand((1, 1, *shape))
    mask = torch.ones((1, 1, *shape), dtype=torch.bool)
    sample_and_refine(network, condition, noise, source, mask, settings)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy", choices=["ixi", "mni"], default="ixi")
    parser.add_argument("--subjects", type=int, default=7)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--train-subjects", type=int, default=4)
    parser.add_argument("--preset", default="cpu", help="preset of the learned methods")
    parser.add_argument("--methods", nargs="+",
                        default=["histmatch", "ssimh", "blindharmony", "blindharmony-noflow",
                                 "blindharmonydiff"])
    parser.add_argument("--simulated-methods", nargs="+",
                        default=["histmatch", "ssimh", "blindharmony", "blindharmony-noflow"],
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
    scans = load_scans(bids, out, SUFFIX)
    target = SITE_PROFILES[0].label
    subjects = sorted({subject for subject, _ in scans})
    train, held_out = subjects[:args.train_subjects], subjects[args.train_subjects:]
    sources = sorted({site for _, site in scans} - {target})
    training = [scans[(s, target)] for s in train]

    table1: list[dict[str, Any]] = []
    simulated: list[dict[str, Any]] = []
    timings: dict[str, dict[str, float]] = {}
    models: dict[str, Harmonizer] = {}
    for method in ["source", *args.methods]:
        harmonizer: Harmonizer | None = None
        if method != "source":
            harmonizer = _build(method, args)
            start = time.perf_counter()
            harmonizer.fit(training, [target] * len(training), [SUFFIX] * len(training), target)
            timings[method] = {"fit_s": time.perf_counter() - start}
            models[method] = harmonizer

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
        if method == "blindharmonydiff" and harmonizer is not None:
            timings[method]["transform_1mm_s"] = _one_mm_seconds(
                harmonizer, scans[(held_out[0], target)])
        print(f"{method}: done", timings.get(method, {}), flush=True)
    _write(args, table1, simulated, timings, models, target, train, held_out, preprocessing,
           scans[(train[0], target)].data.shape)


def _write(args: argparse.Namespace, table1: list[dict[str, Any]],
           simulated: list[dict[str, Any]], timings: dict[str, dict[str, float]],
           models: dict[str, Harmonizer], target: str, train: list[str],
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
        f"the CLI at 2 mm (grid {grid}; this run's participant-level call {preprocessing:.0f} s, "
        "a few seconds when it resumed complete outputs). Training data of every method: "
        f"the {len(train)} target-site ({target}) scans of {', '.join(train)}; scored on the "
        f"held-out {', '.join(held_out)}.",
        "",
        f"Learned methods at preset `{args.preset}` (a training time near 0 s means the stage "
        "cache held the weights of an identical earlier run; the model card's loss curve and "
        "diagnostics are that run's):",
        "",
    ]
    for method, model in models.items():
        name = ABLATIONS.get(method, (method,))[0]
        if name not in LEARNED:
            continue
        fit, apply = timings[method]["fit_s"], timings[method].get("transform_s", 0.0)
        params = {k: v for k, v in model.params.items() if k not in ("device",)}
        extra = ""
        if "transform_1mm_s" in timings[method]:
            extra = f", {timings[method]['transform_1mm_s']:.1f} s per 1 mm volume"
        lines.append(f"- `{method}`: training {fit:.0f} s, {apply:.1f} s per 2 mm volume"
                     f"{extra}; settings `{params}`.")
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
    source_rows = {r["source_site"]: r["psnr"] for r in table1 if r["method"] == "source"}
    lines += ["", "Mean PSNR gain over the source (dB), per source site:", ""]
    for method in dict.fromkeys(row["method"] for row in table1 if row["method"] != "source"):
        gains = [f"{r['source_site']} {r['psnr'] - source_rows[r['source_site']]:+.2f}"
                 for r in table1 if r["method"] == method]
        lines.append(f"- `{method}`: " + ", ".join(gains))
    domains = list(SIMULATED_DOMAINS)
    lines += [
        "",
        "## BlindHarmony Table 1 layout: simulated domains of the target site",
        "",
        "PSNR (dB) / SSIM of the harmonized image against the untouched target-site scan; "
        "rows marked *paper* are BlindHarmony's Table 1 (its own data, 1.2 mm slices).",
        "",
        "| method | " + " | ".join(f"{d} PSNR | SSIM" for d in domains) + " |",
        "|---|" + "---|---|" * len(domains),
    ]
    for method in dict.fromkeys(row["method"] for row in simulated):
        rows = [r for r in simulated if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(
            f"{r['psnr']:.2f} | {r['ssim']:.3f}" for r in rows) + " |")
        if method in PAPER_SIMULATED:
            paper = PAPER_SIMULATED[method]
            lines.append(f"| *{method}, paper* | " + " | ".join(
                f"{paper[d][0]:.1f} | {paper[d][1]:.3f}" if d in paper else "— | —"
                for d in domains) + " |")
    lines += _diagnostics_section(models, args.out)
    (args.out / "blind_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _diagnostics_section(models: dict[str, Harmonizer], out: Path) -> list[str]:
    """The learned models' held-out diagnostics over training (the model cards'), as a
    table and a figure: what more training steps bought."""
    from matplotlib.figure import Figure

    learned = {m: model for m, model in models.items() if m in LEARNED}
    if not learned:
        return []
    lines = ["", "## Diagnostics over training (held-out target images, the model card's)", ""]
    figure = Figure(figsize=(5 * len(learned), 3.5))
    axes = figure.subplots(1, len(learned), squeeze=False)[0]
    for axis, (method, model) in zip(axes, learned.items()):
        diagnostics = model.diagnostics()[SUFFIX]  # type: ignore[attr-defined]
        history = diagnostics["history"]
        names = [k for k in history[0] if k != "step"] if history else []
        lines += [f"`{method}` (scored on {diagnostics['scored_on']} images; baselines "
                  f"{diagnostics['baselines'] or 'none'}; learned: {diagnostics['learned']})", "",
                  "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |"
                  for r in history]
        lines += [f"- warning: {w}" for w in diagnostics["warnings"]] + [""]
        for name in names:
            if name.startswith(("own_edge_psnr", "gamma_psnr")):
                axis.plot([r["step"] for r in history], [r[name] for r in history], "o-",
                          label=name)
        for name, value in diagnostics["baselines"].items():
            axis.axhline(value, ls="--", c="grey", label=name)
        axis.set_xlabel("training step")
        axis.set_ylabel("PSNR (dB), held-out")
        axis.set_title(method)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "blind_methods_curves.png", dpi=100)
    return lines + ["![diagnostics over training](blind_methods_curves.png)"]


if __name__ == "__main__":
    main()
