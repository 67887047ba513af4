"""Store a chain of ANTs transforms as one ITK composite file (``.h5``), as BIDS expects."""

from __future__ import annotations

import os
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _CompositeTransformInputSpec(BaseInterfaceInputSpec):
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="ANTs transforms, last applied first")
    invert_flags = traits.List(traits.Bool, [], usedefault=True,
                               desc="invert each affine (ANTs whichtoinvert); default none")


class _CompositeTransformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="ITK composite transform (.h5)")


class CompositeTransform(SimpleInterface):
    """Write ANTs affines (``.mat``) and displacement fields as one ITK ``.h5`` composite.

    The composite keeps ANTs' order (ITK also applies the last-added transform first), so
    ``antsApplyTransforms -t out.h5`` reproduces the chain. Inverted affines are stored as
    their inverse; displacement fields are stored as they are (ANTs writes the inverse
    warp as its own file).
    """

    input_spec = _CompositeTransformInputSpec
    output_spec = _CompositeTransformOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import SimpleITK as sitk

        flags = list(self.inputs.invert_flags) or [False] * len(self.inputs.transforms)
        composite = sitk.CompositeTransform(3)
        for path, invert in zip(self.inputs.transforms, flags):
            if str(path).endswith((".nii", ".nii.gz")):
                field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
                composite.AddTransform(sitk.DisplacementFieldTransform(field))
            else:
                transform = sitk.ReadTransform(str(path))
                composite.AddTransform(transform.GetInverse() if invert else transform)
        out_file = os.path.join(runtime.cwd, "composite_xfm.h5")
        sitk.WriteTransform(composite, out_file)
        self._results["out_file"] = out_file
        return runtime
