"""Tissue segmentation, Dice and anatomical-preservation score on a 3-tissue phantom."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
import pytest

from bids_harmony.errors import DataError
from bids_harmony.volume import Volume
from bids_harmony.metrics.anatomy import (
    anatomical_preservation,
    segment_tissues,
    tissue_dice,
)

# (CSF, GM, WM) intensities of the phantom per sequence, as the demo's truth contrasts.
CONTRAST = {"T1w": (0.25, 0.60, 0.85), "T2w": (1.00, 0.55, 0.35)}


def tissue_phantom(shape: tuple[int, int, int] = (40, 44, 36), shift: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Nested ellipsoids: WM core (3), GM shell (2), CSF shell (1); returns labels, mask."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2 + np.array([shift, 0, 0])
    radius = np.sqrt(sum(((g - c) / (s / 2.4)) ** 2 for g, c, s in zip(grid, centre, shape)))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[radius < 1.0] = 1
    labels[radius < 0.8] = 2
    labels[radius < 0.55] = 3
    return labels, labels > 0


def render(labels: np.ndarray, sequence: str, noise: float, seed: int) -> np.ndarray:
    image = np.zeros(labels.shape, dtype=np.float32)
    for tissue, value in enumerate(CONTRAST[sequence], start=1):
        image[labels == tissue] = value
    noisy = image + np.random.default_rng(seed).normal(0, noise, labels.shape)
    return np.where(labels > 0, noisy, 0).astype(np.float32)


@pytest.mark.parametrize("sequence", ["T1w", "T2w"])
def test_segmentation_recovers_phantom_tissues(sequence: str) -> None:
    truth, mask = tissue_phantom()
    volume = Volume(render(truth, sequence, noise=0.04, seed=1), mask)
    labels = segment_tissues(volume, sequence)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.all(labels[~mask] == 0)
    inner = ndimage.binary_erosion(mask, iterations=1)
    assert np.all(labels[mask & ~inner] == 0)  # the partial-volume rim stays unlabelled
    for tissue, dice in tissue_dice(np.where(inner, truth, 0), labels).items():
        assert dice > 0.97, tissue


def test_segmentation_is_reproducible_and_rejects_unknown_sequences() -> None:
    truth, mask = tissue_phantom()
    volume = Volume(render(truth, "T1w", noise=0.04, seed=2), mask)
    assert np.array_equal(segment_tissues(volume, "T1w"), segment_tissues(volume, "T1w"))
    with pytest.raises(DataError, match="T2starw"):
        segment_tissues(volume, "T2starw")


def test_dice_and_preservation_by_hand() -> None:
    reference = np.array([1, 1, 1, 1, 2, 2, 3, 3, 0, 0])
    test = np.array([1, 1, 2, 2, 2, 2, 3, 3, 3, 0])
    dice = tissue_dice(reference, test)
    # CSF: |A∩B| = 2, |A| = 4, |B| = 2 -> 4/6; GM: 2, 2, 4 -> 4/6; WM: 2, 2, 3 -> 4/5.
    assert dice == pytest.approx({"CSF": 4 / 6, "GM": 4 / 6, "WM": 4 / 5})
    aps = anatomical_preservation(reference, test)
    # 1 - |V_test - V_ref| / V_ref: CSF 1 - 2/4, GM 1 - 2/2, WM 1 - 1/2.
    assert aps == pytest.approx({"CSF": 0.5, "GM": 0.0, "WM": 0.5})
    assert anatomical_preservation(reference, reference) == {"CSF": 1.0, "GM": 1.0, "WM": 1.0}


def test_dice_of_missing_tissue_is_nan_and_shapes_must_match() -> None:
    empty = np.zeros(4, dtype=np.uint8)
    assert np.isnan(tissue_dice(empty, empty)["GM"])
    with pytest.raises(DataError, match="shape"):
        tissue_dice(empty, np.zeros(5, dtype=np.uint8))


def test_monotone_intensity_change_keeps_segmentation() -> None:
    """A harmonizer that only remaps intensities monotonically keeps Dice and APS near 1."""
    truth, mask = tissue_phantom()
    source = render(truth, "T1w", noise=0.03, seed=3)
    remapped = np.where(mask, source**1.4, 0).astype(np.float32)
    before = segment_tissues(Volume(source, mask), "T1w")
    after = segment_tissues(Volume(remapped, mask), "T1w")
    assert min(tissue_dice(before, after).values()) > 0.97
    assert min(anatomical_preservation(before, after).values()) > 0.95
