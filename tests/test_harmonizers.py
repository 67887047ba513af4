"""The contract every registered harmonizer follows: fit / transform / save / load.

Each method is fitted once, on first request, on a small two-sequence phantom (see
``phantoms``) and, for learned methods, at the smallest settings that still run every part of
training and inference: these tests check the contract, not the quality. How well a method
harmonizes is checked in its own file (``test_classical.py``, ``test_blindharmony*.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from phantoms import render

from bids_harmony.errors import DataError, NotFittedError, UsageError
from bids_harmony.harmonizers import HARMONIZERS, Harmonizer
from bids_harmony.harmonizers.base import (
    REFERENCE_QUANTILES,
    FittedState,
    TrainingSet,
    resolve_target_site,
)
from bids_harmony.volume import Volume

SHAPE = (16, 16, 12)
TARGET = "siteA"
SITES = ("siteA", "siteB")
SEQUENCES = {"T1w": False, "T2w": True}  # sequence -> rendered with T2-like contrast
N_TRAIN = 3  # subjects 0..2 train every model; subject 3 is held out
HELD_OUT = N_TRAIN
ALL_METHODS = sorted(HARMONIZERS)
# The smallest learned models that still train a few steps and run every inference stage;
# a learned method without an entry runs at its ``tiny`` preset.
TEST_PARAMS: dict[str, dict] = {
    "blindharmony": {
        "preset": "tiny", "levels": 1, "steps_per_level": 1, "hidden_channels": 4,
        "residual_blocks": 1, "batch_size": 4, "steps": 2, "iterations": 1,
    },
    "blindharmonydiff": {
        "preset": "tiny", "base_channels": 4, "multipliers": (1, 2), "patch_size": 8,
        "batch_size": 1, "steps": 2, "sampling_steps": 1, "refinement_steps": 1,
    },
    # The 12-voxel side of this grid is no multiple of tiny's 4x4x4 blocks times 2 levels.
    "sgcd": {"preset": "tiny", "space_to_channel": 1, "stage1_steps": 4},
    # Tiny's 10 autoencoder steps render this small grid's brains below 0 (all clipped):
    # enough steps that the two sequences' outputs can differ.
    "umh": {"preset": "tiny", "ae_steps": 60},
}
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)


def make(name: str) -> Harmonizer:
    """A harmonizer with the parameters this suite uses for it."""
    harmonizer_class = HARMONIZERS[name]
    default = {"preset": "tiny"} if harmonizer_class.presets else {}
    return harmonizer_class(**TEST_PARAMS.get(name, default))


def scan(subject: int, site: str, sequence: str) -> Volume:
    return render(subject, site, SEQUENCES[sequence], shape=SHAPE)


@pytest.fixture(scope="module")
def training() -> tuple[list[Volume], list[str], list[str]]:
    """Subjects 0..2 at both sites, T1w and T2w."""
    images, sites, sequences = [], [], []
    for site in SITES:
        for subject in range(N_TRAIN):
            for sequence in SEQUENCES:
                images.append(scan(subject, site, sequence))
                sites.append(site)
                sequences.append(sequence)
    return images, sites, sequences


@pytest.fixture(scope="module")
def fitted(training) -> Callable[[str], Harmonizer]:
    """``fitted(name)``: the method fitted on ``training`` toward ``TARGET``, once per module."""
    models: dict[str, Harmonizer] = {}

    def fit_once(name: str) -> Harmonizer:
        if name not in models:
            models[name] = make(name).fit(*training, target=TARGET)
        return models[name]

    return fit_once


def target_quantiles(training, sequence: str, sites: Sequence[str]) -> np.ndarray:
    """What ``fit`` must keep as a sequence's reference quantiles."""
    images, image_sites, sequences = training
    brains = [im.brain for im, site, s in zip(images, image_sites, sequences)
              if s == sequence and site in sites]
    return np.quantile(np.concatenate(brains), QUANTILE_LEVELS).astype(np.float32)


