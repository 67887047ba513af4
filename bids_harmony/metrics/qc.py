"""Per-image quality control of a harmonization: was anatomy kept, did the style move?"""

from __future__ import annotations

import numpy as np

from bids_harmony.volume import Volume
from bids_harmony.metrics.similarity import ncc, ssim_components, wasserstein


def harmonization_qc(
    source: Volume,
    harmonized: np.ndarray,
    target_reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Measures of one harmonized image, all inside the source brain mask.

    ``structural_ssim`` (SSIM structure term, paper 002's anatomy check), ``ssim_vs_source``
    and ``ncc_vs_source`` compare the output with its own input: harmonization should
    change intensities, not anatomy, so the structure term stays near 1.
    ``target_reference`` holds brain intensities of the target site (e.g. the brain voxels
    of a target-site image, or a fitted harmonizer's ``reference_quantiles(sequence)``;
    any shape, every value is used). When given,
    ``wd_vs_target`` and ``wd_source_vs_target`` are the Wasserstein distances from the
    output's and the input's brain intensities to it, so the gain is the difference.
    """
    mask = source.mask.astype(bool)
    components = ssim_components(source.data, harmonized, mask)
    report = {
        "structural_ssim": components["structure"],
        "ssim_vs_source": components["ssim"],
        "ncc_vs_source": ncc(source.data, harmonized, mask),
    }
    if target_reference is not None:
        report["wd_vs_target"] = wasserstein(harmonized[mask], target_reference)
        report["wd_source_vs_target"] = wasserstein(source.data[mask], target_reference)
    return report
