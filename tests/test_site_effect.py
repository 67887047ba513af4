"""Site-effect measures: features, site classification, brain age, site distance matrices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from test_anatomy import render, tissue_phantom

from bids_harmony.errors import DataError
from bids_harmony.volume import Volume
from bids_harmony.metrics.anatomy import TISSUES, segment_tissues
from bids_harmony.metrics.site_effect import (
    classify_sites,
    image_features,
    predict_brain_age,
    site_luminance_ssim,
    site_wasserstein_matrix,
)
from bids_harmony.metrics.similarity import ssim_components

# Demo-like scanners: a gamma curve, blur and noise level per site (as data/demo.py applies).
SITES = {"A": (1.0, 0.0, 0.02), "B": (1.5, 0.8, 0.03), "C": (0.7, 0.0, 0.06)}


def test_features_of_a_ramp_by_hand() -> None:
    """Inside a ramp of slope s along x: gradient = s and local 3-voxel std = s*sqrt(2/3)."""
    slope = 0.01
    data = np.broadcast_to(slope * np.arange(40.0)[:, None, None], (40, 30, 30)).astype(
        np.float32)
    mask = np.zeros(data.shape, dtype=bool)
    mask[5:35, 5:25, 5:25] = True
    features = image_features(Volume(data.copy(), mask))
    assert features["intensity_brain_q50"] == pytest.approx(np.median(data[mask]))
    assert features["intensity_brain_q01"] == pytest.approx(np.quantile(data[mask], 0.01))
    for q in ("q10", "q50", "q90"):
        assert features[f"gradient_brain_{q}"] == pytest.approx(slope, rel=1e-3)
        assert features[f"localstd_brain_{q}"] == pytest.approx(slope * np.sqrt(2 / 3),
                                                                 rel=1e-3)


def test_tissue_features_use_the_labels() -> None:
    truth, mask = tissue_phantom()
    image = render(truth, "T1w", noise=0.0, seed=0)
    features = image_features(Volume(image, mask), truth, TISSUES)
    assert features["intensity_GM_q50"] == pytest.approx(0.60, abs=1e-6)
    assert features["intensity_WM_iqr"] == pytest.approx(0.0, abs=1e-6)


def _site_images(n_per_site: int) -> tuple[list[Volume], list[str]]:
    volumes, sites = [], []
    for index in range(n_per_site):
        truth, mask = tissue_phantom(shift=index % 3 - 1)
        for site, (gamma, blur, noise) in SITES.items():
            image = render(truth, "T1w", noise=0.0, seed=0) ** gamma
            image = ndimage.gaussian_filter(image, blur) if blur else image
            rng = np.random.default_rng([index, ord(site)])
            image = np.where(mask, image + rng.normal(0, noise, image.shape), 0)
            volumes.append(Volume(image.astype(np.float32), mask))
            sites.append(site)
    return volumes, sites


def test_classifier_finds_a_real_site_effect() -> None:
    volumes, sites = _site_images(n_per_site=4)
    features = np.array([
        list(image_features(vol, segment_tissues(vol, "T1w"), TISSUES).values())
        for vol in volumes
    ])
    result = classify_sites(features, sites, n_repeats=3)
    assert result.balanced_accuracy > 0.9
    assert result.chance_level == pytest.approx(1 / 3)
    assert result.n_sites == 3
    assert result.validation.n_splits == 4  # K = min(5, 4 images per site), and it says so
    assert "4-fold instead of 5-fold" in result.validation.note


def test_classifier_is_near_chance_without_site_information() -> None:
    rng = np.random.default_rng(7)
    sites = [s for s in "ABC" for _ in range(10)]
    result = classify_sites(rng.standard_normal((30, 20)), sites, n_repeats=5)
    assert abs(result.balanced_accuracy - 1 / 3) < 0.15
    assert result.validation.n_splits == 5 and result.validation.note == "5-fold"


def test_classifier_needs_two_images_per_site() -> None:
    with pytest.raises(DataError, match="2 images each"):
        classify_sites(np.zeros((3, 2)), ["A", "A", "B"])


def test_brain_age_uses_subject_folds_and_beats_the_mean() -> None:
    rng = np.random.default_rng(3)
    ages = np.repeat(rng.uniform(20, 80, size=8), 3)  # 8 subjects scanned at 3 sites
    subjects = np.repeat([f"{i:02d}" for i in range(8)], 3)
    features = np.column_stack([ages + rng.normal(0, 1, ages.size),
                                rng.standard_normal(ages.size)])
    result = predict_brain_age(features, ages, subjects, n_repeats=3)
    assert result.mae < 0.3 * result.baseline_mae
    assert result.validation.n_splits == 5
    with pytest.raises(DataError, match="at least 3 participants"):
        predict_brain_age(features[:6], ages[:6], subjects[:6])


def test_site_wasserstein_matrix_by_hand() -> None:
    values = {"A": [np.full(50, 0.2), np.full(80, 0.2)], "B": [np.full(30, 0.5)],
              "C": [np.full(10, 0.1), np.full(10, 0.3)]}
    sites, matrix = site_wasserstein_matrix(values)
    assert sites == ["A", "B", "C"]
    # C is half 0.1, half 0.3 (images weigh equally): W(A, C) = 0.1, W(B, C) = (0.4 + 0.2) / 2.
    expected = np.array([[0.0, 0.3, 0.1], [0.3, 0.0, 0.3], [0.1, 0.3, 0.0]])
    assert matrix == pytest.approx(expected, abs=1e-9)


def test_site_luminance_ssim_by_hand() -> None:
    shape = (12, 12, 12)
    images = {"A": np.full(shape, 0.4), "B": np.full(shape, 0.6), "C": np.full(shape, 0.4)}
    sites, matrix = site_luminance_ssim(images, np.ones(shape, dtype=bool))
    c1 = 0.01**2
    expected_ab = (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1)
    assert matrix[0, 1] == pytest.approx(expected_ab) and matrix[1, 0] == matrix[0, 1]
    assert matrix[0, 2] == pytest.approx(1.0) and np.all(np.diag(matrix) == 1.0)
    rng = np.random.default_rng(0)
    x, y = rng.random(shape), rng.random(shape)
    _, pair = site_luminance_ssim({"x": x, "y": y}, np.ones(shape, dtype=bool))
    assert pair[0, 1] == pytest.approx(ssim_components(x, y)["luminance"])
