"""What a run wrote, compared by content across runs (and schedulers)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nb
import numpy as np


def output_content(out: Path) -> dict[str, object]:
    """What a run wrote, by content: image data and affine, JSON as parsed, text as is
    (gzip headers and logs carry times and run ids)."""
    content: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if not path.is_file() or relative.startswith((".bids_harmony_work", "logs/")):
            continue
        if path.name.endswith(".nii.gz"):
            image = nb.load(path)
            content[relative] = (hashlib.sha256(np.asarray(image.dataobj).tobytes()).hexdigest(),
                                 image.affine.round(4).tolist())
        elif path.suffix == ".json":
            content[relative] = json.loads(path.read_text())
        elif path.suffix in (".tsv", ".md"):
            content[relative] = path.read_text()
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                content[relative] = {k: npz[k].tolist() for k in npz.files}
        else:
            content[relative] = "present"
    return content


def content_differences(found: dict[str, object], expected: dict[str, object]) -> list[str]:
    """Readable differences between two :func:`output_content` results (for messages)."""
    lines = [f"missing {key}" for key in sorted(expected.keys() - found.keys())]
    lines += [f"extra {key}" for key in sorted(found.keys() - expected.keys())]
    for key in sorted(found.keys() & expected.keys()):
        if found[key] != expected[key]:
            if isinstance(found[key], dict) and isinstance(expected[key], dict):
                fields = {name for name in found[key].keys() | expected[key].keys()
                          if found[key].get(name) != expected[key].get(name)}
                lines += [f"{key}: {name} {found[key].get(name)!r} != "
                          f"{expected[key].get(name)!r}" for name in sorted(fields)]
            else:
                lines.append(f"{key} differs")
    return lines
