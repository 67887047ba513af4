"""What ``tests/test_distributed.py`` runs under ``torchrun``: fit one learned harmonizer at
the ``tiny`` preset on phantoms of two sites, as the group level does, and save this rank's
fitted arrays to ``OUT/rank<R>.npz``.

    torchrun --standalone --nproc-per-node 2 tests/distributed_fit.py METHOD OUT JSON_PARAMS

With ``INTERRUPT_AT=N`` every rank stops at the N-th call of the method's step loss (as a
node failure stops a job), after the checkpoints written before it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantoms import render  # noqa: E402

from bids_harmony.harmonizers import from_options  # noqa: E402
from bids_harmony.nn import distributed  # noqa: E402

#: The function each method's training step calls once per step (to interrupt it).
STEP_LOSS = {
    "blindharmonydiff": ("bids_harmony.harmonizers.blindharmonydiff", "rectified_flow_loss"),
    "blindharmony": ("bids_harmony.harmonizers.blindharmony", "bits_per_pixel"),
    "sgcd": ("bids_harmony.harmonizers.sgcd", "stage1_loss"),
}


def _interrupt_at(method: str, call: int) -> None:
    import importlib

    module_name, name = STEP_LOSS[method]
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = {"n": 0}

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == call:
            raise SystemExit(f"interrupted at call {call}")
        return original(*args, **kwargs)

    setattr(module, name, counted)


def main(method: str, out: Path, params: dict) -> None:
    logging.basicConfig(level=logging.INFO)
    distributed.start(torch.device("cpu"))
    if os.environ.get("INTERRUPT_AT"):
        _interrupt_at(method, int(os.environ["INTERRUPT_AT"]))
    # SGCD's test data: 2 subjects x 2 sites x T1w/T2w (one network serves both sequences).
    cases = [(subject, site, sequence) for subject in range(2) for site in ("siteA", "siteB")
             for sequence in ("T1w", "T2w") if method == "sgcd" or sequence == "T1w"]
    images = [render(subject, site, sequence == "T2w", shape=(24, 24, 16))
              for subject, site, sequence in cases]
    harmonizer = from_options(method, preset="tiny", device="cpu", seed=0,
                              checkpoint_dir=out / "checkpoints", params=params)
    harmonizer.fit(images, [case[1] for case in cases], [case[2] for case in cases],
                   target="siteA")
    arrays = {f"{owner}/{key}": value for owner, state in
              {**harmonizer.state_, "shared": harmonizer.shared_state_}.items()
              for key, value in state.items()}
    np.savez(out / f"rank{distributed.rank()}.npz", **arrays)
    if distributed.is_main():
        harmonizer.save(out / "model")
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
