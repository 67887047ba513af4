"""``bids_harmony-demo``: write the built-in multi-site traveling-subject demo dataset.

Only argparse is imported at module level so ``--help`` answers at once; numpy, nibabel and
nilearn load when the dataset is built.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROG = "bids_harmony-demo"


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults match ``generate_demo_dataset``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Write a small simulated multi-site traveling-subject BIDS dataset (every subject "
            "scanned at every site) with its ground truth in derivatives/demo-truth. OUT_BIDS "
            "must be new, empty or a previous demo (which is replaced)."
        ),
    )
    parser.add_argument(
        "out_bids", metavar="OUT_BIDS", type=Path, help="dataset directory to write"
    )
    parser.add_argument("--subjects", type=int, default=4, metavar="N", help="subjects (default 4)")
    parser.add_argument("--sites", type=int, default=3, metavar="K", help="sites, 2-4 (default 3)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--sequences",
        nargs="+",
        choices=("T1w", "T2w"),
        default=None,
        help="sequences to simulate (default: T1w T2w for mni, T1w for ixi)",
    )
    parser.add_argument(
        "--anatomy",
        choices=("mni", "ixi"),
        default="mni",
        help="mni: deformed MNI152 template brains (default); ixi: real IXI heads with skull",
    )
    parser.add_argument(
        "--ixi-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="IXI data for --anatomy ixi (default: ../shared/data/ixi next to the repository)",
    )
    parser.add_argument(
        "--templateflow-home",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the bundled MNI152NLin2009aSym template (1 and 2 mm) into DIR; with "
        "TEMPLATEFLOW_HOME=DIR runs need no TemplateFlow download and skip indexing its "
        "2,540-file skeleton (about 10 s per run)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build the demo; a deliberate error prints one line and returns its BIDS-Apps exit code."""
    args = build_parser().parse_args(argv)
    from bids_harmony.data.demo import generate_demo_dataset
    from bids_harmony.errors import HarmonyError

    started = time.perf_counter()
    try:
        root = generate_demo_dataset(
            args.out_bids,
            n_subjects=args.subjects,
            n_sites=args.sites,
            seed=args.seed,
            sequences=args.sequences,
            anatomy=args.anatomy,
            ixi_dir=args.ixi_dir,
        )
        if args.templateflow_home is not None:
            from bids_harmony.data.templates import bundled_template

            for resolution in (1, 2):
                bundled_template(resolution, args.templateflow_home)
    except HarmonyError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    print(f"{PROG}: wrote {root} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
