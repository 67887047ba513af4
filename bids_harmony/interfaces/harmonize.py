"""Apply a fitted harmonizer to one preprocessed image and measure what it changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_harmony.interfaces import WORK_IMAGE_EXTENSION


class _HarmonizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="normalised image in template space")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    edges_file = File(exists=True, mandatory=True,
                      desc="the pipeline's 3D Canny edge map (desc-edges) on the same grid")
    model_dir = Directory(exists=True, mandatory=True, desc="a saved harmonizer")
    sequence = traits.Str(mandatory=True, desc="BIDS suffix of the image, e.g. T1w")


class _HarmonizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized image, same grid as in_file")
    metadata = traits.Dict(desc="sidecar fields: method, target, model checksum, QC metrics")


class Harmonize(SimpleInterface):
    """Load the model named by its card, transform the image and compute the QC metrics.

    The QC answers the two questions a user asks of every harmonized image: was the
    structure kept (structural SSIM and NCC against the source) and was the style matched
    (Wasserstein distance to the target site's intensity distribution, before and after).
    """

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        from bids_harmony.harmonizers import load_harmonizer
        from bids_harmony.harmonizers.base import MODEL_CARD, model_checksum
        from bids_harmony.metrics import harmonization_qc
        from bids_harmony.volume import EDGES, load_volume

        harmonizer = load_harmonizer(Path(self.inputs.model_dir))
        image = nb.load(self.inputs.in_file)
        source = load_volume(self.inputs.in_file, self.inputs.mask_file,
                             {EDGES: self.inputs.edges_file})
        harmonized = harmonizer.transform(source, self.inputs.sequence)
        out_file = os.path.join(runtime.cwd, f"harmonized{WORK_IMAGE_EXTENSION}")
        out = nb.Nifti1Image(harmonized, image.affine, image.header)
        out.set_data_dtype(np.float32)
        out.to_filename(out_file)
        metrics = harmonization_qc(
            source, harmonized, harmonizer.reference_quantiles(self.inputs.sequence)
        )
        card = Path(self.inputs.model_dir) / MODEL_CARD
        self._results["out_file"] = out_file
        self._results["metadata"] = {
            "HarmonizationMethod": harmonizer.name,
            "TargetSite": harmonizer.target_site_,
            "ModelChecksum": model_checksum(card.parent),
            "Parameters": harmonizer.params,
            "QC": {key: _json_number(value) for key, value in metrics.items()},
        }
        return runtime


def _json_number(value: float) -> float | None:
    """JSON has no inf/NaN: write null instead."""
    value = float(value)
    return value if np.isfinite(value) else None
