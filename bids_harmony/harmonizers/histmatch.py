"""Subject-level 3D histogram matching to the target site's pooled brain histogram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bids_harmony.errors import UsageError
from bids_harmony.harmonizers.base import Harmonizer
from bids_harmony.harmonizers.registry import register
from bids_harmony.volume import Volume


@register("histmatch")
class HistogramMatching(Harmonizer):
    """Histogram matching of each image's brain to the target site's pooled brain histogram.

    The baseline of BlindHarmony and BlindHarmonyDiff: "storing the histogram of target
    domain images and matching the source domain image histogram to the target domain
    histogram at the subject level" (3D). Choices the papers leave open:

    * The target histogram is stored as ``n_quantiles`` (default 1024) quantiles of the
      pooled brain voxels of the reference images (all images for ``unified``), at levels
      ``(k + 0.5) / n_quantiles``. Pooling weights every voxel equally. To keep memory
      flat in the number of images, each image is first summarised by ``4 * n_quantiles``
      of its own quantiles, weighted by its voxel count.
    * Matching is scikit-image's ``match_histograms`` rule restricted to the brain mask:
      each voxel goes to its empirical CDF level (ties share their mid-rank) and then to
      the target quantile at that level by linear interpolation, so the map is monotone
      and the output stays within the target's intensity range.
    """

    citation = ("Jeong H, Lee H, Chun SY, Lee J. Efficient and robust 3D blind harmonization for "
                "large domain gaps. CVPR, 2025 (its subject-level 3D histogram-matching "
                "baseline).")

    def __init__(self, n_quantiles: int = 1024) -> None:
        if int(n_quantiles) < 2:
            raise UsageError(f"histmatch needs n_quantiles >= 2, got {n_quantiles}")
        super().__init__(n_quantiles=int(n_quantiles))

    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        levels = quantile_levels(self.params["n_quantiles"])
        return {"levels": levels, "quantiles": pooled_quantiles(reference, levels)}

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        mask = image.mask.astype(bool)
        values, inverse, counts = np.unique(
            image.data[mask], return_inverse=True, return_counts=True
        )
        cdf = (np.cumsum(counts) - counts / 2.0) / counts.sum()
        out = np.zeros(image.data.shape, dtype=np.float64)
        out[mask] = np.interp(cdf, state["levels"], state["quantiles"])[inverse.ravel()]
        return out


def quantile_levels(n_quantiles: int) -> np.ndarray:
    """Mid-point probability levels ``(k + 0.5) / n``, k = 0 .. n - 1."""
    return (np.arange(n_quantiles, dtype=np.float64) + 0.5) / n_quantiles


def pooled_quantiles(images: Sequence[Volume], levels: np.ndarray) -> np.ndarray:
    """Quantiles of the pooled brain voxels of ``images``, from per-image summaries."""
    summary_levels = quantile_levels(4 * len(levels))
    values, weights = [], []
    for image in images:
        brain = image.brain.astype(np.float64)
        values.append(np.quantile(brain, summary_levels))
        weights.append(np.full(len(summary_levels), brain.size / len(summary_levels)))
    pooled_values = np.concatenate(values)
    pooled_weights = np.concatenate(weights)
    order = np.argsort(pooled_values, kind="stable")
    cumulative = np.cumsum(pooled_weights[order])
    midpoints = (cumulative - pooled_weights[order] / 2.0) / cumulative[-1]
    return np.interp(levels, midpoints, pooled_values[order])
