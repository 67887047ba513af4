"""Contract suite over every registered harmonizer, and behaviour on a multi-site phantom.

The phantom follows BlindHarmony's simulated experiment: one anatomy per subject, rendered
at each "site" through a different monotone intensity transfer (identity, exp-like,
log-like, gamma 0.7), plus noise, then the pipeline's 1st-99th percentile min-max to [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter

from bids_harmony.errors import DataError, NotFittedError, UsageError
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer
from bids_harmony.volume import Volume
from bids_harmony.harmonizers.base import resolve_target_site
from bids_harmony.harmonizers.nyul import image_landmarks
from bids_harmony.metrics import psnr, wasserstein

SHAPE = (32, 32, 24)
TARGET = "siteA"
SITE_TRANSFERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "siteA": lambda g: g,
    "siteB": lambda g: np.expm1(3.0 * g) / np.expm1(3.0),
    "siteC": lambda g: np.log1p(9.0 * g) / np.log(10.0),
    "siteD": lambda g: g**0.7,
}
N_TRAIN = 4  # subjects 0..3 train every model; subject 4 is held out for evaluation
HELD_OUT = N_TRAIN
# Learned methods run their test-sized preset here; their own test files cover the rest.
TEST_PARAMS: dict[str, dict] = {
    "blindharmony": {"preset": "tiny"},
    "blindharmonydiff": {"preset": "tiny"},
}


def make(name: str) -> Harmonizer:
    """A harmonizer with the parameters this suite uses for it."""
    return HARMONIZERS[name](**TEST_PARAMS.get(name, {}))


def anatomy(subject: int, t2_like: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth tissue image in [0, 1], brain mask and white-matter mask of one subject.

    Nested ellipsoids: ventricle CSF, white matter (the largest tissue, as in adults),
    grey-matter ribbon, outer CSF, with smooth texture; subjects differ in sizes.
    """
    rng = np.random.default_rng(1000 + subject)
    radii = np.array([13.0, 13.5, 10.0]) * rng.uniform(0.9, 1.0, 3)
    grid = np.indices(SHAPE, dtype=np.float64)
    centre = (np.array(SHAPE) - 1) / 2.0 + rng.uniform(-1, 1, 3)
    r = np.sqrt(sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)))
    mask = r <= 1.0
    ventricle, wm_edge, gm_edge = 0.2 + 0.05 * rng.random(), 0.78 + 0.04 * rng.random(), 0.93
    csf, gm, wm = (0.9, 0.35, 0.15) if t2_like else (0.12, 0.5, 0.82)
    tissue = np.select([r < ventricle, r < wm_edge, r < gm_edge], [csf, wm, gm], default=csf)
    texture = gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    tissue = tissue + 0.04 * texture / texture.std()
    white_matter = (r >= ventricle) & (r < wm_edge)
    return np.clip(tissue, 0.0, 1.0) * mask, mask, white_matter


def render(subject: int, site: str, t2_like: bool = False, seed: int = 0) -> Volume:
    """One subject scanned at one site, after the pipeline's percentile min-max."""
    tissue, mask, _ = anatomy(subject, t2_like)
    rng = np.random.default_rng([subject, list(SITE_TRANSFERS).index(site), t2_like, seed])
    signal = SITE_TRANSFERS[site](tissue) + 0.02 * rng.standard_normal(SHAPE)
    low, high = np.percentile(signal[mask], [1, 99])
    data = np.clip((signal - low) / (high - low), 0.0, 1.0) * mask
    return Volume(data.astype(np.float32), mask)


@pytest.fixture(scope="module")
def training() -> tuple[list[Volume], list[str], list[str]]:
    """Subjects 0..3 at every site, T1w only."""
    images, sites = [], []
    for site in SITE_TRANSFERS:
        for subject in range(N_TRAIN):
            images.append(render(subject, site))
            sites.append(site)
    return images, sites, ["T1w"] * len(images)


