"""SGCD and the SSIM-guided disentanglement against source, histogram matching and
z-scoring, trained on several sites' scans.

The multi-site setting (every method sees every site's scans), not the blind one.

1. Generates a traveling-subject dataset (every head "scanned" at every simulated site) and
   preprocesses it once through the CLI (participant level, 2 mm, resumable with ``--work``):
   ``--part ixi`` is 7 real IXI heads x 3 sites, T1w; ``--part demo`` the MNI demo, 6
   subjects x 3 sites, T1w and T2w; ``--part all`` both.
2. Every method trains on all scans (every site, every sequence) of the first 4 heads, with
   target site SiemensTrio3T (one joint model over both sequences in the demo part); the
   other heads are held out.
3. Each held-out head's source-site scans are harmonized and scored against the same head's
   target-site scan: SSIM, PSNR and PCC inside both brain masks, the 1-D Wasserstein
   distance (WD) between the brain intensities of the harmonized and the target scan, and
   SSIM's structure term against the source (anatomy kept).
4. **Between-site WD**: for each held-out head, the mean pairwise WD between the brain
   intensity distributions of its scans at all sites (each summarised by 1001 quantiles,
   as the package's site-effect report does); a method row harmonizes every site's scan,
   the target site's included; the source row takes them untouched.
5. Rows: source, ``histmatch``, ``zscore``, SGCD stage 1 alone (target ``unified``), SGCD
   stage 1+2, SGCD with the random-Gram style extractor (does Psi matter?) and stage 1+2
   at other inference t_stops (``--t-stops``; the trained weights come from the cache);
   ``ssim_disentangle`` to SiemensTrio3T, to a second site (``ssim_disentangle-<site>``;
   source, histmatch and zscore are then also scored, and fitted, for that target) and its
   style-agnostic output (``ssim_disentangle-unified``), one trained model for all three.
6. Paper 002's site-level measures over all held-out heads: the WD between the sites' mean
   brain-intensity distributions (``site_wasserstein_matrix``) and the luminance SSIM between
   the sites' mean images (``site_luminance_ssim``), before and after.

SGCD trains at ``--preset`` (``cpu`` by default; ``tiny`` for a smoke run). Finished training
stages are cached under ``--work``/<part>/checkpoints/sgcd, so a rerun with the same data and
settings does not train again (its training times are then near 0 s). Each SGCD variant
first fits ``unified`` (timed: stage 1), then the target (timed: stage 2 plus the unified
images it computes). Rows whose harmonizer is not registered are skipped with a note.

Usage::

    python benchmarks/multisite_methods.py [--part ixi|demo|all] [--preset cpu]
        [--methods ROW ...] [--skip-sgcd] [--t-stops 50 100 250]
        [--sgcd-param KEY=VALUE ...] [--disentangle-param KEY=VALUE ...]
        [--skip-disentangle] [--work DIR]
        [--out benchmarks/results] [--report NAME]

Writes ``<report>.md`` and ``<report>.csv`` (``--report``, default ``multisite_methods``; one
row per method x scan pair) in ``--out``, and the disentanglement's loss-term plot and last
training mosaic beside them. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from blind_methods import _scores
from common import load_scans, run_cli

from bids_harmony.data.demo import DEFAULT_IXI_DIR, SITE_PROFILES, generate_demo_dataset
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer
from bids_harmony.harmonizers.base import UNIFIED
from bids_harmony.metrics import psnr, ssim, wasserstein
from bids_harmony.metrics.site_effect import (
    off_diagonal,
    site_luminance_ssim,
    site_wasserstein_matrix,
)
from bids_harmony.volume import Volume

TARGET = SITE_PROFILES[0].label
#: The second named target of the disentanglement rows.
SECOND_TARGET = SITE_PROFILES[2].label
DISENTANGLE = "ssim_disentangle"
DISENTANGLE_ROWS = {DISENTANGLE: TARGET, f"{DISENTANGLE}-{SECOND_TARGET}": SECOND_TARGET,
                    f"{DISENTANGLE}-unified": UNIFIED}
UMH = "umh"
#: UMH rows: the fit's target and settings over --preset's (the L_P ablation stops at
#: stage 1, the only stage L_P trains).
UMH_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    f"{UMH}-unified": (UNIFIED, {}),
    UMH: (TARGET, {}),
    f"{UMH}-perceptual-none-unified": (UNIFIED, {"perceptual": "none"}),
}
DATA_SEED = 0
SGCD = "sgcd"
PSI_DEFAULT, PSI_RANDOM = "style-contrastive", "random-gram"
CLASSICAL = ("histmatch", "zscore")
MEASURES = ("ssim", "psnr", "pcc", "wd_target", "structural_ssim")
#: The first participant-level call's seconds, in the part's work folder.
PREPROCESSING_RECORD = "preprocessing_seconds.txt"
Scans = dict[tuple[str, str], Volume]


class SgcdRow(NamedTuple):
    """An SGCD row's settings: Psi, the fit's target, the inference t_stop (0: trained)."""

    psi: str
    target: str
    t_stop: int


SGCD_ROWS = {
    "sgcd-unified": SgcdRow(PSI_DEFAULT, "unified", 0),
    "sgcd": SgcdRow(PSI_DEFAULT, TARGET, 0),
    "sgcd-random-gram": SgcdRow(PSI_RANDOM, TARGET, 0),
}


@dataclass(frozen=True)
class Part:
    """One dataset of the benchmark."""

    name: str
    anatomy: str
    subjects: int
    train_subjects: int
    sequences: tuple[str, ...]


PARTS = {
    "ixi": Part("ixi", "ixi", 7, 4, ("T1w",)),
    "demo": Part("demo", "mni", 6, 4, ("T1w", "T2w")),
}


@dataclass
class PartResult:
    """What one part measured: per-pair rows, per-head between-site WD, timings, models."""

    part: Part
    work: Path
    preprocessing_s: float
    grid: tuple[int, ...]
    train: list[str]
    held_out: list[str]
    sites: list[str]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    between: list[dict[str, Any]] = field(default_factory=list)
    site_level: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    ceiling: list[dict[str, Any]] = field(default_factory=list)


def _sgcd_row(name: str) -> SgcdRow | None:
    """The SGCD settings of a row name (``sgcd-t<N>``: the sweep), or None."""
    if name in SGCD_ROWS:
        return SGCD_ROWS[name]
    prefix = "sgcd-t"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return SgcdRow(PSI_DEFAULT, TARGET, int(name[len(prefix):]))
    return None


def _prepare(part: Part, args: argparse.Namespace) -> tuple[dict[str, Scans], float]:
    """Generate and preprocess ``part`` (resumable); its scans by sequence, and the CLI's
    seconds (the first call's are kept in the part's work folder)."""
    root = args.work / part.name
    bids, out = root / "bids", root / "out"
    if not bids.exists():
        generate_demo_dataset(bids, n_subjects=part.subjects, n_sites=args.sites,
                              seed=DATA_SEED, anatomy=part.anatomy, ixi_dir=args.ixi_dir,
                              sequences=list(part.sequences))
    seconds = run_cli(bids, out, "participant", "--resolution", "2", "--nprocs", args.nprocs,
                      "--work-dir", root / "work")
    record = root / PREPROCESSING_RECORD
    if not record.exists():
        record.write_text(f"{seconds:.1f}\n")
    scans = {seq: load_scans(bids, out, seq, with_maps=True) for seq in part.sequences}
    return scans, seconds


def _build(method: str, args: argparse.Namespace, part: Part,
           t_stop: int = 0, psi: str = PSI_DEFAULT, extra: dict[str, Any] | None = None
           ) -> Harmonizer:
    """A fresh harmonizer of a row: SGCD at ``--preset`` with the part's stage cache."""
    if method == DISENTANGLE:
        return HARMONIZERS[DISENTANGLE](
            preset=args.preset, checkpoint_dir=args.work / part.name / "checkpoints" / method,
            **_typed_params(DISENTANGLE, args.preset, args.disentangle_param))
    if method == UMH:
        return HARMONIZERS[UMH](
            preset=args.preset, checkpoint_dir=args.work / part.name / "checkpoints" / UMH,
            **{**_typed_params(UMH, args.preset, args.umh_param), **(extra or {})})
    if method != SGCD:
        return HARMONIZERS[method]()
    return HARMONIZERS[SGCD](preset=args.preset,
                             checkpoint_dir=args.work / part.name / "checkpoints" / SGCD,
                             **_sgcd_params(args), psi=psi, inference_t_stop=t_stop)


