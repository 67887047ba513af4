"""Template resolution: TemplateFlow when it has the template, else a bundled offline copy.

The papers register to MNI152 at 1 mm; fMRIPrep's default (and the container's) is
``MNI152NLin2009cAsym``. A fresh machine without network has no TemplateFlow files, so the
app builds a TemplateFlow-shaped home from the MNI152 files that ship inside the nilearn wheel.
Those are ICBM 2009a *symmetric* and brain-extracted, so they are named honestly
``MNI152NLin2009aSym`` and the ``space-`` entity of every output says which template was used.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bids_harmony.errors import TemplateNotFoundError
from bids_harmony.fileio import atomic_path, atomic_write_text

LOGGER = logging.getLogger("bids_harmony")

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
BUNDLED_TEMPLATE = "MNI152NLin2009aSym"
_NILEARN_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "label-GM_probseg": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "label-WM_probseg": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class TemplateFiles:
    """The template images the pipeline uses, on one grid."""

    name: str
    resolution: int
    brain: Path
    mask: Path
    origin: str  # "templateflow" or "bundled"


def resolve_template(
    name: str | None, resolution: int, work_dir: Path, *, allow_download: bool = True
) -> TemplateFiles:
    """Find ``name`` at ``resolution`` mm, falling back to the bundled template.

    ``name=None`` means the default: ``MNI152NLin2009cAsym`` when the TemplateFlow home has
    it, otherwise the bundled ``MNI152NLin2009aSym`` with a one-line notice. An explicitly
    requested template that is neither local nor downloadable raises
    :class:`TemplateNotFoundError` instead of hanging.
    """
    requested = name or DEFAULT_TEMPLATE
    if requested == BUNDLED_TEMPLATE:
        return bundled_template(resolution, _bundled_home(resolution, work_dir))
    found = _from_templateflow_home(requested, resolution)
    if found is not None:
        return found
    if name is None:
        LOGGER.warning(
            "%s is not in TEMPLATEFLOW_HOME; using the bundled %s (ICBM 2009a symmetric, "
            "from nilearn) instead; outputs say space-%s",
            DEFAULT_TEMPLATE, BUNDLED_TEMPLATE, BUNDLED_TEMPLATE,
        )
        return bundled_template(resolution, _bundled_home(resolution, work_dir))
    if allow_download:
        found = _download(requested, resolution)
        if found is not None:
            return found
    raise TemplateNotFoundError(
        f"template {requested} (res-{resolution:02d}) is not in TEMPLATEFLOW_HOME="
        f"{_templateflow_home()} and could not be downloaded; pre-fetch it with "
        f"templateflow, or use --template {BUNDLED_TEMPLATE} (bundled, offline)"
    )


def bundled_template(resolution: int, home: Path) -> TemplateFiles:
    """Write (once) and return the nilearn MNI152 2009a template in TemplateFlow layout."""
    folder = home / f"tpl-{BUNDLED_TEMPLATE}"
    prefix = f"tpl-{BUNDLED_TEMPLATE}_res-{resolution:02d}"
    brain = folder / f"{prefix}_desc-brain_T1w.nii.gz"
    mask = folder / f"{prefix}_desc-brain_mask.nii.gz"
    if not (brain.is_file() and mask.is_file()):
        _write_bundled(folder, resolution)
    return TemplateFiles(BUNDLED_TEMPLATE, resolution, brain, mask, "bundled")


def _bundled_home(resolution: int, work_dir: Path) -> Path:
    """TEMPLATEFLOW_HOME when the bundled template was pre-built there (the container image
    does so at build time, so runs write nothing), else the work directory."""
    folder = _templateflow_home() / f"tpl-{BUNDLED_TEMPLATE}"
    prefix = f"tpl-{BUNDLED_TEMPLATE}_res-{resolution:02d}"
    if all(_non_empty(folder / f"{prefix}_{name}.nii.gz")
           for name in ("desc-brain_T1w", "desc-brain_mask")):
        return _templateflow_home()
    return work_dir / "templateflow"


def _write_bundled(folder: Path, resolution: int) -> None:
    """Build the bundled template files; written to temporary names, then renamed."""
    import nibabel as nb
    import nilearn
    import numpy as np
    from nilearn.image import resample_img
    from scipy import ndimage

    folder.mkdir(parents=True, exist_ok=True)
    description = folder / "template_description.json"
    if not description.is_file():
        atomic_write_text(description, json.dumps(_DESCRIPTION, indent=2) + "\n")
    source_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    prefix = f"tpl-{BUNDLED_TEMPLATE}_res-{resolution:02d}"
    t1 = nb.load(source_dir / _NILEARN_FILES["T1w"])
    target_affine = t1.affine.copy()
    target_affine[:3, :3] *= resolution
    target_shape = tuple(int(np.ceil(n / resolution)) for n in t1.shape)

    def on_grid(img: nb.Nifti1Image, interpolation: str) -> np.ndarray:
        if resolution == 1:
            return np.asarray(img.dataobj, dtype=np.float32)
        resampled = resample_img(
            img, target_affine=target_affine, target_shape=target_shape,
            interpolation=interpolation, force_resample=True, copy_header=True,
        )
        return np.asarray(resampled.dataobj, dtype=np.float32)

    t1_data = on_grid(t1, "continuous")
    mask = ndimage.binary_fill_holes(t1_data > 0.05 * t1_data.max())
    outputs = {
        f"{prefix}_desc-brain_T1w.nii.gz": (np.where(mask, t1_data, 0), np.float32),
        f"{prefix}_desc-brain_mask.nii.gz": (mask, np.uint8),
    }
    for key in ("label-GM_probseg", "label-WM_probseg"):
        probseg = on_grid(nb.load(source_dir / _NILEARN_FILES[key]), "continuous") / 255.0
        outputs[f"{prefix}_{key}.nii.gz"] = (np.clip(probseg, 0, 1), np.float32)
    for filename, (data, dtype) in outputs.items():
        image = nb.Nifti1Image(np.asarray(data, dtype=dtype), target_affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(target_affine, code=4)
        image.set_sform(target_affine, code=4)
        with atomic_path(folder / filename) as partial:
            image.to_filename(partial)


def _templateflow_home() -> Path:
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def _from_templateflow_home(name: str, resolution: int) -> TemplateFiles | None:
    """Use a template already present (non-empty files) in the user's TemplateFlow home."""
    folder = _templateflow_home() / f"tpl-{name}"
    prefix = f"tpl-{name}_res-{resolution:02d}"
    mask = folder / f"{prefix}_desc-brain_mask.nii.gz"
    for t1w in (folder / f"{prefix}_desc-brain_T1w.nii.gz", folder / f"{prefix}_T1w.nii.gz"):
        if _non_empty(t1w) and _non_empty(mask):
            return TemplateFiles(name, resolution, t1w, mask, "templateflow")
    return None