@pytest.fixture(scope="module")
def fitted(training) -> dict[str, Harmonizer]:
    images, sites, sequences = training
    return {name: make(name).fit(images, sites, sequences, target=TARGET)
            for name in HARMONIZERS}


ALL_METHODS = sorted(HARMONIZERS)


# -- contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_METHODS)
def test_transform_and_save_before_fit_raise(name: str, tmp_path: Path) -> None:
    harmonizer = make(name)
    with pytest.raises(NotFittedError):
        harmonizer.transform(render(HELD_OUT, "siteB"), "T1w")
    with pytest.raises(NotFittedError):
        harmonizer.save(tmp_path / "model")


@pytest.mark.parametrize("name", ALL_METHODS)
def test_output_is_finite_float32_masked_same_shape(name: str, fitted) -> None:
    source = render(HELD_OUT, "siteB")
    out = fitted[name].transform(source, "T1w")
    assert out.shape == source.data.shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not out[~source.mask].any()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_fixed_input_reproduces_output(name: str, training, fitted) -> None:
    source = render(HELD_OUT, "siteC")
    refit = make(name).fit(*training, target=TARGET)
    first = fitted[name].transform(source, "T1w")
    np.testing.assert_array_equal(first, fitted[name].transform(source, "T1w"))
    np.testing.assert_array_equal(first, refit.transform(source, "T1w"))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_save_load_round_trip_is_exact(name: str, fitted, tmp_path: Path) -> None:
    harmonizer = fitted[name]
    directory = harmonizer.save(tmp_path / name)
    loaded = type(harmonizer).load(directory)
    source = render(HELD_OUT, "siteD")
    np.testing.assert_array_equal(
        harmonizer.transform(source, "T1w"), loaded.transform(source, "T1w")
    )
    assert loaded.params == harmonizer.params
    assert loaded.target_site_ == TARGET


@pytest.mark.parametrize("name", ALL_METHODS)
def test_model_card_fields(name: str, training, fitted, tmp_path: Path) -> None:
    harmonizer = fitted[name]
    card = json.loads((harmonizer.save(tmp_path / name) / "model_card.json").read_text())
    assert card["method"] == name
    assert card["description"]
    assert card["parameters"] == harmonizer.params
    assert card["target_site"] == TARGET
    assert card["training"]["sites"] == sorted(SITE_TRANSFERS)
    assert card["training"]["sequences"] == ["T1w"]
    assert card["training"]["n_images"] == len(training[0])
    assert len(card["training"]["checksum"]) == 64
    assert len(card["state_sha256"]) == 64
    state_file = tmp_path / name / card.get("state_file", "state.npz")
    if state_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(state_file, framework="numpy") as weights:
            saved = set(weights.keys())
    else:
        with np.load(state_file, allow_pickle=False) as npz:
            saved = set(npz.files)
    assert saved == {f"T1w/{key}" for key in harmonizer.state_["T1w"]}
    assert {f"T1w/{key}" for key in harmonizer._state_keys} <= saved


@pytest.mark.parametrize("name", ALL_METHODS)
def test_loading_with_wrong_method_raises(name: str, fitted, tmp_path: Path) -> None:
    directory = fitted[name].save(tmp_path / name)
    other = next(cls for other_name, cls in HARMONIZERS.items() if other_name != name)
    with pytest.raises(DataError, match=name):
        other.load(directory)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_two_sequences_keep_separate_states(name: str) -> None:
    images, sites, sequences = [], [], []
    for site in ("siteA", "siteB"):
        for subject in range(3):
            for sequence, t2_like in (("T1w", False), ("T2w", True)):
                images.append(render(subject, site, t2_like))
                sites.append(site)
                sequences.append(sequence)
    harmonizer = make(name).fit(images, sites, sequences, target="siteA")
    assert sorted(harmonizer.state_) == ["T1w", "T2w"]
    t2_source, t2_target = render(HELD_OUT, "siteB", True), render(HELD_OUT, "siteA", True)
    with_t2_state = harmonizer.transform(t2_source, "T2w")
    with_t1_state = harmonizer.transform(t2_source, "T1w")
    mask = t2_source.mask
    assert psnr(with_t2_state, t2_target.data, mask) > psnr(with_t1_state, t2_target.data, mask)
    with pytest.raises(DataError, match="FLAIR"):
        harmonizer.transform(t2_source, "FLAIR")


