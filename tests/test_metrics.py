"""Similarity measures against hand-computed values and scikit-image."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from bids_harmony.volume import Volume
from bids_harmony.metrics import (
    harmonization_qc,
    ncc,
    pearson,
    psnr,
    ssim,
    ssim_components,
    wasserstein,
)


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = gaussian_filter(rng.random((20, 22, 18)), 1.0)
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(0.8 * x**1.3 + 0.05 * rng.standard_normal(x.shape), 0, 1)
    return x, y


def test_identical_images_are_perfect(pair) -> None:
    x, _ = pair
    components = ssim_components(x, x)
    for name in ("ssim", "luminance", "contrast", "structure"):
        assert components[name] == pytest.approx(1.0, abs=1e-9)
    assert psnr(x, x) == float("inf")
    assert ncc(x, x) == pytest.approx(1.0)


def test_ssim_matches_scikit_image_inside_its_cropped_border(pair) -> None:
    x, y = pair
    expected, full = structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )
    # scikit-image averages the map after cropping (win_size - 1) / 2 = 5 voxels per side.
    interior = np.zeros(x.shape, dtype=bool)
    interior[5:-5, 5:-5, 5:-5] = True
    assert ssim(x, y, interior) == pytest.approx(expected, rel=1e-6)
    assert ssim(x, y) == pytest.approx(full.mean(), rel=1e-6)


def test_constant_images_give_closed_form_luminance() -> None:
    # Constant images: the Gaussian window returns the constants themselves and both
    # variances are 0, so luminance is (2ab + C1) / (a^2 + b^2 + C1), contrast and
    # structure are exactly 1.
    a, b = 0.3, 0.5
    x, y = np.full((9, 9, 9), a), np.full((9, 9, 9), b)
    c1 = (0.01 * 1.0) ** 2
    components = ssim_components(x, y)
    assert components["luminance"] == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1))
    assert components["contrast"] == pytest.approx(1.0)
    assert components["structure"] == pytest.approx(1.0)
    assert components["ssim"] == pytest.approx(components["luminance"])


def test_offset_keeps_contrast_and_structure(pair) -> None:
    x, _ = pair
    components = ssim_components(x, x + 0.1)
    # Only the local means differ, by the offset: luminance has a closed form in them.
    mu = gaussian_filter(x, sigma=1.5, truncate=3.5, mode="reflect")
    c1 = (0.01 * 1.0) ** 2
    expected = np.mean((2 * mu * (mu + 0.1) + c1) / (mu**2 + (mu + 0.1) ** 2 + c1))
    assert components["luminance"] == pytest.approx(expected, rel=1e-9)
    assert components["contrast"] == pytest.approx(1.0, abs=1e-9)
    assert components["structure"] == pytest.approx(1.0, abs=1e-6)


def test_inverted_image_has_negative_structure(pair) -> None:
    x, _ = pair
    assert ssim_components(x, 1.0 - x)["structure"] < -0.9


def test_mask_restricts_the_average() -> None:
    x = np.zeros((10, 10, 10))
    y = x.copy()
    y[:5] = 0.5
    mask = np.zeros(x.shape, dtype=bool)
    mask[7:] = True
    assert psnr(x, y, mask) == float("inf")
    assert psnr(x, y) == pytest.approx(10 * np.log10(1 / (0.25 / 2)))


def test_psnr_of_known_mse() -> None:
    x = np.zeros((4, 4, 4))
    y = np.full((4, 4, 4), 0.1)  # MSE 0.01 -> 20 dB at data range 1, 26.02 dB at range 2
    assert psnr(x, y) == pytest.approx(20.0)
    assert psnr(x, y, data_range=2.0) == pytest.approx(20.0 + 20 * np.log10(2.0))


def test_pearson_and_ncc_match_numpy(pair) -> None:
    x, y = pair
    mask = x > np.median(x)
    expected = np.corrcoef(x[mask], y[mask])[0, 1]
    assert pearson(x, y, mask) == pytest.approx(expected, rel=1e-10)
    assert ncc(x, y, mask) == pytest.approx(expected, rel=1e-10)
    assert ncc(x, 3 * x + 1) == pytest.approx(1.0)
    assert ncc(x, 1 - x) == pytest.approx(-1.0)
    assert np.isnan(ncc(x, np.ones_like(x)))


def test_wasserstein_of_shifted_deltas_is_the_shift() -> None:
    assert wasserstein(np.full(10, 0.2), np.full(7, 0.5)) == pytest.approx(0.3)
    values = np.random.default_rng(1).random((5, 6))
    assert wasserstein(values, values + 0.25) == pytest.approx(0.25)
    assert wasserstein(values, values) == 0.0


def test_wasserstein_is_scipys_number_on_real_brain_values(ixi_dir: Path) -> None:
    """Sorted once and merged, it gives scipy's distance exactly, ties and sizes unequal."""
    from scipy.stats import wasserstein_distance

    heads = sorted((ixi_dir / "nifti").glob("*.nii.gz"))[:2]
    first, second = (np.asarray(nb.load(path).dataobj, dtype=np.float64) for path in heads)
    u, v = first[first > 20], second[second > 30][::3]  # uint8: many ties
    assert wasserstein(u, v) == pytest.approx(wasserstein_distance(u, v), rel=1e-12)
    assert wasserstein(u, u + 1.5) == pytest.approx(1.5, rel=1e-12)


def test_shape_mismatch_and_empty_mask_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="no voxel"):
        psnr(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), np.zeros((3, 3, 3), dtype=bool))


def test_harmonization_qc_reports_anatomy_and_style(pair) -> None:
    x, _ = pair
    mask = np.zeros(x.shape, dtype=bool)
    mask[3:-3, 3:-3, 3:-3] = True
    source = Volume((x * mask).astype(np.float32), mask)
    # A pure contrast change keeps structure exactly and lands on the target's values.
    target_brain = 0.5 * source.brain
    harmonized = 0.5 * source.data
    qc = harmonization_qc(source, harmonized, target_brain)
    assert qc["structural_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert qc["ncc_vs_source"] == pytest.approx(1.0)
    assert qc["ssim_vs_source"] == pytest.approx(ssim(source.data, harmonized, mask))
    assert qc["ssim_vs_source"] < 0.99
    assert qc["wd_vs_target"] == pytest.approx(0.0, abs=1e-6)
    assert qc["wd_source_vs_target"] > 0.1
    assert set(harmonization_qc(source, harmonized, None)) == {
        "structural_ssim", "ssim_vs_source", "ncc_vs_source",
    }
