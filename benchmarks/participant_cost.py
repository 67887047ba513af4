"""What one participant costs on a cluster: per heavy step, wall seconds, CPU seconds and
peak memory (Nipype's resource monitor, sampling each worker process and its children), and
the disk each image leaves in the work directory and the derivatives.

Two real IXI heads with skull (two sites) are written as a BIDS dataset at 1 mm (upsampled
from the 2 mm IXI files) and at 2 mm, and run through the whole chain (participant, group
``histmatch``, participant applying the model) with ``--nprocs 2 --omp-nthreads 2``. The
monitor is switched on for the app's subprocesses with a ``nipype.cfg`` in
``NIPYPE_CONFIG_DIR``. These numbers size ``NODE_RESOURCES`` in
``bids_harmony/workflows/plugins.py`` and the README's "Scale" arithmetic.

Needs psutil (``pip install -e .[benchmarks]``), which the monitor samples with. Usage::

    python benchmarks/participant_cost.py [--ixi-dir ../shared/data/ixi] [--out benchmarks/results]

Writes ``participant_cost.md`` and ``participant_cost.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

from common import write_head_dataset

FIELDS = {"duration": "wall_s", "mem_peak_gb": "peak_gb"}


def _node_costs(work: Path) -> dict[str, list[dict[str, float]]]:
    """Every node run's monitored cost, by node name (one entry per image)."""
    costs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for report in work.rglob("_report/report.rst"):
        text = report.read_text()
        values = {}
        for field, key in FIELDS.items():
            match = re.search(rf"\* {field} : ([\d.eE+-]+)", text)
            if match:
                values[key] = float(match.group(1))
        if "wall_s" in values:
            costs[report.parent.parent.name].append(values)
    return costs


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _run(bids: Path, out: Path, resolution: int, env: dict[str, str]) -> dict[str, object]:
    common = ["--resolution", str(resolution), "--nprocs", "2", "--omp-nthreads", "2",
              "--skip-bids-validation"]
    work = out / ".bids_harmony_work"
    seconds, cpu_seconds = {}, {}
    for name, level, extra in (("participant", "participant", []),
                               ("group", "group", ["--method", "histmatch"]),
                               ("apply", "participant", [])):
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        # In the scratch folder: the monitor leaves a .proc-* file per sample in the cwd.
        result = subprocess.run([sys.executable, "-m", "bids_harmony", bids, out, level,
                                 *common, *extra], capture_output=True, text=True, env=env,
                                cwd=out.parent)
        if result.returncode != 0:
            sys.exit(f"{level} failed:\n{result.stderr[-3000:]}")
        seconds[name] = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds[name] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    images = len(list(bids.rglob("*_T1w.nii.gz")))
    derivatives = sum(p.stat().st_size for p in out.rglob("sub-*/**/*") if p.is_file())
    return {
        "resolution": resolution, "images": images, "level_seconds": seconds,
        "level_cpu_seconds": cpu_seconds,
        "nodes": _node_costs(work),
        "work_mb_per_image": _size_mb(work / "bids_harmony_wf") / images,
        "derivatives_mb_per_image": derivatives / 2**20 / images,
    }


def _summary(run: dict) -> dict[str, object]:
    """Per node: mean wall seconds per image, the largest memory peak; per image:
    the CPU time of the two participant levels (every process, from ``getrusage``) and the
    largest peak of any node."""
    nodes = {}
    for name, runs in sorted(run["nodes"].items()):
        nodes[name] = {
            "wall_s": sum(r["wall_s"] for r in runs) / run["images"],
            "peak_gb": max(r.get("peak_gb", 0.0) for r in runs),
        }
    cpu = run["level_cpu_seconds"]
    return {
        "nodes": nodes,
        "cpu_min_per_image": (cpu["participant"] + cpu["apply"]) / run["images"] / 60,
        "group_cpu_min": cpu["group"] / 60,
        "node_wall_min_per_image": sum(n["wall_s"] for n in nodes.values()) / 60,
        "peak_gb": max(n["peak_gb"] for n in nodes.values()),
    }


