"""What the benchmark scripts share (they run as ``python benchmarks/<script>.py``, so this
module is importable by its plain name)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from bids_harmony.volume import EDGES, Volume, load_volume

#: The template the CLI registers to offline (the bundled one; TemplateFlow's 2009c when
#: available).
TEMPLATE = "MNI152NLin2009aSym"


#: Scanner metadata of the sites :func:`write_head_dataset` gives its subjects, in turn.
SCANNERS = (
    {"Manufacturer": "Philips", "ManufacturersModelName": "Intera", "MagneticFieldStrength": 3},
    {"Manufacturer": "GE", "ManufacturersModelName": "Signa", "MagneticFieldStrength": 1.5},
)


def write_head_dataset(root: Path, heads: list[Path], spacing: int) -> Path:
    """A BIDS dataset of real heads, ``sub-01``, ``sub-02``, ... (with skull, one T1w each,
    the sites of :data:`SCANNERS` in turn); at ``spacing`` 1 the 2 mm IXI heads are
    upsampled (trilinear), so a 1 mm run sees a realistic 1 mm input."""
    for number, head in enumerate(heads, start=1):
        image = nb.load(head)
        data = np.asarray(image.dataobj, dtype=np.float32)
        affine = image.affine.copy()
        if spacing == 1:
            data = ndimage.zoom(data, 2, order=1)
            affine[:3, :3] /= 2
        anat = root / f"sub-{number:02d}" / "anat"
        anat.mkdir(parents=True)
        name = f"sub-{number:02d}_T1w"
        nb.Nifti1Image(data.astype(np.int16), affine).to_filename(anat / f"{name}.nii.gz")
        (anat / f"{name}.json").write_text(json.dumps(SCANNERS[(number - 1) % len(SCANNERS)]))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "IXI heads", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    return root


def run_cli(*args: object) -> float:
    """Run the app; returns seconds. A failure stops the benchmark with the app's message."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bids_harmony", *map(str, args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bids_harmony {' '.join(map(str, args[2:]))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def load_scans(bids: Path, out: Path, suffix: str = "T1w", template: str = TEMPLATE,
               with_maps: bool = False) -> dict[tuple[str, str], Volume]:
    """Preprocessed ``suffix`` volumes by (subject, site), read from the derivatives (the
    sites from each subject's ``sessions.tsv``).

    ``with_maps`` reads them as the group level does (the header's voxel spacing and the
    pipeline's Canny edge map as the :data:`EDGES` channel); without it, data and brain mask
    only, at the nominal 1 mm spacing: the volumes the older benchmarks scored.
    """
    desc = "brain" if suffix == "T1w" else f"brain{suffix}"
    scans: dict[tuple[str, str], Volume] = {}
    for sessions_tsv in sorted(bids.glob("sub-*/sub-*_sessions.tsv")):
        subject = sessions_tsv.parent.name
        rows = [line.split("\t") for line in sessions_tsv.read_text().splitlines()[1:]]
        for session, site in (row[:2] for row in rows):
            anat = out / subject / session / "anat"
            stem = f"{subject}_{session}_space-{template}"
            data_path = anat / f"{stem}_desc-preproc_{suffix}.nii.gz"
            mask_path = anat / f"{stem}_desc-{desc}_mask.nii.gz"
            if with_maps:
                edges = anat / f"{stem}_desc-{desc.replace('brain', 'edges')}_mask.nii.gz"
                scans[(subject, site.strip())] = load_volume(data_path, mask_path,
                                                             {EDGES: edges})
                continue
            data = nb.load(data_path).get_fdata()
            mask = np.asarray(nb.load(mask_path).dataobj) > 0
            scans[(subject, site.strip())] = Volume(data.astype(np.float32), mask)
    return scans
