"""Wall time of ``make demo``'s four steps, and how much of it the Nipype nodes worked.

Runs the README's main job (demo dataset, participant, group, participant with native
outputs) from scratch with the package of ``--before`` (a git commit, checked out in a
temporary worktree) and with this checkout, one after the other on the same machine, and
writes per step: wall seconds, the summed ``runtime.duration`` of the Nipype nodes that ran
in that step (their result files), and the ratio wall / work, the overhead the issue
"fast on one machine" bounds at 1.3 for the participant level with a fitted model.

Usage::

    python benchmarks/demo_time.py [--before COMMIT] [--codes before after] [--out DIR]

Writes ``demo_time.md`` (and ``demo_time.json``). Not a test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_WRITTEN = re.compile(r"group report \S+ written in (\d+(?:\.\d+)?) s")


def _steps(bids: Path, out: Path, templateflow_home: Path | None
           ) -> list[tuple[str, list[str]]]:
    common = ["--resolution", "2", "--nprocs", "2", "-v"]
    # this checkout's ``make demo``: 3 subjects and its own TemplateFlow home; before: 4
    home = (["--subjects", "3", "--templateflow-home", str(templateflow_home)]
            if templateflow_home else [])
    return [
        ("demo dataset", ["-m", "bids_harmony.cli.demo", str(bids), *home]),
        ("participant (preprocess)", ["-m", "bids_harmony", str(bids), str(out),
                                      "participant", *common]),
        ("group (fit, report)", ["-m", "bids_harmony", str(bids), str(out), "group", *common]),
        ("participant (harmonize)", ["-m", "bids_harmony", str(bids), str(out), "participant",
                                     *common, "--output-spaces", "template", "T1w"]),
    ]


def node_work(work_dir: Path, since: float) -> tuple[float, int]:
    """Seconds the Nipype nodes that finished after ``since`` worked, and how many ran."""
    total, count = 0.0, 0
    for result_file in work_dir.rglob("result_*.pklz"):
        if result_file.stat().st_mtime < since:
            continue
        with gzip.open(result_file, "rb") as stream:
            result = pickle.load(stream)
        duration = getattr(getattr(result, "runtime", None), "duration", None)
        if duration is not None:
            total += float(duration)
            count += 1
    return total, count


def run_demo(package_root: Path, scratch: Path, own_templateflow: bool
             ) -> list[dict[str, object]]:
    """Run the four steps with ``package_root`` on ``PYTHONPATH`` as ``make demo`` of that
    code does (``own_templateflow``: with the demo's own TemplateFlow home); time each."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "NIPYPE_NO_ET": "1",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    home = scratch / "templateflow" if own_templateflow else None
    if home is not None:
        env["TEMPLATEFLOW_HOME"] = str(home)
    bids, out = scratch / "bids", scratch / "out"
    rows = []
    for label, args in _steps(bids, out, home):
        start = time.time()
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True,
                                text=True, cwd=scratch)  # ``-m`` puts the cwd first
        wall = time.time() - start
        if result.returncode:
            sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
        work, nodes = node_work(out / ".bids_harmony_work", start)
        report = REPORT_WRITTEN.search(result.stderr)
        rows.append({"step": label, "wall_s": round(wall, 1), "node_work_s": round(work, 1),
                     "nodes_run": nodes,
                     "report_s": float(report.group(1)) if report else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="0182aa4")
    parser.add_argument("--codes", nargs="+", choices=("before", "after"),
                        default=["before", "after"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as scratch_root:
        scratch = Path(scratch_root)
        worktree = scratch / "before-code"
        if "before" in args.codes:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                            str(worktree), args.before], check=True)
        try:
            for code in args.codes:
                run_dir = scratch / code
                run_dir.mkdir()
                results[code] = run_demo(worktree if code == "before" else ROOT, run_dir,
                                         own_templateflow=code == "after")
                print(code, json.dumps(results[code], indent=1), flush=True)
        finally:
            if "before" in args.codes:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(worktree)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_time.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "demo_time.md").write_text(_markdown(results, args.before))


def _markdown(results: dict[str, list[dict[str, object]]], before: str) -> str:
    lines = [
        "# `make demo`, step by step, before and after",
        "",
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. The demo's four commands from scratch "
        f"(installation excluded); before = {before}, after = this checkout. Node work is "
        "the summed run time of the Nipype nodes that ran in the step.",
        "",
        "| code | step | wall (s) | node work (s) | nodes run | wall / work | report (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for code, rows in results.items():
        for row in rows:
            work = float(row["node_work_s"])
            ratio = f"{float(row['wall_s']) / work:.2f}" if work else "-"
            lines.append(f"| {code} | {row['step']} | {row['wall_s']} | {work} | "
                         f"{row['nodes_run']} | {ratio} | {row['report_s'] or '-'} |")
        total = sum(float(row["wall_s"]) for row in rows)
        lines.append(f"| {code} | **total** | **{total:.0f}** | | | | |")
    if set(results) == {"before", "after"}:
        totals = {code: sum(float(r["wall_s"]) for r in rows) for code, rows in results.items()}
        lines += ["", f"Ratio after / before (total wall): "
                      f"{totals['after'] / totals['before']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