@pytest.mark.parametrize("name", [n for n in ALL_METHODS if HARMONIZERS[n].supports_unified])
def test_unified_target(name: str, training) -> None:
    harmonizer = make(name).fit(*training, target="unified")
    assert harmonizer.target_site_ == "unified"
    out = harmonizer.transform(render(HELD_OUT, "siteB"), "T1w")
    assert np.isfinite(out).all()


def test_auto_target_picks_most_homogeneous_site() -> None:
    images, sites = [], []
    rng = np.random.default_rng(7)
    for subject in range(4):
        images.append(render(subject, "siteA"))
        sites.append("b_calm")
        wild = render(subject, "siteA", seed=1)
        gamma = rng.uniform(0.4, 2.5)
        images.append(Volume((wild.data**gamma).astype(np.float32), wild.mask))
        sites.append("a_wild")
    assert resolve_target_site(images, sites, "auto") == "b_calm"
    harmonizer = HARMONIZERS["zscore"]().fit(images, sites, ["T1w"] * len(images))
    assert harmonizer.target_site_ == "b_calm"


# -- behaviour on the phantom --------------------------------------------------------------
# Sites B (exp-like) and C (log-like) are far from the target; gamma 0.7 (site D) is so
# close after min-max that no method here is required to improve on it.
FAR_SITES = ["siteB", "siteC"]
# Minimum PSNR gain (dB) against the same subject scanned at the target site, for the
# methods that remap the whole intensity distribution.
MIN_PSNR_GAIN = {"histmatch": 3.0, "nyul": 3.0, "zscore": 2.0}


@pytest.mark.parametrize("name", sorted(MIN_PSNR_GAIN))
@pytest.mark.parametrize("source_site", FAR_SITES)
def test_intensity_mapping_moves_source_toward_target(
    name: str, source_site: str, fitted
) -> None:
    source = render(HELD_OUT, source_site)
    target = render(HELD_OUT, TARGET, seed=1)
    out = fitted[name].transform(source, "T1w")
    mask = source.mask
    gain = psnr(out, target.data, mask) - psnr(source.data, target.data, mask)
    assert gain > MIN_PSNR_GAIN[name]
    assert wasserstein(out[mask], target.brain) < wasserstein(source.brain, target.brain)


@pytest.mark.parametrize("source_site", FAR_SITES)
def test_ssimh_moves_intensity_distribution_toward_target(source_site: str, fitted) -> None:
    # SSIMH only swaps the lowest frequencies: it fixes overall brightness, not the
    # nonlinear contrast, so the distribution moves but PSNR need not rise for every site.
    source = render(HELD_OUT, source_site)
    target = render(HELD_OUT, TARGET, seed=1)
    out = fitted["ssimh"].transform(source, "T1w")
    assert wasserstein(out[source.mask], target.brain) < 0.85 * wasserstein(
        source.brain, target.brain
    )


def test_ssimh_raises_psnr_for_the_darkest_site(fitted) -> None:
    source = render(HELD_OUT, "siteB")
    target = render(HELD_OUT, TARGET, seed=1)
    out = fitted["ssimh"].transform(source, "T1w")
    mask = source.mask
    assert psnr(out, target.data, mask) - psnr(source.data, target.data, mask) > 2.0


