"""Z-score inside the brain mask, re-expressed in the target site's intensity scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bids_harmony.errors import DataError
from bids_harmony.harmonizers.base import Harmonizer
from bids_harmony.harmonizers.registry import register
from bids_harmony.volume import Volume


@register("zscore")
class ZScore(Harmonizer):
    """Z-score of the brain intensities, mapped to the target site's brain mean and spread.

    Plain z-scoring gives values around 0 with unit spread, a scale no target-site image
    has; the evaluation compares outputs with target-site images in [0, 1], so each
    standardised image is mapped to ``target_mean + target_std * z``. ``target_mean`` and
    ``target_std`` are the averages over the reference images (all images for
    ``unified``) of each image's own brain mean and standard deviation: what a typical
    target image looks like. Pooling all voxels instead would add the between-image
    spread of the means to the standard deviation.
    """

    citation = ("Shinohara RT, Sweeney EM, Goldsmith J, et al. Statistical normalization "
                "techniques for magnetic resonance imaging. NeuroImage Clin 6:9-19, 2014. "
                "doi:10.1016/j.nicl.2014.08.008")

    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        stats = np.array([brain_mean_std(image) for image in reference])
        return {"target_mean": np.asarray(stats[:, 0].mean()),
                "target_std": np.asarray(stats[:, 1].mean())}

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        mean, std = brain_mean_std(image)
        z = (image.data.astype(np.float64) - mean) / std
        return state["target_mean"].item() + state["target_std"].item() * z


def brain_mean_std(image: Volume) -> tuple[float, float]:
    """Mean and standard deviation of the brain voxels; a flat brain cannot be scaled."""
    brain = image.brain.astype(np.float64)
    if brain.size == 0 or brain.std() == 0.0:
        raise DataError(
            "the brain mask is empty or its intensities are constant; check the brain mask "
            "and the preprocessing of this image"
        )
    return float(brain.mean()), float(brain.std())