def saved_keys(directory: Path) -> set[str]:
    """The array names in a saved model's state file (npz or safetensors)."""
    card = json.loads((directory / "model_card.json").read_text())
    state_file = directory / card["state_file"]
    if state_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(state_file, framework="numpy") as weights:
            return set(weights.keys())
    with np.load(state_file, allow_pickle=False) as npz:
        return set(npz.files)


def assert_same_arrays(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> None:
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        assert second[key].dtype == value.dtype, key
        np.testing.assert_array_equal(second[key], value, err_msg=key)


def assert_same_state(first: Harmonizer, second: Harmonizer) -> None:
    """Bit for bit: every sequence's arrays and the shared ones, with their dtypes."""
    assert sorted(first.state_) == sorted(second.state_)
    for sequence, arrays in first.state_.items():
        assert_same_arrays(arrays, second.state_[sequence])
    assert_same_arrays(first.shared_state_, second.shared_state_)


# -- every registered method ---------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_METHODS)
def test_transform_and_save_before_fit_raise(name: str, tmp_path: Path) -> None:
    harmonizer = make(name)
    with pytest.raises(NotFittedError, match=name):
        harmonizer.transform(scan(HELD_OUT, "siteB", "T1w"), "T1w")
    with pytest.raises(NotFittedError, match=name):
        harmonizer.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("sequence", sorted(SEQUENCES))
def test_output_is_finite_float32_masked_same_shape(name: str, sequence: str, fitted) -> None:
    source = scan(HELD_OUT, "siteB", sequence)
    out = fitted(name).transform(source, sequence)
    assert out.shape == source.data.shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not out[~source.mask].any()
    assert not np.array_equal(out, source.data), "the source came back unchanged"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_fit_and_transform_are_reproducible(name: str, training, fitted) -> None:
    source = scan(HELD_OUT, "siteB", "T1w")
    first = fitted(name).transform(source, "T1w")
    np.testing.assert_array_equal(first, fitted(name).transform(source, "T1w"))
    refit = make(name).fit(*training, target=TARGET)
    assert_same_state(fitted(name), refit)
    np.testing.assert_array_equal(first, refit.transform(source, "T1w"))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_save_load_round_trip_is_exact(name: str, fitted, tmp_path: Path) -> None:
    harmonizer = fitted(name)
    loaded = type(harmonizer).load(harmonizer.save(tmp_path / name))
    assert_same_state(harmonizer, loaded)
    assert loaded.params == harmonizer.params
    assert loaded.target_site_ == TARGET
    assert loaded.training_ == harmonizer.training_
    for sequence in SEQUENCES:
        source = scan(HELD_OUT, "siteB", sequence)
        np.testing.assert_array_equal(
            harmonizer.transform(source, sequence), loaded.transform(source, sequence)
        )


@pytest.mark.parametrize("name", ALL_METHODS)
def test_model_card_and_state_file(name: str, training, fitted, tmp_path: Path) -> None:
    harmonizer = fitted(name)
    directory = harmonizer.save(tmp_path / name)
    card = json.loads((directory / "model_card.json").read_text())
    assert card["method"] == name
    assert card["description"] == (type(harmonizer).__doc__ or "").strip().splitlines()[0]
    assert card["parameters"] == json.loads(json.dumps(harmonizer.params))
    assert card["target_site"] == TARGET
    assert card["training"]["sites"] == list(SITES)
    assert card["training"]["sequences"] == sorted(SEQUENCES)
    assert card["training"]["n_images"] == len(training[0])
    assert card["training"]["reference_images"] == {sequence: N_TRAIN for sequence in SEQUENCES}
    assert len(card["training"]["checksum"]) == 64
    assert len(card["state_sha256"]) == 64
    # Every fitted array is saved under its sequence, and nothing else is.
    expected = {f"{sequence}/{key}" for sequence, arrays in harmonizer.state_.items()
                for key in arrays}
    expected |= {f"_shared/{key}" for key in harmonizer.shared_state_}
    assert saved_keys(directory) == expected
    assert {f"{sequence}/{REFERENCE_QUANTILES}" for sequence in SEQUENCES} < expected
    assert any(not key.endswith(REFERENCE_QUANTILES) for key in expected)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_loading_with_wrong_method_raises(name: str, fitted, tmp_path: Path) -> None:
    directory = fitted(name).save(tmp_path / name)
    other = HARMONIZERS["histmatch" if name == "zscore" else "zscore"]
    with pytest.raises(UsageError, match=f"holds a '{name}' model"):
        other.load(directory)


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_state_file_is_refused_on_load(damage: str, fitted, tmp_path: Path) -> None:
    harmonizer = fitted("zscore")
    directory = harmonizer.save(tmp_path / "zscore")
    state = directory / harmonizer.state_file
    content = state.read_bytes()
    state.write_bytes(content[: len(content) // 2] if damage == "truncated"
                      else content[:-1] + bytes([content[-1] ^ 1]))
    with pytest.raises(DataError, match="does not match the SHA-256"):
        type(harmonizer).load(directory)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_sequence_keeps_its_own_state(name: str, training, fitted) -> None:
    harmonizer = fitted(name)
    assert sorted(harmonizer.state_) == sorted(SEQUENCES)
    for sequence in SEQUENCES:
        np.testing.assert_array_equal(
            harmonizer.reference_quantiles(sequence), target_quantiles(training, sequence, [TARGET])
        )
    t2_source = scan(HELD_OUT, "siteB", "T2w")
    assert not np.array_equal(harmonizer.transform(t2_source, "T2w"),
                              harmonizer.transform(t2_source, "T1w"))
    with pytest.raises(DataError, match="FLAIR"):
        harmonizer.transform(t2_source, "FLAIR")


@pytest.mark.parametrize("name", ALL_METHODS)
def test_unified_target_learns_from_every_site(name: str, training) -> None:
    harmonizer = make(name).fit(*training, target="unified")
    assert harmonizer.target_site_ == "unified"
    assert harmonizer.training_["reference_images"] == {
        sequence: N_TRAIN * len(SITES) for sequence in SEQUENCES
    }
    np.testing.assert_array_equal(harmonizer.reference_quantiles("T1w"),
                                  target_quantiles(training, "T1w", SITES))
    out = harmonizer.transform(scan(HELD_OUT, "siteB", "T1w"), "T1w")
    assert np.isfinite(out).all()


# -- the base class ------------------------------------------------------------------------
def test_auto_target_picks_most_homogeneous_site() -> None:
    images, sites = [], []
    rng = np.random.default_rng(7)
    for subject in range(4):
        images.append(render(subject, "siteA", shape=SHAPE))
        sites.append("b_calm")
        wild = render(subject, "siteA", seed=1, shape=SHAPE)
        gamma = rng.uniform(0.4, 2.5)
        images.append(Volume((wild.data**gamma).astype(np.float32), wild.mask))
        sites.append("a_wild")
    assert resolve_target_site(images, sites, "auto") == "b_calm"
    harmonizer = HARMONIZERS["zscore"]().fit(images, sites, ["T1w"] * len(images))
    assert harmonizer.target_site_ == "b_calm"


def test_fit_rejects_unmatched_labels_and_a_target_without_images(training) -> None:
    images, sites, sequences = training
    with pytest.raises(DataError, match="one site and one sequence per image"):
        HARMONIZERS["zscore"]().fit(images, sites[:-1], sequences)
    with pytest.raises(DataError, match="is not a site"):
        HARMONIZERS["zscore"]().fit(images, sites, sequences, target="siteZ")
    only_t1_at_target = [s if site != TARGET else "T1w" for s, site in zip(sequences, sites)]
    with pytest.raises(DataError, match="no T2w image"):
        HARMONIZERS["zscore"]().fit(images, sites, only_t1_at_target, target=TARGET)


def test_per_sequence_state_file_keeps_its_layout(fitted, tmp_path: Path) -> None:
    # Models saved before the joint-fit hook hold exactly these names, so they still load.
    directory = fitted("zscore").save(tmp_path / "zscore")
    assert saved_keys(directory) == {
        f"{sequence}/{key}" for sequence in SEQUENCES
        for key in ("target_mean", "target_std", REFERENCE_QUANTILES)
    }
    assert HARMONIZERS["zscore"].load(directory).shared_state_ == {}


class SharedSpread(Harmonizer):
    """Test-only joint fit: one brain spread for every sequence, one brain mean per sequence."""

    name = "shared_spread"

    def _fit_sequences(self, training: TrainingSet) -> FittedState:
        references = training.references
        every_brain = np.concatenate([im.brain for ims in references.values() for im in ims])
        return FittedState(
            sequences={sequence: {"mean": np.asarray(np.mean([im.brain.mean() for im in ims]))}
                       for sequence, ims in references.items()},
            shared={"spread": np.asarray([every_brain.std()])},
        )

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        z = (image.data - image.brain.mean()) / image.brain.std()
        return state["mean"] + state["spread"][0] * z


def test_joint_fit_shares_arrays_and_saves_them_once(training, tmp_path: Path) -> None:
    harmonizer = SharedSpread().fit(*training, target=TARGET)
    images, sites, sequences = training
    target_brains = [im.brain for im, site in zip(images, sites) if site == TARGET]
    assert harmonizer.shared_state_["spread"][0] == np.concatenate(target_brains).std()
    assert all("spread" not in arrays for arrays in harmonizer.state_.values())
    for sequence in SEQUENCES:
        source = scan(HELD_OUT, "siteB", sequence)
        brain = harmonizer.transform(source, sequence)[source.mask].astype(np.float64)
        assert brain.mean() == pytest.approx(float(harmonizer.state_[sequence]["mean"]), abs=1e-5)
        assert brain.std() == pytest.approx(float(harmonizer.shared_state_["spread"][0]), rel=1e-5)

    directory = harmonizer.save(tmp_path / "joint")
    assert saved_keys(directory) == {
        "_shared/spread", "T1w/mean", f"T1w/{REFERENCE_QUANTILES}",
        "T2w/mean", f"T2w/{REFERENCE_QUANTILES}",
    }
    loaded = SharedSpread.load(directory)
    assert_same_state(harmonizer, loaded)
    for sequence in SEQUENCES:
        source = scan(HELD_OUT, "siteB", sequence)
        np.testing.assert_array_equal(
            harmonizer.transform(source, sequence), loaded.transform(source, sequence)
        )


def test_joint_fit_rejects_a_name_both_shared_and_per_sequence(training) -> None:
    class Clashing(SharedSpread):
        def _fit_sequences(self, training: TrainingSet) -> FittedState:
            fitted = super()._fit_sequences(training)
            return FittedState(fitted.sequences, {"mean": np.zeros(1)})

    with pytest.raises(ValueError, match="'mean'"):
        Clashing().fit(*training, target=TARGET)


def test_joint_fit_sees_every_site_and_the_target_references(training) -> None:
    """Multi-site methods (SGCD, UMH) learn from every site: the hook gets all images with
    their sites per sequence, and the target references apart."""
    seen: list[TrainingSet] = []

    class Recording(SharedSpread):
        def _fit_sequences(self, training_set: TrainingSet) -> FittedState:
            seen.append(training_set)
            return super()._fit_sequences(training_set)

    images, sites, sequences = training
    Recording().fit(images, sites, sequences, target=TARGET)
    (training_set,) = seen
    assert training_set.target_site == TARGET
    for sequence in SEQUENCES:
        expected = [im for im, s in zip(images, sequences) if s == sequence]
        assert [id(im) for im in training_set.images[sequence]] == [id(im) for im in expected]
        assert training_set.sites[sequence] == [
            site for site, s in zip(sites, sequences) if s == sequence]
        assert [id(im) for im in training_set.references[sequence]] == [
            id(im) for im, site, s in zip(images, sites, sequences)
            if s == sequence and site == TARGET]
