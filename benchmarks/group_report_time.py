"""Time of the group level's report writing, before and after a change, in one run.

Runs ``bids_harmony group --method histmatch`` twice on the same preprocessed derivatives:
once with the package of ``--before`` (a git commit, checked out in a temporary worktree) and
once with this checkout, alternating ``--repeats`` times, and reads the seconds the app logs
for "group report ... written in N s". Default data: the blind-methods benchmark's work
folder (7 IXI heads x 3 sites at 2 mm, 21 images); run ``blind_methods.py`` first.

Usage::

    python benchmarks/group_report_time.py --before COMMIT [--work DIR] [--out benchmarks/results]

Writes ``group_report_time.md``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITTEN = re.compile(r"group report \S+ written in (\d+) s")


def run_group(package_root: Path, bids: Path, out: Path, work: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(package_root), "NIPYPE_NO_ET": "1",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "bids_harmony", str(bids), str(out), "group", "--method",
         "histmatch", "--target-site", "SiemensTrio3T", "--resolution", "2", "--work-dir",
         str(work), "-v"], env=env, capture_output=True, text=True,
        cwd=work.parent)  # not this checkout: ``-m`` puts the working directory first
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    return int(WRITTEN.search(result.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bids_harmony_blind_bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                        str(worktree), args.before], check=True)
        try:
            times: dict[str, list[int]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                for label, root in (("before", worktree), ("after", ROOT)):
                    out = Path(scratch) / "out"
                    shutil.copytree(args.work / "out", out)
                    times[label].append(run_group(root, args.work / "bids", out,
                                                  Path(scratch) / "work"))
                    shutil.rmtree(out)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=True)
    before, after = min(times["before"]), min(times["after"])
    text = "\n".join([
        "# Group report time, before and after",
        "",
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs. "
        f"`bids_harmony group --method histmatch` on {args.work} (21 images at 2 mm), "
        f"{args.repeats} alternating runs each; seconds the app logs for writing the group "
        "outputs (tables, histograms, evaluation, group page, participant pages).",
        "",
        "| code | runs (s) | best (s) |",
        "|---|---|---|",
        f"| before ({args.before}) | {times['before']} | {before} |",
        f"| after | {times['after']} | {after} |",
        "",
        f"Ratio after / before: {after / before:.2f}.",
        "",
    ])
    (args.out / "group_report_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