@pytest.mark.parametrize("source_site", FAR_SITES)
def test_whitestripe_puts_white_matter_on_target_level(source_site: str, fitted) -> None:
    # WhiteStripe is linear and anchored on white matter: it aligns white matter, while
    # grey matter and CSF keep the source's nonlinear distortion.
    source = render(HELD_OUT, source_site)
    target_wm = render(HELD_OUT, TARGET, seed=1).data[anatomy(HELD_OUT)[2]]
    source_wm = source.data[anatomy(HELD_OUT)[2]]
    out_wm = fitted["whitestripe"].transform(source, "T1w")[anatomy(HELD_OUT)[2]]
    before = abs(source_wm.mean() - target_wm.mean())
    assert abs(out_wm.mean() - target_wm.mean()) < 0.5 * before


def test_histmatch_output_follows_target_histogram(fitted) -> None:
    state = fitted["histmatch"].state_["T1w"]
    source = render(HELD_OUT, "siteB")
    out = fitted["histmatch"].transform(source, "T1w")[source.mask]
    np.testing.assert_allclose(np.quantile(out, [0.1, 0.5, 0.9]),
                               np.interp([0.1, 0.5, 0.9], state["levels"], state["quantiles"]),
                               atol=0.01)


def test_nyul_maps_landmarks_onto_standard_scale(fitted) -> None:
    state = fitted["nyul"].state_["T1w"]
    source = render(HELD_OUT, "siteC")
    out = fitted["nyul"].transform(source, "T1w")
    landmarks = image_landmarks(Volume(out, source.mask), state["percentiles"])
    np.testing.assert_allclose(landmarks[1:-1], state["standard_scale"][1:-1], atol=0.01)


def test_nyul_extrapolates_linearly_beyond_end_landmarks(fitted) -> None:
    source = render(HELD_OUT, "siteB")
    state = fitted["nyul"].state_["T1w"]
    out = fitted["nyul"].transform(source, "T1w").astype(np.float64)
    landmarks = image_landmarks(source, state["percentiles"])
    above = source.mask & (source.data > landmarks[-1])
    slope = np.diff(state["standard_scale"][-2:]) / np.diff(landmarks[-2:])
    expected = state["standard_scale"][-1] + (source.data[above] - landmarks[-1]) * slope
    np.testing.assert_allclose(out[above], expected, rtol=1e-5)


def test_zscore_output_has_target_mean_and_std(fitted) -> None:
    state = fitted["zscore"].state_["T1w"]
    source = render(HELD_OUT, "siteD")
    out = fitted["zscore"].transform(source, "T1w")[source.mask].astype(np.float64)
    assert out.mean() == pytest.approx(float(state["target_mean"]), abs=1e-5)
    assert out.std() == pytest.approx(float(state["target_std"]), abs=1e-5)


def test_ssimh_copies_low_frequencies_and_checks_grid(fitted) -> None:
    harmonizer = fitted["ssimh"]
    source = render(HELD_OUT, "siteB")
    out = harmonizer._transform_sequence(source, harmonizer.state_["T1w"])
    mean_image = harmonizer.state_["T1w"]["mean_image"].astype(np.float64)
    np.testing.assert_allclose(dctn(out, norm="ortho")[:3, :3, :3],
                               dctn(mean_image, norm="ortho")[:3, :3, :3], atol=1e-8)
    np.testing.assert_allclose(dctn(out, norm="ortho")[3:, 3:, 3:],
                               dctn(source.data.astype(np.float64), norm="ortho")[3:, 3:, 3:],
                               atol=1e-8)
    smaller = Volume(source.data[:-2], source.mask[:-2])
    with pytest.raises(DataError, match="grid"):
        harmonizer.transform(smaller, "T1w")


@pytest.mark.parametrize(
    ("name", "params"),
    [("histmatch", {"n_quantiles": 1}), ("ssimh", {"cutoff": 0}), ("ssimh", {"cutoff": 1.5}),
     ("nyul", {"percentiles": [50, 10]}), ("whitestripe", {"width": 0.0}),
     ("whitestripe", {"wm_peak": "brightest"})],
)
def test_invalid_parameters_raise_usage_error(name: str, params: dict) -> None:
    with pytest.raises(UsageError):
        HARMONIZERS[name](**params)
