"""Did preprocessing work? The template-space image measured against the template itself."""

from __future__ import annotations

import logging

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_harmony.metrics.preprocessing import preprocessing_qc
from bids_harmony.volume import load_volume

LOGGER = logging.getLogger("bids_harmony")


class _PreprocessingQCInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="desc-preproc image on the template grid")
    mask_file = File(exists=True, mandatory=True, desc="its warped brain mask")
    template_file = File(exists=True, mandatory=True, desc="template brain, same grid")
    template_mask = File(exists=True, mandatory=True, desc="template brain mask")
    source_file = traits.Str("", usedefault=True, desc="input image, named in the warning")


class _PreprocessingQCOutputSpec(TraitedSpec):
    measures = traits.Dict(desc="template_ncc, structure_ncc, mask_dice, mask_volume_ratio")
    flags = traits.List(traits.Str, desc="registration and/or not_brain_like, or empty")


class PreprocessingQC(SimpleInterface):
    """Registration and brain-likeness measures of one preprocessed image, and their flags
    (:mod:`bids_harmony.metrics.preprocessing`); a flagged image is logged as a warning."""

    input_spec = _PreprocessingQCInputSpec
    output_spec = _PreprocessingQCOutputSpec

    def _run_interface(self, runtime):
        measures, flags = preprocessing_qc(
            load_volume(self.inputs.in_file, self.inputs.mask_file),
            load_volume(self.inputs.template_file, self.inputs.template_mask),
        )
        if flags:
            LOGGER.warning("%s: preprocessing QC flags %s (%s); the group level leaves it out "
                           "of fitting unless --keep-flagged", self.inputs.source_file
                           or self.inputs.in_file, ", ".join(flags),
                           ", ".join(f"{k} {v:.3f}" for k, v in measures.items()))
        self._results.update(measures=measures, flags=flags)
        return runtime
