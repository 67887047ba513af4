"""Percentile intensity normalization inside the brain mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_harmony.errors import DataError
from bids_harmony.interfaces import WORK_IMAGE_EXTENSION


def percentile_normalize(
    data: np.ndarray, mask: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> tuple[np.ndarray, float, float]:
    """Map brain intensities linearly so that the ``lower``/``upper`` percentiles become 0 and 1.

    Percentiles come from brain voxels only (``mask > 0``), so the background and its size do not
    shift them. Values are clipped to [0, 1] inside the mask and set to 0 outside. Returns the
    float32 image and the two percentile values (for the sidecar).

    Raises ``ValueError`` on an empty mask or a constant brain; the interface turns it into a
    ``DataError`` naming the file.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    brain = np.asarray(mask) > 0
    if not brain.any():
        raise ValueError("the brain mask is empty")
    low_value, high_value = np.percentile(np.asarray(data, dtype=np.float64)[brain], [lower, upper])
    if high_value <= low_value:
        raise ValueError(f"brain intensities are constant between the percentiles ({low_value:g})")
    scaled = (np.asarray(data, dtype=np.float64) - low_value) / (high_value - low_value)
    normalized = np.where(brain, np.clip(scaled, 0.0, 1.0), 0.0).astype(np.float32)
    return normalized, float(low_value), float(high_value)


class _PercentileNormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to normalize")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    lower = traits.Float(1.0, usedefault=True, desc="percentile mapped to 0")
    upper = traits.Float(99.0, usedefault=True, desc="percentile mapped to 1")


class _PercentileNormalizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="float32 image in [0, 1] inside the mask, 0 outside")
    lower_value = traits.Float(desc="intensity at the lower percentile")
    upper_value = traits.Float(desc="intensity at the upper percentile")


class PercentileNormalize(SimpleInterface):
    """Scale brain intensities to [0, 1] between two brain-only percentiles.

    >>> PercentileNormalize(lower=1.0, upper=99.0).inputs.upper
    99.0
    """

    input_spec = _PercentileNormalizeInputSpec
    output_spec = _PercentileNormalizeOutputSpec

    def _run_interface(self, runtime):
        image = nib.load(self.inputs.in_file)
        mask = np.asanyarray(nib.load(self.inputs.mask_file).dataobj)
        if mask.shape != image.shape[:3]:
            raise DataError(
                f"{self.inputs.mask_file}: mask shape {mask.shape} differs from image shape "
                f"{image.shape[:3]}; resample the mask onto {self.inputs.in_file}"
            )
        try:
            normalized, low_value, high_value = percentile_normalize(
                image.get_fdata(dtype=np.float32), mask, self.inputs.lower, self.inputs.upper
            )
        except ValueError as error:
            raise DataError(
                f"{self.inputs.in_file}: cannot normalize ({error}); check the brain mask "
                f"{self.inputs.mask_file}"
            ) from error
        header = image.header.copy()
        header.set_data_dtype(np.float32)
        out_file = Path(runtime.cwd) / f"normalized{WORK_IMAGE_EXTENSION}"
        nib.Nifti1Image(normalized, image.affine, header).to_filename(out_file)
        self._results.update(
            out_file=str(out_file), lower_value=low_value, upper_value=high_value
        )
        return runtime
