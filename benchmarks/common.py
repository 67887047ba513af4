"""What the benchmark scripts share (they run as ``python benchmarks/<script>.py``, so this
module is importable by its plain name)."""

from __future__ import annotations

import subprocess
import sys
import time


def run_cli(*args: object) -> float:
    """Run the app; returns seconds. A failure stops the benchmark with the app's message."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bids_harmony", *map(str, args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bids_harmony {' '.join(map(str, args[2:]))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start
