"""Nyúl & Udupa piecewise-linear histogram standardisation onto the target site's scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bids_harmony.errors import DataError, UsageError
from bids_harmony.harmonizers.base import Harmonizer
from bids_harmony.harmonizers.registry import register
from bids_harmony.volume import Volume

DEFAULT_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)


@register("nyul")
class Nyul(Harmonizer):
    """Nyúl-Udupa piecewise-linear standardisation of brain intensity landmarks.

    Classical definition (Nyúl & Udupa 1999; Nyúl, Udupa & Zhang 2000): landmarks are
    brain-intensity percentiles (default 1, 10, 20, ..., 90, 99; the first and last are
    p_low and p_high). Each reference image's landmarks are mapped linearly so that
    [p_low, p_high] lands on the standard range [s1, s2], and the standard scale is their
    mean. Transform maps an image's own landmarks onto the standard scale piecewise
    linearly, extending the first and last segments linearly beyond the end landmarks.

    Choice the papers leave open: [s1, s2] is the target site's mean (p_low, p_high) over
    its reference images (all images for ``unified``) rather than a fixed range such as
    [1, 100], so the output lies in the target site's intensity range and can be compared
    with target-site images.

    Implemented with numpy rather than by wrapping ``intensity_normalization``'s
    ``NyulNormalizer`` (3.0.1): its fitted scale can only be restored from its own ``.npy``
    file or private attributes, its output range is a constructor constant while ours is
    learned, and its ``interp1d`` divides by zero when two landmarks tie, which happens on
    clipped [0, 1] inputs where p_low is often exactly 0. Here tied landmarks are spread
    by a tiny increment so the map stays monotone and finite.
    """

    citation = ("Nyúl LG, Udupa JK. On standardizing the MR image intensity scale. Magn Reson Med "
                "42(6):1072-1081, 1999; Nyúl LG, Udupa JK, Zhang X. New variants of a method of "
                "MRI scale standardization. IEEE Trans Med Imaging 19(2):143-150, 2000.")

    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        chosen = [float(p) for p in percentiles]
        increasing = all(np.diff(chosen) > 0)
        if len(chosen) < 2 or not increasing or not 0.0 <= chosen[0] < chosen[-1] <= 100.0:
            raise UsageError(
                f"nyul percentiles must be at least two increasing values in [0, 100], "
                f"got {list(percentiles)}"
            )
        super().__init__(percentiles=chosen)

    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        percentiles = np.asarray(self.params["percentiles"], dtype=np.float64)
        landmarks = np.array([image_landmarks(image, percentiles) for image in reference])
        s1, s2 = landmarks[:, 0].mean(), landmarks[:, -1].mean()
        low, high = landmarks[:, :1], landmarks[:, -1:]
        scaled = s1 + (landmarks - low) * (s2 - s1) / (high - low)
        return {"percentiles": percentiles, "standard_scale": scaled.mean(axis=0)}

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        landmarks = image_landmarks(image, state["percentiles"])
        return piecewise_linear(image.data.astype(np.float64), landmarks, state["standard_scale"])


def image_landmarks(image: Volume, percentiles: np.ndarray) -> np.ndarray:
    """Brain-intensity percentiles, made strictly increasing so every segment has a slope."""
    brain = image.brain.astype(np.float64)
    if brain.size == 0:
        raise DataError("the brain mask is empty; check the brain mask of this image")
    landmarks = np.percentile(brain, percentiles)
    if landmarks[-1] == landmarks[0]:
        raise DataError(
            "the brain intensities are constant between the end landmarks; check the "
            "brain mask and the preprocessing of this image"
        )
    step = (landmarks[-1] - landmarks[0]) * 1e-6
    for i in range(1, len(landmarks)):
        landmarks[i] = max(landmarks[i], landmarks[i - 1] + step)
    return landmarks


def piecewise_linear(data: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp`` with the end segments extended linearly instead of clamped."""
    out = np.interp(data, xp, fp)
    below, above = data < xp[0], data > xp[-1]
    out[below] = fp[0] + (data[below] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    out[above] = fp[-1] + (data[above] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return out