def _markdown(runs: list[dict], summaries: list[dict]) -> str:
    lines = [
        "# Participant cost (Nipype resource monitor)",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; two real IXI heads with skull (two sites), "
        "`--nprocs 2 --omp-nthreads 2`, affine registration; participant, group `histmatch`, "
        "participant applying the model. Per step: wall s per image, and the largest resident "
        "memory the monitor sampled in the process that ran it (a MultiProc worker with "
        "Python and its libraries, or the main process for the sinks and light steps; the "
        "monitor's CPU percent is left out: its samples of multi-threaded steps exceed "
        "what 2 cores can give); CPU minutes: `getrusage` of every process of the two "
        "participant levels. Generated by `benchmarks/participant_cost.py`.",
        "",
    ]
    names = sorted({name for s in summaries for name in s["nodes"]},
                   key=lambda n: -max(s["nodes"].get(n, {}).get("wall_s", 0) for s in summaries))
    header = "| step | " + " | ".join(
        f"{r['resolution']} mm wall s | {r['resolution']} mm peak GB"
        for r in runs) + " |"
    lines += [header, "|" + "---|" * (1 + 2 * len(runs))]
    for name in names:
        cells = []
        for summary in summaries:
            node = summary["nodes"].get(name)
            cells += (["-"] * 2 if node is None else
                      [f"{node['wall_s']:.1f}", f"{node['peak_gb']:.2f}"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| per image | " + " | ".join(f"{r['resolution']} mm" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    rows = {
        "CPU minutes (both participant levels, all processes)": [
            f"{s['cpu_min_per_image']:.2f}" for s in summaries],
        "group level CPU minutes (2 images)": [f"{s['group_cpu_min']:.2f}" for s in summaries],
        "step wall minutes (sum of steps)": [f"{s['node_wall_min_per_image']:.2f}"
                                             for s in summaries],
        "largest step peak, GB": [f"{s['peak_gb']:.2f}" for s in summaries],
        "work directory, MB": [f"{r['work_mb_per_image']:.0f}" for r in runs],
        "derivatives, MB": [f"{r['derivatives_mb_per_image']:.1f}" for r in runs],
        "participant level wall s (2 images, 2 cores)": [
            f"{r['level_seconds']['participant']:.0f}" for r in runs],
        "group level wall s": [f"{r['level_seconds']['group']:.0f}" for r in runs],
        "applying participant level wall s": [f"{r['level_seconds']['apply']:.0f}"
                                              for r in runs],
    }
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ixi-dir", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if importlib.util.find_spec("psutil") is None:
        sys.exit("Nipype's resource monitor needs psutil: pip install -e .[benchmarks]")
    heads = sorted((args.ixi_dir / "nifti").glob("*.nii.gz"))[:2]
    if len(heads) < 2:
        sys.exit(f"need two IXI heads under {args.ixi_dir / 'nifti'}")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        config_dir = Path(scratch) / "nipype"
        config_dir.mkdir()
        (config_dir / "nipype.cfg").write_text(
            "[monitoring]\nenabled = true\nsample_frequency = 0.5\n")
        env = {**os.environ, "NIPYPE_CONFIG_DIR": str(config_dir)}
        for resolution in (1, 2):
            root = Path(scratch) / f"{resolution}mm"
            bids = write_head_dataset(root / "bids", heads, resolution)
            runs.append(_run(bids, root / "out", resolution, env))
            print(f"{resolution} mm done: {runs[-1]['level_seconds']}", flush=True)
    summaries = [_summary(run) for run in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "participant_cost.md").write_text(_markdown(runs, summaries))
    (args.out / "participant_cost.json").write_text(json.dumps(
        {"runs": [{k: v for k, v in r.items() if k != "nodes"} for r in runs],
         "summaries": summaries}, indent=1))
    print((args.out / "participant_cost.md").read_text())


if __name__ == "__main__":
    main()
