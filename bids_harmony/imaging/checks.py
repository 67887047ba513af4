"""Can a brain pipeline use this image? Every selected image, checked before any workflow.

A broken image used to fail 20-30 s into Nipype with a node traceback naming a work-dir file,
and a wrong one (overflowed int16, 10 mm voxels, sform and qform apart) went through and came
out as harmonized garbage with exit 0. These checks read each header and its whole data
block once (a truncated gzip shows only when the data is read) and collect every problem of
every image, so one run lists all files to fix. nibabel reads; what no library offers is the
judgement of what a structural brain image must look like, written here:

- readable: not empty, a NIfTI header nibabel can parse, a known datatype, the whole data;
- 3D (a 4D file with one volume counts as 3D);
- finite: no NaN or Inf voxel (even 1 % shifts every histogram a harmonizer fits);
- not constant;
- an affine that is finite, invertible and without shear (rotation and zooms only);
- sform and qform, when both are set, within :data:`FORMS_MAX_SHIFT_MM` and
  :data:`FORMS_MAX_RELATIVE` of each other: viewers and tools choose differently and the
  output would be misregistered without any QC noticing;
- voxel sizes in :data:`VOXEL_RANGE_MM` and a field of view in :data:`FOV_RANGE_MM` on
  every axis: a head is 140-250 mm across and scanned at 0.5-3 mm;
- integer data neither negative in more than :data:`MAX_WRAPPED_FRACTION` of voxels (an
  overflow on export wraps bright tissue to negative values and inverts the contrast) nor
  stuck at its type's maximum in as many (clipped).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from bids_harmony.errors import DataError

#: Voxel edge lengths a structural brain scan can have (mm): clinical 0.2 mm in-plane at
#: most, 6 mm thick slices at worst.
VOXEL_RANGE_MM = (0.2, 6.0)
#: Extent of the image along each axis (mm): a brain is about 140 x 170 x 120 mm; 60 mm
#: already cuts most of it, 500 mm is a whole-body field of view.
FOV_RANGE_MM = (60.0, 500.0)
#: Largest translation between sform and qform (mm) taken as the same placement.
FORMS_MAX_SHIFT_MM = 1.0
#: Largest difference of their rotation-zoom matrices, relative to the voxel size.
FORMS_MAX_RELATIVE = 0.01
#: Share of integer voxels that may be negative or at the type's maximum: Rician noise
#: written as signed integers after a bias correction leaves a few negative voxels, never
#: half a percent.
MAX_WRAPPED_FRACTION = 0.005
#: Largest cosine between two axes of the affine still called orthogonal (about 0.06 deg).
MAX_SHEAR_COSINE = 1e-3

SKIP_HINT = "fix or remove them, or pass --skip-image-checks"


@dataclass(frozen=True)
class ImageProblem:
    """What is wrong with one image and how to fix it."""

    path: Path
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem} ({self.fix})"


class ImageCheckError(DataError):
    """Some selected images cannot be processed; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[ImageProblem], total: int) -> None:
        self.problems = list(problems)
        images = len({problem.path for problem in self.problems})
        listed = " | ".join(str(problem) for problem in self.problems)
        super().__init__(f"{images} of {total} images cannot be processed: {listed}; "
                         f"{SKIP_HINT}")


def check_images(paths: Sequence[Path]) -> None:
    """Raise :class:`ImageCheckError` naming every problem of every image in ``paths``."""
    problems = [problem for path in paths for problem in image_problems(Path(path))]
    if problems:
        raise ImageCheckError(problems, len(paths))


def image_problems(path: Path) -> list[ImageProblem]:
    """Every problem of the image at ``path``; an unreadable file stops at the first."""
    if not path.exists():
        return [ImageProblem(path, "does not exist (a broken link?)",
                             "restore the file or its link target")]
    if path.stat().st_size == 0:
        return [ImageProblem(path, "is empty (0 bytes)", "copy it again from its source")]
    try:
        image = nb.load(path)
    except Exception as error:  # nibabel raises many kinds for a header it cannot parse
        return [ImageProblem(path, _unreadable(error), _REEXPORT)]
    if not isinstance(image, (nb.Nifti1Image, nb.Nifti2Image)):
        return [ImageProblem(path, f"is a {type(image).__name__}, not NIfTI",
                             "convert it to NIfTI (e.g. dcm2niix)")]
    try:
        raw = np.asanyarray(image.dataobj.get_unscaled())
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        return [ImageProblem(path, _unreadable(error), _REEXPORT)]
    problems = [ImageProblem(path, problem, fix) for problem, fix in
                [*_shape_problems(image), *_affine_problems(image)]]
    if data.ndim >= 3:
        problems += [ImageProblem(path, problem, fix)
                     for problem, fix in _value_problems(raw, data)]
    return problems


_REEXPORT = "the file is damaged: copy or convert it again from its source"


