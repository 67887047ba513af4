"""Brain extraction with deepbet, passing already skull-stripped images through untouched."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from functools import lru_cache
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
from scipy import ndimage

from bids_harmony.errors import DataError
from bids_harmony.interfaces import WORK_IMAGE_EXTENSION

#: Foreground is ``|x| > BACKGROUND_LEVEL * p99(|x| over non-zero voxels)``: resampled templates
#: carry denormal or tiny non-zero values in their "zero" background (nilearn's 2 mm MNI152).
BACKGROUND_LEVEL = 1e-3
#: Above the largest adult intracranial volumes (~2.0 L); heads with skull measure 3.5-7 L.
MAX_BRAIN_LITRES = 2.5
#: A skull-stripped image has a large empty surround.
MIN_BACKGROUND_FRACTION = 0.25
#: Share of the foreground in its largest connected piece; noisy head backgrounds fall apart
#: into thousands of specks.
MIN_LARGEST_COMPONENT_SHARE = 0.95

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels above the near-zero background level (see ``BACKGROUND_LEVEL``)."""
    magnitude = np.abs(np.asarray(data, dtype=np.float64))
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0:
        return np.zeros(magnitude.shape, dtype=bool)
    return magnitude > BACKGROUND_LEVEL * np.percentile(nonzero, 99)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected piece of ``mask``."""
    labels, n_labels = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if n_labels == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def is_skull_stripped(data: np.ndarray, zooms: Sequence[float]) -> bool:
    """Decide whether ``data`` already holds only the brain.

    Rule (all three must hold), from the foreground defined by ``foreground_mask``:

    1. at least ``MIN_BACKGROUND_FRACTION`` (25 %) of the field of view is background (~0);
    2. the largest 26-connected foreground piece holds at least 95 % of the foreground, i.e. the
       background is clean, not scanner noise that merely rounds to zero in places;
    3. that piece is at most ``MAX_BRAIN_LITRES`` (2.5 L): a brain, not a head with skull, scalp
       and neck (IXI heads measure 5-7 L, the MNI152 brain 1.9 L).

    Paper-silent choice; paediatric heads smaller than 2.5 L with a zeroed background would be
    taken as stripped, so force ``skull_stripped='no'`` for them.
    """
    foreground = foreground_mask(data)
    n_foreground = int(foreground.sum())
    if n_foreground == 0 or 1.0 - n_foreground / foreground.size < MIN_BACKGROUND_FRACTION:
        return False
    main_piece = largest_component(foreground)
    n_main = int(main_piece.sum())
    litres = n_main * float(np.prod(zooms)) * 1e-6
    return n_main >= MIN_LARGEST_COMPONENT_SHARE * n_foreground and litres <= MAX_BRAIN_LITRES


def mask_of_stripped_brain(data: np.ndarray) -> np.ndarray:
    """Mask of an already stripped brain: its foreground, largest piece, enclosed holes filled."""
    return ndimage.binary_fill_holes(largest_component(foreground_mask(data)))


@lru_cache(maxsize=1)
def _deepbet_model():
    """Load deepbet's TorchScript networks once per process, always on the CPU.

    ``deepbet.BrainExtraction`` is imported from the package root, which pulls in neither the
    customtkinter GUI nor anything that downloads: the weights ship inside the wheel.
    """
    from deepbet import BrainExtraction as DeepBet

    return DeepBet(no_gpu=True)


def deepbet_mask(image: nib.Nifti1Image) -> np.ndarray:
    """Boolean brain mask of a 3D head image from deepbet (threshold 0.5, no dilation)."""
    _, mask_image, _ = _deepbet_model().run(image, threshold=0.5, n_dilate=0)
    return np.asanyarray(mask_image.dataobj) > 0


def _nifti_suffix(path: str) -> str:
    return ".nii.gz" if path.endswith(".gz") else ".nii"


class _BrainExtractionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D T1w/T2w head or brain image")
    skull_stripped = traits.Enum(
        "auto", "yes", "no", usedefault=True,
        desc="whether in_file is already brain-only; 'auto' detects it (see is_skull_stripped)",
    )


class _BrainExtractionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain-only image, zero outside the mask")
    out_mask = File(exists=True, desc="uint8 brain mask")
    was_skull_stripped = traits.Bool(desc="in_file was already brain-only and passed through")


class BrainExtraction(SimpleInterface):
    """Skull-strip with deepbet (Fisch et al., 2024), or pass a stripped brain through unharmed.

    A stripped input is copied byte for byte to ``out_file``; its mask is the non-zero region
    (largest piece, holes filled). Otherwise ``out_file`` is float32, the input times deepbet's
    mask.

    >>> BrainExtraction().inputs.skull_stripped
    'auto'
    """

    input_spec = _BrainExtractionInputSpec
    output_spec = _BrainExtractionOutputSpec

    def _run_interface(self, runtime):
        in_file = self.inputs.in_file
        image = nib.load(in_file)
        if len(image.shape) != 3:
            raise DataError(
                f"{in_file}: brain extraction needs a 3D image, got shape {image.shape}; "
                "select one volume first"
            )
        data = image.get_fdata(dtype=np.float32)
        if not foreground_mask(data).any():
            raise DataError(f"{in_file}: the image is empty (all zero); check the input file")
        stripped = self.inputs.skull_stripped == "yes" or (
            self.inputs.skull_stripped == "auto"
            and is_skull_stripped(data, image.header.get_zooms()[:3])
        )
        out_file = Path(runtime.cwd) / f"brain{_nifti_suffix(in_file)}"
        if stripped:
            mask = mask_of_stripped_brain(data)
            shutil.copyfile(in_file, out_file)
        else:
            mask = deepbet_mask(image)
            if not mask.any():
                raise DataError(
                    f"{in_file}: deepbet found no brain; check the image orientation and contrast"
                )
            header = image.header.copy()
            header.set_data_dtype(np.float32)
            nib.Nifti1Image(data * mask, image.affine, header).to_filename(out_file)
        mask_header = image.header.copy()
        mask_header.set_data_dtype(np.uint8)
        out_mask = Path(runtime.cwd) / f"brainmask{WORK_IMAGE_EXTENSION}"
        nib.Nifti1Image(mask.astype(np.uint8), image.affine, mask_header).to_filename(out_mask)
        self._results.update(
            out_file=str(out_file), out_mask=str(out_mask), was_skull_stripped=bool(stripped)
        )
        return runtime