def _sgcd_params(args: argparse.Namespace) -> dict[str, Any]:
    """``--sgcd-param KEY=VALUE`` typed against SGCD's schema at ``--preset`` (psi and
    inference_t_stop are the rows' own)."""
    pairs = dict(item.split("=", 1) for item in args.sgcd_param)
    clash = {"psi", "inference_t_stop"} & set(pairs)
    if clash:
        raise SystemExit(f"--sgcd-param {', '.join(sorted(clash))}: set by the rows; pick rows "
                         "with --methods and the sweep with --t-stops instead")
    return _typed_params(SGCD, args.preset, args.sgcd_param)


def _typed_params(method: str, preset: str, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings typed against ``method``'s schema at ``preset``."""
    pairs = dict(item.split("=", 1) for item in items)
    return HARMONIZERS.info(method).parse_params(preset, pairs) if pairs else {}


def _card(model: Harmonizer) -> dict[str, Any]:
    """The model card's parameters (device dropped) and diagnostics, if any."""
    card = model.model_card()
    params = {k: v for k, v in card.get("parameters", {}).items() if k != "device"}
    return {"parameters": params,
            "diagnostics": model.diagnostics(),
            "loss_terms": model.loss_terms() if hasattr(model, "loss_terms") else None}


def _evaluate(result: PartResult, method: str, scans: dict[str, Scans],
              model: Harmonizer | None, target: str = TARGET, between: bool = True) -> None:
    """Harmonize every held-out scan (all sites), score the other sites' scans against the
    head's ``target`` scan and (with ``between``) the head's between-site WD and the
    site-level measures; append to ``result``."""
    seconds: list[float] = []
    for sequence, by_key in scans.items():
        harmonized: dict[str, list[Volume]] = {site: [] for site in result.sites}
        for subject in result.held_out:
            outputs: dict[str, np.ndarray] = {}
            for site in result.sites:
                volume = by_key[(subject, site)]
                if model is None:
                    outputs[site] = volume.data
                else:
                    start = time.perf_counter()
                    outputs[site] = model.transform(volume, sequence)
                    seconds.append(time.perf_counter() - start)
                harmonized[site].append(Volume(outputs[site], volume.mask))
            values = {site: [outputs[site][by_key[(subject, site)].mask]] for site in outputs}
            if between:
                head = float(off_diagonal(site_wasserstein_matrix(values)[1]).mean())
                result.between.append({"method": method, "sequence": sequence,
                                       "subject": subject, "between_site_wd": head})
            truth = by_key[(subject, target)]
            for site in result.sites:
                if site == target:
                    continue
                source = by_key[(subject, site)]
                scores = _scores(outputs[site], truth, source)
                scores["wd_target"] = wasserstein(outputs[site][source.mask], truth.brain)
                result.pairs.append({"part": result.part.name, "sequence": sequence,
                                     "method": method, "subject": subject, "source_site": site,
                                     "target_site": target, **scores})
        if between:
            result.site_level.append({"method": method, "sequence": sequence,
                                      **_site_level(harmonized)})
    if seconds:
        result.timings.setdefault(method, {})["transform_s"] = float(np.mean(seconds))


def _site_level(harmonized: dict[str, list[Volume]]) -> dict[str, float]:
    """Paper 002's measures over all held-out heads: mean WD between the sites' mean-intensity
    distributions, and mean luminance SSIM between the sites' mean images (inside every
    image's mask)."""
    values = {site: [v.data[v.mask] for v in volumes] for site, volumes in harmonized.items()}
    mask = np.logical_and.reduce([v.mask for volumes in harmonized.values() for v in volumes])
    means = {site: np.mean([v.data for v in volumes], axis=0)
             for site, volumes in harmonized.items()}
    return {"site_wd": float(off_diagonal(site_wasserstein_matrix(values)[1]).mean()),
            "site_luminance_ssim": float(off_diagonal(site_luminance_ssim(means, mask)[1]).mean())}


def _fit(model: Harmonizer, training: list[tuple[Volume, str, str]], target: str) -> float:
    """Fit on (volume, site, sequence) triples; returns seconds."""
    volumes, sites, sequences = (list(column) for column in zip(*training))
    start = time.perf_counter()
    model.fit(volumes, sites, sequences, target=target)
    return time.perf_counter() - start


def run_part(part: Part, args: argparse.Namespace, methods: list[str]) -> PartResult:
    """Prepare, train and score one part."""
    scans, preprocessing = _prepare(part, args)
    first = scans[part.sequences[0]]
    subjects = sorted({subject for subject, _ in first})
    sites = sorted({site for _, site in first}, key=lambda s: (s != TARGET, s))
    result = PartResult(part, args.work / part.name, preprocessing,
                        first[(subjects[0], TARGET)].data.shape,
                        subjects[:part.train_subjects], subjects[part.train_subjects:], sites)
    training = [(scans[seq][(s, site)], site, seq) for seq in part.sequences
                for s in result.train for site in sites]
    print(f"[{part.name}] {len(training)} training images; preprocessing {preprocessing:.0f} s",
          flush=True)
    targets = [TARGET, *sorted({t for m, t in DISENTANGLE_ROWS.items()
                                if m in methods and t not in (TARGET, UNIFIED)})]
    for target in targets:
        _evaluate(result, "source", scans, None, target, between=target == TARGET)
        for method in (m for m in methods if m in CLASSICAL):
            model = _build(method, args, part)
            fit_s = _fit(model, training, target)
            if target == TARGET:
                result.timings[method] = {"fit_s": fit_s}
            _evaluate(result, method, scans, model, target, between=target == TARGET)
            print(f"[{part.name}] {method} to {target}: done", flush=True)
    rows = {m: t for m, t in DISENTANGLE_ROWS.items() if m in methods}
    if rows and DISENTANGLE not in HARMONIZERS:
        result.skipped += list(rows)
    for method, target in rows.items() if DISENTANGLE in HARMONIZERS else ():
        model = _build(DISENTANGLE, args, part)
        fit_s = _fit(model, training, target)
        result.timings[method] = {"fit_s": fit_s}
        result.cards[method] = _card(model)
        if method == DISENTANGLE:
            _keep_pictures(model, result.work, args.out, part.name)
        _evaluate(result, method, scans, model, TARGET if target == UNIFIED else target)
        print(f"[{part.name}] {method}: done {result.timings[method]}", flush=True)
    umh_rows = {m: row for m, row in UMH_ROWS.items() if m in methods}
    for method, (target, extra) in umh_rows.items():
        model = _build(UMH, args, part, extra=extra)
        fit_s = _fit(model, training, target)
        result.timings[method] = {"fit_s": fit_s}
        result.cards[method] = _card(model)
        if method == f"{UMH}-unified":
            _reconstruction_ceiling(result, model, scans)
        _evaluate(result, method, scans, model)
        print(f"[{part.name}] {method}: done {result.timings[method]}", flush=True)
    specs = {m: spec for m in methods if (spec := _sgcd_row(m)) is not None}
    if specs and SGCD not in HARMONIZERS:
        result.skipped += list(specs)
        return result
    for psi in dict.fromkeys(spec.psi for spec in specs.values()):
        _run_sgcd_family(result, psi, {m: s for m, s in specs.items() if s.psi == psi},
                         scans, training, args)
    return result


def _reconstruction_ceiling(result: PartResult, model: Harmonizer,
                            scans: dict[str, Scans]) -> None:
    """UMH's autoencoder alone: D(E(scan)) against the scan itself, PSNR and SSIM inside the
    brain, for every held-out scan (no output of the model can be sharper)."""
    for sequence, by_key in scans.items():
        for subject in result.held_out:
            for site in result.sites:
                volume = by_key[(subject, site)]
                rebuilt = model.reconstruct(volume)  # type: ignore[attr-defined]
                result.ceiling.append({
                    "sequence": sequence, "subject": subject, "site": site,
                    "psnr": psnr(volume.data, rebuilt, volume.mask),
                    "ssim": ssim(volume.data, rebuilt, volume.mask)})


def _keep_pictures(model: Harmonizer, work: Path, out: Path, part: str) -> None:
    """The model's per-term loss plot and its last training sample mosaic, into ``out``."""
    saved = model.save(work / "models" / DISENTANGLE)
    for picture in sorted(saved.glob("loss_terms_*.png")):
        shutil.copyfile(picture, out / f"{DISENTANGLE}_{part}_{picture.name}")
    samples = sorted((work / "checkpoints" / DISENTANGLE / "samples").glob("*.png"))
    if samples:
        shutil.copyfile(samples[-1], out / f"{DISENTANGLE}_{part}_samples.png")


def _run_sgcd_family(result: PartResult, psi: str, specs: dict[str, SgcdRow],
                     scans: dict[str, Scans], training: list[tuple[Volume, str, str]],
                     args: argparse.Namespace) -> None:
    """One Psi's SGCD rows: fit ``unified`` (stage 1, timed), then the target (stage 2,
    timed), then the other inference t_stops (weights from the stage cache)."""
    part, family = result.part, f"sgcd[{psi}]"

    def record(method: str, model: Harmonizer, fit_s: float) -> None:
        result.timings[method] = {"fit_s": fit_s}
        result.cards[method] = _card(model)
        _evaluate(result, method, scans, model)
        print(f"[{part.name}] {method}: done {result.timings[method]}", flush=True)

    unified = _build(SGCD, args, part, psi=psi)
    stage1 = _fit(unified, training, "unified")
    result.timings[family] = {"stage 1": stage1}
    print(f"[{part.name}] {family} stage 1: {stage1:.1f} s", flush=True)
    for method in (m for m, spec in specs.items() if spec.target == "unified"):
        record(method, unified, stage1)
    del unified
    targeted = {m: spec for m, spec in specs.items() if spec.target != "unified"}
    if not targeted:
        return
    full = _build(SGCD, args, part, psi=psi)
    stage2 = _fit(full, training, TARGET)
    result.timings[family]["stage 2"] = stage2
    print(f"[{part.name}] {family} stage 2: {stage2:.1f} s", flush=True)
    for method in (m for m, spec in targeted.items() if spec.t_stop == 0):
        record(method, full, stage2)
    del full
    for method, spec in targeted.items():
        if spec.t_stop:
            model = _build(SGCD, args, part, t_stop=spec.t_stop, psi=psi)
            record(method, model, _fit(model, training, TARGET))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ixi", "demo", "all"], default="ixi")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--preset", default="cpu", help="preset of SGCD")
    parser.add_argument("--t-stops", type=int, nargs="*", default=[50, 100, 250],
                        help="inference t_stops of the sweep rows sgcd-t<N>")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rows beside source (default: histmatch zscore sgcd-unified sgcd "
                             "sgcd-random-gram and sgcd-t<N> for each --t-stops)")
    parser.add_argument("--skip-sgcd", action="store_true", help="drop every SGCD row")
    parser.add_argument("--sgcd-param", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings of every SGCD row over --preset's (as the CLI's "
                             "--harmonizer-param), e.g. space_to_channel=2")
    parser.add_argument("--disentangle-param", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings of the ssim_disentangle rows over --preset's")
    parser.add_argument("--skip-disentangle", action="store_true",
                        help="drop every ssim_disentangle row")
    parser.add_argument("--umh-param", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings of every umh row over --preset's")
    parser.add_argument("--skip-umh", action="store_true", help="drop every umh row")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--ixi-dir", type=Path, default=DEFAULT_IXI_DIR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bids_harmony_multisite_bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report", default="multisite_methods",
                        help="stem of the .md and .csv written in --out")
    args = parser.parse_args()
    methods = args.methods or [*CLASSICAL, *SGCD_ROWS, *(f"sgcd-t{t}" for t in args.t_stops),
                               *DISENTANGLE_ROWS, *UMH_ROWS]
    unknown = [m for m in methods if m not in CLASSICAL and _sgcd_row(m) is None
               and m not in DISENTANGLE_ROWS and m not in UMH_ROWS]
    if unknown:
        parser.error(f"--methods: unknown rows {unknown}; rows are {', '.join(CLASSICAL)}, "
                     f"{', '.join(SGCD_ROWS)}, sgcd-t<N>, {', '.join(DISENTANGLE_ROWS)} and "
                     f"{', '.join(UMH_ROWS)}")
    if args.skip_sgcd:
        methods = [m for m in methods if _sgcd_row(m) is None]
    if args.skip_disentangle:
        methods = [m for m in methods if m not in DISENTANGLE_ROWS]
    if args.skip_umh:
        methods = [m for m in methods if m not in UMH_ROWS]
    for key, value in (("NIPYPE_NO_ET", "1"), ("HF_HUB_OFFLINE", "1"), ("MPLBACKEND", "Agg")):
        os.environ.setdefault(key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = list(PARTS.values()) if args.part == "all" else [PARTS[args.part]]
    results = [run_part(part, args, methods) for part in parts]
    _write(args, results)


# -- report --------------------------------------------------------------------------------
def _mean_rows(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([row[key] for row in rows]))


def _machine() -> str:
    """CPU count and the GPU, if torch sees one."""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
            f"Python {platform.python_version()}")


def _write(args: argparse.Namespace, results: list[PartResult]) -> None:
    columns = ["part", "sequence", "method", "subject", "source_site", "target_site",
               *MEASURES]
    with (args.out / f"{args.report}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for result in results:
            writer.writerows(result.pairs)
    lines = [
        "# Multi-site harmonizers: SGCD and SSIM-guided disentanglement against source, "
        "histogram matching and z-scoring",
        "",
        f"{date.today().isoformat()}; {_machine()}. Seeds: data {DATA_SEED} "
        "(`generate_demo_dataset`), preprocessing the CLI's default `--seed`, the learned "
        f"methods their preset's `seed` (below). Target site {TARGET} (and {SECOND_TARGET} "
        f"for the `{DISENTANGLE}-{SECOND_TARGET}` row and the baselines beside it); preset "
        f"`{args.preset}`"
        f"{' with SGCD ' + ' '.join(args.sgcd_param) if args.sgcd_param else ''}"
        f"{' with ' + ' '.join(args.disentangle_param) if args.disentangle_param else ''}, "
        f"SGCD t_stop sweep {args.t_stops} at inference (0 = the trained t_stop). Every "
        "method trains on all scans (every site and sequence) of the training heads and is "
        "scored on the held-out heads' source-site scans against the same head's target scan.",
        "",
        "Measures: SSIM / PSNR (dB) / PCC against the target scan inside both brain masks; "
        "WD = 1-D Wasserstein distance between the brain intensities of the harmonized and "
        "the target scan; structural SSIM = SSIM's structure term against the source scan; "
        "between-site WD = per held-out head, the mean pairwise WD between its scans at all "
        "sites (1001 quantiles each, `site_wasserstein_matrix`), every scan harmonized "
        "(the target site's too) except in the source row. Histogram matching maps every "
        "scan's brain quantiles onto one reference, so its between-site WD is ~0 by "
        "construction; compare the learned rows with source and zscore there. Site WD and "
        "site luminance SSIM are paper 002's site-level measures over all held-out heads: the "
        "WD between the sites' mean-intensity distributions and the luminance term between "
        "the sites' mean images (mean over site pairs).",
    ]
    for result in results:
        lines += _part_section(result)
    (args.out / f"{args.report}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _part_section(result: PartResult) -> list[str]:
    part = result.part
    joint = f", one joint model over {' and '.join(part.sequences)}" if len(
        part.sequences) > 1 else ""
    record = result.work / PREPROCESSING_RECORD
    first = f"{float(record.read_text()):.0f}" if record.exists() else "?"
    lines = [
        "",
        f"## {part.name}: {part.anatomy.upper()} anatomy, {', '.join(part.sequences)}",
        "",
        f"{len(result.train) + len(result.held_out)} heads x {len(result.sites)} sites "
        f"({', '.join(result.sites)}), preprocessed by the CLI at 2 mm (grid {result.grid}; "
        f"participant level {first} s on the first call, {result.preprocessing_s:.0f} s in "
        f"this run, which resumes complete outputs). Training: {', '.join(result.train)} "
        f"({len(result.train) * len(result.sites) * len(part.sequences)} images{joint}); "
        f"held out: {', '.join(result.held_out)}.",
    ]
    if result.skipped:
        lines += ["", f"Skipped (harmonizer `{SGCD}` not registered): "
                      + ", ".join(f"`{m}`" for m in result.skipped) + "."]
    lines += _timing_lines(result)
    methods = list(dict.fromkeys(row["method"] for row in result.pairs))
    for sequence in part.sequences:
        rows = [r for r in result.pairs if r["sequence"] == sequence]
        lines += _sequence_tables(result, sequence, rows, methods)
    lines += _ceiling_lines(result)
    lines += _card_lines(result)
    return lines


def _ceiling_lines(result: PartResult) -> list[str]:
    """UMH's reconstruction ceiling per site: mean PSNR / SSIM of D(E(scan)) vs the scan."""
    if not result.ceiling:
        return []
    lines = ["", "UMH's autoencoder on the held-out scans, D(E(scan)) against the scan itself "
             "inside the brain (the ceiling: a translation cannot be sharper):", "",
             "| sequence | site | PSNR | SSIM |", "|---|---|---|---|"]
    for sequence in dict.fromkeys(r["sequence"] for r in result.ceiling):
        for site in result.sites:
            rows = [r for r in result.ceiling if r["sequence"] == sequence and r["site"] == site]
            lines.append(f"| {sequence} | {site} | {_mean_rows(rows, 'psnr'):.2f} | "
                         f"{_mean_rows(rows, 'ssim'):.3f} |")
    return lines


def _timing_lines(result: PartResult) -> list[str]:
    lines = ["", "Training wall time and inference time per 2 mm volume (a training time near "
             "0 s means the stage cache held an identical earlier run's weights):", ""]
    for name, timing in result.timings.items():
        if name.startswith("sgcd["):
            stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timing.items())
            lines.append(f"- `{name}` training: {stages}")
    for name, timing in result.timings.items():
        if name.startswith("sgcd["):
            continue
        fit = f"fit {timing['fit_s']:.1f} s" if "fit_s" in timing else "no fit"
        lines.append(f"- `{name}`: {fit}, {timing.get('transform_s', 0.0):.2f} s per volume")
    return lines


def _sequence_tables(result: PartResult, sequence: str, rows: list[dict[str, Any]],
                     methods: list[str]) -> list[str]:
    lines: list[str] = []
    for target in dict.fromkeys(r["target_site"] for r in rows):
        lines += _target_tables(result, sequence, [r for r in rows if r["target_site"] == target],
                                target)
    return lines + _between_table(result, sequence)


def _is_learned(method: str) -> bool:
    return _sgcd_row(method) is not None or method in DISENTANGLE_ROWS or method in UMH_ROWS


def _target_tables(result: PartResult, sequence: str, rows: list[dict[str, Any]],
                   target: str) -> list[str]:
    sources = [s for s in result.sites if s != target]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    means = {(m, s): {k: _mean_rows([r for r in rows if r["method"] == m
                                     and r["source_site"] == s], k) for k in MEASURES}
             for m in methods for s in sources}
    lines = ["", f"### {sequence}: vs the same head at {target} (means over "
             f"{len(result.held_out)} held-out heads)", "",
             "| method | source site | SSIM | PSNR | PCC | WD to target | structural SSIM |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        for site in sources:
            v = means[(method, site)]
            lines.append(f"| {method} | {site} | {v['ssim']:.3f} | {v['psnr']:.2f} | "
                         f"{v['pcc']:.3f} | {v['wd_target']:.3g} | {v['structural_ssim']:.3f} |")
    lines += ["", f"Mean PSNR gain over the source (dB), per source site ({sequence}, target "
              f"{target}):", ""]
    for method in methods[1:]:
        lines.append(f"- `{method}`: " + ", ".join(
            f"{s} {means[(method, s)]['psnr'] - means[('source', s)]['psnr']:+.2f}"
            for s in sources))
    learned = [m for m in methods if _is_learned(m)]
    baselines = [m for m in ("source", *CLASSICAL) if m in methods]
    if not learned:
        return lines
    lines += ["", f"Does a learned row beat the baselines ({sequence}, target {target})? Per "
              "source site, PSNR higher / WD to target lower than the baseline's mean:", "",
              "| row | source site | " + " | ".join(f"vs {b} PSNR | WD" for b in baselines)
              + " |", "|---|---|" + "---|---|" * len(baselines)]
    for method in learned:
        for site in sources:
            mine = means[(method, site)]
            cells = []
            for base in baselines:
                other = means[(base, site)]
                cells.append(f"{'yes' if mine['psnr'] > other['psnr'] else 'no'} "
                             f"({mine['psnr'] - other['psnr']:+.2f}) | "
                             f"{'yes' if mine['wd_target'] < other['wd_target'] else 'no'}")
            lines.append(f"| {method} | {site} | " + " | ".join(cells) + " |")
    return lines


def _between_table(result: PartResult, sequence: str) -> list[str]:
    between = [r for r in result.between if r["sequence"] == sequence]
    site_level = {r["method"]: r for r in result.site_level if r["sequence"] == sequence}
    source_between = _mean_rows([r for r in between if r["method"] == "source"],
                                "between_site_wd")
    lines = ["", f"Between-site WD of the held-out heads ({sequence}; lower is more "
             "harmonized), and the site-level measures:", "",
             "| method | mean | " + " | ".join(result.held_out)
             + " | below source | site WD | site luminance SSIM |",
             "|---|---|" + "---|" * len(result.held_out) + "---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in between):
        mine = {r["subject"]: r["between_site_wd"] for r in between if r["method"] == method}
        mean = float(np.mean(list(mine.values())))
        below = "—" if method == "source" else ("yes" if mean < source_between else "no")
        level = site_level[method]
        lines.append(f"| {method} | {mean:.3g} | "
                     + " | ".join(f"{mine[s]:.3g}" for s in result.held_out)
                     + f" | {below} | {level['site_wd']:.3g} | "
                       f"{level['site_luminance_ssim']:.4f} |")
    return lines


def _term_lines(result: PartResult) -> list[str]:
    """Each disentanglement loss term: mean over the first and the last tenth of training
    (one model serves every row, so the first card with terms is shown)."""
    card = next((c for m, c in result.cards.items() if m in DISENTANGLE_ROWS
                 and c.get("loss_terms")), None)
    if card is None:
        return []
    lines: list[str] = []
    for sequence, curves in card["loss_terms"].items():
        lines += ["", f"Loss terms of `{DISENTANGLE}`, {sequence}: means of the card's "
                  "thinned curve over the first and the last tenth of the steps (the whole "
                  "curves are in the model card's `loss_terms`):", "",
                  "| term | first tenth | last tenth |", "|---|---|---|"]
        for name, curve in curves.items():
            values = np.asarray(curve["loss"], dtype=np.float64)
            tenth = max(1, values.size // 10)
            lines.append(f"| {name} | {values[:tenth].mean():.4g} | "
                         f"{values[-tenth:].mean():.4g} |")
    return lines


def _card_lines(result: PartResult) -> list[str]:
    if not result.cards:
        return []
    lines = _term_lines(result) + ["", f"### Learned model cards ({result.part.name})", ""]
    for method, card in result.cards.items():
        lines += [f"`{method}` parameters: `{json.dumps(card['parameters'], default=str)}`", ""]
        if card["diagnostics"] is not None:
            lines += [f"<details><summary><code>{method}</code> diagnostics</summary>", "",
                      "```json", json.dumps(card["diagnostics"], indent=1, default=str), "```",
                      "", "</details>", ""]
    return lines


if __name__ == "__main__":
    main()
