"""Registration to a template and resampling with antspyx (ANTs)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_harmony.errors import DataError
from bids_harmony.interfaces import WORK_IMAGE_EXTENSION

#: antspyx ``type_of_transform`` per option. ANTs 'Affine' starts from a centre-of-mass
#: translation and fits a full affine; 'SyN' runs that affine stage and then SyN.
TRANSFORM_TYPES = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}
#: (affine-stage metric, SyN-stage metric, SyN metric parameter). antspyx passes the affine
#: metric a histogram-bin count, which CC would misread as a 32-voxel radius, so 'cc' uses global
#: correlation (GC, CC over the whole image) for the linear stages and CC with the ANTs-default
#: radius of 4 voxels for SyN. 'mattes' (mutual information, 32 bins) also works across contrasts.
METRICS = {"mattes": ("mattes", "mattes", 32), "cc": ("GC", "CC", 4)}
#: Interpolators whose output is a label image: uint8 (int32 when labels exceed 0-255).
LABEL_INTERPOLATORS = ("nearestNeighbor", "genericLabel")


def _set_itk_threads(num_threads: int) -> None:
    """ITK reads this when its thread pool is first built, i.e. in a fresh node process."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(num_threads)


def _save_like(data: np.ndarray, reference: nib.Nifti1Image, dtype: type, path: Path) -> None:
    """Write ``data`` with the reference's own affine and header, avoiding an ITK round trip."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    nib.Nifti1Image(data.astype(dtype), reference.affine, header).to_filename(path)


class _RegisterToTemplateInputSpec(BaseInterfaceInputSpec):
    moving_file = File(exists=True, mandatory=True, desc="brain-extracted subject image")
    moving_mask = File(exists=True, desc="metric mask in the moving space")
    fixed_file = File(exists=True, mandatory=True, desc="template brain")
    fixed_mask = File(exists=True, desc="metric mask in the template space")
    transform_type = traits.Enum("affine", "rigid", "syn", usedefault=True, desc="transform model")
    metric = traits.Enum("mattes", "cc", usedefault=True, desc="similarity metric (see METRICS)")
    random_seed = traits.Int(42, usedefault=True, desc="seed of the metric's random sampling")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _RegisterToTemplateOutputSpec(TraitedSpec):
    forward_transforms = traits.List(
        File(exists=True), desc="moving -> fixed, ANTs order (last listed is applied first)"
    )
    inverse_transforms = traits.List(
        File(exists=True), desc="fixed -> moving, ANTs order; use with inverse_invert_flags"
    )
    inverse_invert_flags = traits.List(
        traits.Bool, desc="which inverse_transforms to invert (the affine .mat is shared)"
    )
    warped_file = File(exists=True, desc="moving image resampled onto the fixed grid, float32")


class RegisterToTemplate(SimpleInterface):
    """Register a subject brain to a template brain with ``ants.registration``.

    Transforms are written straight into the node directory with the ANTs prefix ``xfm_``
    (``xfm_0GenericAffine.mat``, ``xfm_1Warp.nii.gz``, ``xfm_1InverseWarp.nii.gz``), so nothing is
    left in ``/tmp`` and re-runs keep the same names. The random seed fixes the metric's random
    sampling; results are bitwise reproducible only with ``num_threads=1``.

    >>> RegisterToTemplate(transform_type="syn").inputs.metric
    'mattes'
    """

    input_spec = _RegisterToTemplateInputSpec
    output_spec = _RegisterToTemplateOutputSpec

    def _run_interface(self, runtime):
        _set_itk_threads(self.inputs.num_threads)
        import ants
        from ants.config import set_ants_deterministic

        set_ants_deterministic(on=True, seed_value=self.inputs.random_seed)
        _set_itk_threads(self.inputs.num_threads)  # set_ants_deterministic forces one thread
        fixed = ants.image_read(self.inputs.fixed_file, pixeltype="float")
        moving = ants.image_read(self.inputs.moving_file, pixeltype="float")
        masks = {
            name: ants.image_read(path, pixeltype="float")
            for name, path in (
                ("mask", self.inputs.fixed_mask),
                ("moving_mask", self.inputs.moving_mask),
            )
            if path
        }
        aff_metric, syn_metric, syn_sampling = METRICS[self.inputs.metric]
        for stale in Path(runtime.cwd).glob("xfm_*"):  # antspyx lists outputs by prefix glob
            stale.unlink()
        try:
            result = ants.registration(
                fixed,
                moving,
                type_of_transform=TRANSFORM_TYPES[self.inputs.transform_type],
                outprefix=str(Path(runtime.cwd) / "xfm_"),
                aff_metric=aff_metric,
                syn_metric=syn_metric,
                syn_sampling=syn_sampling,
                **masks,
            )
        except RuntimeError as error:
            raise DataError(
                f"{self.inputs.moving_file}: registration to {self.inputs.fixed_file} failed "
                f"({error}); check that both are brain-extracted 3D images"
            ) from error
        inverse = list(result["invtransforms"])
        warped_file = Path(runtime.cwd) / f"warped{WORK_IMAGE_EXTENSION}"
        _save_like(result["warpedmovout"].numpy(), nib.load(self.inputs.fixed_file),
                   np.float32, warped_file)
        self._results.update(
            forward_transforms=list(result["fwdtransforms"]),
            inverse_transforms=inverse,
            inverse_invert_flags=[path.endswith(".mat") for path in inverse],
            warped_file=str(warped_file),
        )
        return runtime


class _ApplyTransformsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample")
    reference_file = File(exists=True, mandatory=True, desc="image defining the output grid")
    transforms = InputMultiObject(
        File(exists=True), mandatory=True, desc="ANTs order: the last listed is applied first"
    )
    invert_flags = traits.List(
        traits.Bool, [], usedefault=True,
        desc="per transform, invert it (affine .mat only); default: none inverted",
    )
    interpolation = traits.Enum(
        "linear", "nearestNeighbor", "genericLabel", "bSpline", "lanczosWindowedSinc",
        usedefault=True, desc="ANTs interpolator; label interpolators give integer output",
    )
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _ApplyTransformsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled: float32; uint8/int32 for label interpolators")


class ApplyTransforms(SimpleInterface):
    """Resample an image through a chain of ANTs transforms onto a reference grid.

    ``invert_flags`` defaults to all False, explicitly: antspyx would otherwise silently invert
    the first of two transforms when it is a ``.mat``. Pass ``RegisterToTemplate``'s
    ``inverse_transforms`` with its ``inverse_invert_flags`` to go back to the native grid.

    >>> ApplyTransforms().inputs.interpolation
    'linear'
    """

    input_spec = _ApplyTransformsInputSpec
    output_spec = _ApplyTransformsOutputSpec

    def _run_interface(self, runtime):
        _set_itk_threads(self.inputs.num_threads)
        import ants

        transforms = list(self.inputs.transforms)
        invert_flags = list(self.inputs.invert_flags) or [False] * len(transforms)
        if len(invert_flags) != len(transforms):
            raise DataError(
                f"{self.inputs.in_file}: {len(invert_flags)} invert_flags for "
                f"{len(transforms)} transforms; give one flag per transform"
            )
        resampled = ants.apply_transforms(
            fixed=ants.image_read(self.inputs.reference_file, pixeltype="float"),
            moving=ants.image_read(self.inputs.in_file, pixeltype="float"),
            transformlist=transforms,
            interpolator=self.inputs.interpolation,
            whichtoinvert=invert_flags,
        )
        data = resampled.numpy()
        dtype = np.float32
        if self.inputs.interpolation in LABEL_INTERPOLATORS:
            data = np.rint(data)
            dtype = np.uint8 if data.min() >= 0 and data.max() <= 255 else np.int32
        out_file = Path(runtime.cwd) / f"resampled{WORK_IMAGE_EXTENSION}"
        _save_like(data, nib.load(self.inputs.reference_file), dtype, out_file)
        self._results["out_file"] = str(out_file)
        return runtime
