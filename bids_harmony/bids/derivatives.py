"""The derivative dataset's description, .bidsignore and README."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bids_harmony import __version__
from bids_harmony.fileio import atomic_write_text


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
    atomic_write_text(output_dir / ".bidsignore", "\n".join(NOT_BIDS) + "\n")
    if not (output_dir / "README").exists():
        atomic_write_text(output_dir / "README", _README)
    return path


#: The app's own files that BIDS has no names for (as fMRIPrep does, they are listed in the
#: derivative's .bidsignore): group tables and reports, models, logs, and transforms, which
#: the schema does not yet cover for anatomical derivatives. Folders are named without a
#: trailing slash: bids-validator-deno 3.0.2 still flags ``models/`` written that way.
NOT_BIDS = (
    "group_*", "sites.tsv", "models", "logs", "figures", "sub-*.html", "*_xfm.*",
)

_README = """bids_harmony derivatives

Harmonized structural MRI in template space (desc-harmonized), with the preprocessing
outputs (desc-preproc, brain masks, Canny edge maps, transforms), per-image QC in every
sidecar, and the group tables and reports (group_*). See dataset_description.json for the
version that wrote them and logs/<run-id>/config.toml for each run's configuration.
"""


def _container() -> dict[str, str] | None:
    """Describe the container the app runs in, when it runs in one."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "singularity",
                "Tag": os.environ.get("APPTAINER_NAME") or os.environ.get("SINGULARITY_NAME", "")}
    if (Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()
            or os.environ.get("BIDS_HARMONY_IMAGE")):  # set by our image; /run may be tmpfs
        return {"Type": "docker", "Tag": os.environ.get("BIDS_HARMONY_IMAGE", "bids_harmony")}
    return None