def _download(name: str, resolution: int) -> TemplateFiles | None:
    """Ask TemplateFlow for the files; ``None`` when the server cannot be reached."""
    try:
        from templateflow import api

        t1w = api.get(name, resolution=resolution, desc=None, suffix="T1w", extension=".nii.gz")
        mask = api.get(name, resolution=resolution, desc="brain", suffix="mask",
                       extension=".nii.gz")
    except Exception as error:  # any network or index failure means "not available"
        LOGGER.debug("TemplateFlow download of %s failed: %s", name, error)
        return None
    if not (t1w and mask) or isinstance(t1w, list) or isinstance(mask, list):
        return None
    return TemplateFiles(name, resolution, Path(t1w), Path(mask), "templateflow")


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


_DESCRIPTION = {
    "Name": "ICBM 2009a Nonlinear Symmetric (MNI152NLin2009aSym), brain-extracted",
    "Identifier": BUNDLED_TEMPLATE,
    "Authors": ["Fonov V.", "Evans A.C.", "McKinstry R.C.", "Almli C.R.", "Collins D.L."],
    "Acknowledgements": "Copied by bids_harmony from the files shipped in the nilearn wheel.",
    "BIDSVersion": "1.9.0",
    "HowToAcknowledge": "Cite Fonov et al., NeuroImage 2011 and 2009.",
    "License": "See the ICBM 2009 licence (free use with acknowledgement).",
    "ReferencesAndLinks": ["https://doi.org/10.1016/j.neuroimage.2010.07.033"],
    "TemplateFlowVersion": "1.0.0",
    "res": {
        "01": {"origin": [-98.0, -134.0, -72.0], "shape": [197, 233, 189], "zooms": [1, 1, 1]},
        "02": {"origin": [-98.0, -134.0, -72.0], "shape": [99, 117, 95], "zooms": [2, 2, 2]},
    },
}
