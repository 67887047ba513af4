"""``DerivativesDataSink`` that never leaves a half-written derivative behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from niworkflows.interfaces.bids import DerivativesDataSink

from bids_harmony.fileio import writer_tag

STAGING = ".staging"


class AtomicDerivativesDataSink(DerivativesDataSink):
    """Write under a staging folder inside the output directory, then rename into place.

    The staging folder is on the same file system as the outputs, so each ``os.replace`` is
    atomic: a derivative is complete or absent. The staging folder is named after its writer
    (host, process), so a run started after a kill removes what the killed one left. Sidecars are moved after their images, so an
    existing sidecar means the image is done (the resume check relies on it). NIfTI files
    are gzip-compressed unless told otherwise (niworkflows writes ``.nii`` inside a workflow).
    """

    out_path_base = ""

    def __init__(self, allowed_entities: Any = None, **inputs: Any) -> None:
        inputs.setdefault("compress", True)
        super().__init__(allowed_entities=allowed_entities, **inputs)

    def _run_interface(self, runtime: Any) -> Any:
        final_base = Path(self.inputs.base_directory)
        staging = final_base / STAGING / writer_tag()
        staging.mkdir(parents=True)
        self.inputs.base_directory = str(staging)
        try:
            runtime = super()._run_interface(runtime)
            for key in ("out_file", "out_meta"):
                moved = []
                for staged in _as_list(self._results.get(key)):
                    final = final_base / Path(staged).relative_to(staging)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, final)
                    moved.append(str(final))
                if moved:
                    self._results[key] = moved if len(moved) > 1 else moved[0]
        finally:
            self.inputs.base_directory = str(final_base)
            shutil.rmtree(staging, ignore_errors=True)
        return runtime


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)
