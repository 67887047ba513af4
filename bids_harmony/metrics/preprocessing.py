"""Did preprocessing work? One template-space image measured against the template itself.

Harmonization QC compares an output with its own input, so it cannot see a failed
registration or an input that is no brain at all: a noise cube and a sphere phantom went
through the whole pipeline and the group fit like brains. These measures compare the
``desc-preproc`` image and its warped brain mask with the template brain and mask:

- ``template_ncc``: NCC of the image and the template brain inside the template mask. It is
  negative for T2w-like contrasts (the template is a T1w), so flags use its magnitude.
- ``structure_ncc``: NCC of the two images' gradient magnitudes (Gaussian, 2 mm) inside the
  template mask eroded by 6 mm: sulci, ventricles and tissue borders lie where the
  template's do, whatever the contrast; a uniform sphere or noise has none of them.
- ``mask_dice``: Dice overlap of the warped brain mask with the template brain mask.
- ``mask_volume_ratio``: warped brain-mask volume over the template's.

Calibration (bundled MNI152NLin2009aSym, 2 mm, affine registration, pipeline run on each
input; the 1 mm rows are the same inputs on the 1 mm template)::

    input                                   |template_ncc| structure_ncc mask_dice volume_ratio
    IXI heads with skull, 7 (deepbet)         0.554-0.619   0.465-0.572  0.949-0.961 0.996-1.053
    demo T1w, 18 (2 demos: 2x3 seed 1, 4x3)   0.776-0.887   0.823-0.914  0.986-0.989 0.995-1.016
    demo T2w, 18 (through their T1w)          0.514-0.660   0.826-0.901  0.986-0.989 0.995-1.016
    noise cube, whole field of view           0.023         -0.003       0.460       1.383
    smoothed-noise block, zero background     0.184         0.022        0.781       0.735
    bright uniform sphere, r 65 mm            0.215         0.034        0.774       0.663
    same sphere in a noisy background         0.268         0.040        0.842       0.816
    ellipsoid "head" (bright core, dim shell) 0.257         0.052        0.864       0.905
    IXI head, affine rotated 90 deg about x   0.260         0.047        0.748       1.037
    IXI head, affine rotated 180 deg about x  0.273         0.092        0.773       0.790
    IXI head, affine rotated 90 deg about z   0.233         0.065        0.808       0.807
    IXI head, affine rotated 45 deg about y   0.243         0.059        0.802       0.879
    IXI head, affine axes permuted            0.074         -0.018       0.779       1.127
    1 mm: IXI012, IXI039 (with skull)         0.589-0.591   0.616-0.650  0.949-0.953 1.044-1.060
    1 mm: sphere in noise, r 65 mm            0.270         -0.009       0.795       0.704

The template against itself scores 1 on all four.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from bids_harmony.errors import DataError
from bids_harmony.metrics.similarity import ncc
from bids_harmony.volume import Volume

#: Flag: the image does not sit on the template (mask overlap or correlation too low).
REGISTRATION = "registration"
#: Flag: in template space the image has no brain's structure or size.
NOT_BRAIN_LIKE = "not_brain_like"

# Real brains 0.949-0.961 (IXI) and 0.986-0.989 (demo); bad inputs and misregistered heads
# 0.460-0.864: midway, below the ellipsoid phantom's 0.864.
MIN_MASK_DICE = 0.90
# |NCC| of real brains 0.514 (demo T2w) to 0.887, bad inputs 0.023-0.273.
MIN_ABS_TEMPLATE_NCC = 0.40
# Real brains 0.465-0.914, bad inputs -0.018-0.092: a quarter leaves both a wide margin.
MIN_STRUCTURE_NCC = 0.25
# Real brains 0.995-1.053 of the template's volume; the sphere 0.663, the noise cube 1.383.
VOLUME_RATIO_RANGE = (0.80, 1.25)
# Scale of the gradient magnitude: a voxel at 2 mm, two at 1 mm, so the measure does not
# depend on the template's resolution.
GRADIENT_SIGMA_MM = 2.0
# Depth of the template mask's border left out of structure_ncc: the brain outline is
# the strongest edge in both images and would otherwise dominate the correlation.
BORDER_MM = 6.0


def preprocessing_qc(image: Volume, template: Volume) -> tuple[dict[str, float], list[str]]:
    """The measures of ``image`` (a ``desc-preproc`` volume with its warped brain mask)
    against ``template`` (template brain and mask, same grid), and the flags they raise."""
    if image.data.shape != template.data.shape:
        raise DataError(
            f"the image has shape {image.data.shape}, the template {template.data.shape}; "
            "QC compares images resampled onto the template grid"
        )
    template_mask = template.mask.astype(bool)
    image_mask = image.mask.astype(bool)
    if not template_mask.any():
        raise DataError("the template brain mask is empty; check the template files")
    measures = {
        "template_ncc": _correlation(image.data, template.data, template_mask),
        "structure_ncc": _structure_ncc(image, template),
        "mask_dice": float(2.0 * (image_mask & template_mask).sum()
                           / (image_mask.sum() + template_mask.sum())),
        "mask_volume_ratio": float(image_mask.sum() / template_mask.sum()),
    }
    return measures, qc_flags(measures)


def qc_flags(measures: dict[str, float]) -> list[str]:
    """The flags :func:`preprocessing_qc`'s ``measures`` raise, in a fixed order."""
    flags = []
    if (measures["mask_dice"] < MIN_MASK_DICE
            or abs(measures["template_ncc"]) < MIN_ABS_TEMPLATE_NCC):
        flags.append(REGISTRATION)
    low, high = VOLUME_RATIO_RANGE
    if (measures["structure_ncc"] < MIN_STRUCTURE_NCC
            or not low <= measures["mask_volume_ratio"] <= high):
        flags.append(NOT_BRAIN_LIKE)
    return flags


def _structure_ncc(image: Volume, template: Volume) -> float:
    """NCC of the gradient magnitudes inside the template mask less its border."""
    spacing = np.asarray(template.spacing)
    depth = np.maximum(np.rint(BORDER_MM / spacing), 1).astype(int)
    interior = template.mask.astype(bool)
    for axis, steps in enumerate(depth):  # per axis, so anisotropic voxels erode in mm
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[(1,) * axis + (slice(None),) + (1,) * (2 - axis)] = True
        interior = ndimage.binary_erosion(interior, structure, iterations=int(steps))
    if not interior.any():
        interior = template.mask.astype(bool)
    sigma = GRADIENT_SIGMA_MM / spacing
    box = _box(interior, np.ceil(4 * sigma).astype(int) + 1)
    gradients = [ndimage.gaussian_gradient_magnitude(np.asarray(v.data[box], np.float64), sigma)
                 for v in (image, template)]
    return _correlation(gradients[0], gradients[1], interior[box])


def _correlation(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """:func:`ncc`, with 0 (no correlation) for a constant image instead of ``nan``."""
    value = ncc(x, y, mask)
    return value if math.isfinite(value) else 0.0


def _box(region: np.ndarray, margin: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``region`` grown by ``margin`` voxels per axis, inside the grid:
    the gradients are exact inside it and cost a fraction of the whole template grid."""
    box = []
    for axis in range(region.ndim):
        other = tuple(a for a in range(region.ndim) if a != axis)
        present = np.flatnonzero(region.any(axis=other))
        box.append(slice(max(0, int(present[0]) - int(margin[axis])),
                         min(region.shape[axis], int(present[-1]) + int(margin[axis]) + 1)))
    return tuple(box)