def _unreadable(error: Exception) -> str:
    """What a reading error says about the file, in a user's words."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, (EOFError, gzip.BadGzipFile, zlib.error)) or "ended before" in text:
        return f"is truncated or its gzip stream is corrupt ({text})"
    if "data code" in text or "datatype" in text.lower():
        return f"has an unknown datatype code ({text})"
    if "file type" in text.lower() or "not a" in text.lower() or "magic" in text.lower():
        return f"is not a NIfTI file nibabel can read ({text})"
    return f"cannot be read as NIfTI ({type(error).__name__}: {text})"


def _shape_problems(image: nb.Nifti1Image) -> list[tuple[str, str]]:
    shape = image.shape
    if len(shape) > 3 and any(size > 1 for size in shape[3:]):
        return [(f"is {len(shape)}D with shape {shape}, not one 3D volume",
                 "split it (e.g. fslsplit) and keep one volume per file")]
    if len(shape) < 3:
        return [(f"is {len(shape)}D with shape {shape}, not a 3D volume",
                 "use the full 3D acquisition")]
    return []


def _affine_problems(image: nb.Nifti1Image) -> list[tuple[str, str]]:
    """Orientation problems: of the affine nibabel uses, and of sform against qform."""
    affine = image.affine
    if not np.isfinite(affine).all():
        return [("has an affine with NaN or Inf entries", _SET_ORIENTATION)]
    rotation_zoom = affine[:3, :3]
    zooms = np.linalg.norm(rotation_zoom, axis=0)
    if zooms.min() <= 1e-6 or abs(np.linalg.det(rotation_zoom)) <= 1e-9 * np.prod(zooms):
        return [("has a singular affine (an axis of length 0)", _SET_ORIENTATION)]
    problems = []
    axes = rotation_zoom / zooms
    cosines = np.abs(axes.T @ axes - np.eye(3))
    if cosines.max() > MAX_SHEAR_COSINE:
        angle = np.degrees(np.arcsin(min(1.0, float(cosines.max()))))
        problems.append((f"has a sheared affine (axes {angle:.1f} deg off orthogonal)",
                         "reslice it to an unsheared grid or reset its sform from the qform"))
    problems += _forms_problems(image.header)
    low, high = VOXEL_RANGE_MM
    if zooms.min() < low or zooms.max() > high:
        problems.append((f"has voxel sizes {_mm(zooms)} mm, outside {low:g}-{high:g} mm",
                         "check the header's pixdim/affine or resample the image"))
    if len(image.shape) < 3:
        return problems
    fov = zooms * np.asarray(image.shape[:3], dtype=float)
    low, high = FOV_RANGE_MM
    if fov.min() < low or fov.max() > high:
        problems.append((f"has a field of view of {_mm(fov)} mm, outside {low:g}-{high:g} mm "
                         "per axis", "use the whole-head acquisition, not a crop or slab"))
    return problems


_SET_ORIENTATION = "set its sform/qform from the scanner export (e.g. dcm2niix again)"


def _forms_problems(header: nb.Nifti1Header) -> list[tuple[str, str]]:
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not sform_code and not qform_code:
        return [("has neither sform nor qform set (no orientation)", _SET_ORIENTATION)]
    if not (sform_code and qform_code):
        return []
    shift = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    zooms = np.linalg.norm(qform[:3, :3], axis=0)
    relative = float(np.abs(sform[:3, :3] - qform[:3, :3]).max() / max(zooms.min(), 1e-6))
    if shift > FORMS_MAX_SHIFT_MM or relative > FORMS_MAX_RELATIVE:
        return [(f"has sform and qform that disagree (origins {shift:.1f} mm apart, axes "
                 f"{100 * relative:.1f} % apart)",
                 "find which one is right and set the other to it (e.g. fslorient "
                 "-copysform2qform)")]
    return []


def _value_problems(raw: np.ndarray, data: np.ndarray) -> list[tuple[str, str]]:
    """Problems of the voxel values: non-finite, constant, wrapped or clipped integers."""
    problems = []
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        kinds = "/".join(name for name, present in
                         (("NaN", np.isnan(data).any()), ("Inf", np.isinf(data).any()))
                         if present)
        problems.append((f"has {bad} {kinds} voxels ({100 * bad / finite.size:.2g} % of it, "
                         "not finite)", "replace them with 0 (e.g. fslmaths IN -nan OUT)"))
        if not finite.any():
            return problems
    values = data[finite]
    if values.min() == values.max():
        problems.append((f"is constant (every voxel {float(values.min()):g}"
                         f"{', all zero' if values.min() == 0 else ''})",
                         "the export lost the image: convert it again from its source"))
        return problems
    if raw.dtype.kind in "iu":
        info = np.iinfo(raw.dtype)
        # with a scl_slope/scl_inter (Philips) the stored integers span the type on purpose
        # and it is the scaled values that must not be negative
        scaled = data.dtype.kind == "f" and raw.dtype != data.dtype
        negative = float(np.mean((data if scaled else raw) < 0)) if (
            scaled or raw.dtype.kind == "i") else 0.0
        if negative > MAX_WRAPPED_FRACTION:
            problems.append((f"has {100 * negative:.1f} % negative voxels in {raw.dtype} data: "
                             "the values overflowed on export (bright tissue wrapped round, "
                             "contrast inverted)", "export it again as float32 or a wider "
                             "integer type"))
        saturated = float(np.mean(raw == info.max))
        if saturated > MAX_WRAPPED_FRACTION:
            problems.append((f"has {100 * saturated:.1f} % of voxels at the {raw.dtype} maximum "
                             f"{info.max}: the values were clipped on export",
                             "export it again as float32 or with a scale factor"))
    return problems


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{value:.3g}" for value in values)
