"""The derivative dataset's description and atomic text writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bids_harmony import __version__


def write_dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """Write ``dataset_description.json`` (niworkflows' sink never does)."""
    generated_by: dict[str, Any] = {
        "Name": "bids_harmony",
        "Version": __version__,
        "CodeURL": "https://github.com/bids-harmony/bids_harmony",
    }
    container = _container()
    if container:
        generated_by["Container"] = container
    description = {
        "Name": "bids_harmony derivatives: harmonized structural MRI",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
    }
    path = output_dir / "dataset_description.json"
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(description, indent=2) + "\n")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so readers see the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def _container() -> dict[str, str] | None:
    """Describe the container the app runs in, when it runs in one."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "singularity",
                "Tag": os.environ.get("APPTAINER_NAME") or os.environ.get("SINGULARITY_NAME", "")}
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return {"Type": "docker", "Tag": os.environ.get("BIDS_HARMONY_IMAGE", "bids_harmony")}
    return None
