"""SGCD on CPU with the ``tiny`` preset, on phantoms of two sequences at two sites: both stages
train and resume exactly, the stage cache, the output, I/O and the settings' errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phantoms import render

from bids_harmony.errors import NotFittedError, UsageError
from bids_harmony.harmonizers import sgcd
from bids_harmony.harmonizers.base import UNIFIED
from bids_harmony.harmonizers.sgcd import SGCD, STAGE1, STAGE2
from bids_harmony.volume import Volume

SITES = ("siteA", "siteB")
SHAPE = (24, 24, 16)


def _dataset(subjects: int = 3) -> tuple[list[Volume], list[str], list[str]]:
    images, sites, sequences = [], [], []
    for subject in range(subjects):
        for site in SITES:
            for sequence in ("T1w", "T2w"):
                images.append(render(subject, site, sequence == "T2w", shape=SHAPE))
                sites.append(site)
                sequences.append(sequence)
    return images, sites, sequences


@pytest.fixture(scope="module")
def fitted() -> SGCD:
    images, sites, sequences = _dataset()
    return SGCD(preset="tiny").fit(images, sites, sequences, target="siteA")


def test_one_network_serves_both_sequences(fitted: SGCD) -> None:
    assert fitted.training_["sequences"] == ["T1w", "T2w"]
    assert any(key.startswith(STAGE1) for key in fitted.shared_state_)
    assert any(key.startswith(STAGE2) for key in fitted.shared_state_)
    assert not any(key.startswith(STAGE1) for key in fitted.state_["T1w"])
    assert [int(fitted.state_[s][sgcd.CLASS_LABEL][0]) for s in ("T1w", "T2w")] == [0, 1]


def test_output_is_finite_masked_and_seeded(fitted: SGCD) -> None:
    image = render(7, "siteB", shape=SHAPE)
    first, second = fitted.transform(image, "T1w"), fitted.transform(image, "T1w")
    assert first.shape == SHAPE and np.isfinite(first).all()
    assert np.all(first[~image.mask] == 0.0) and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    # The anatomy survives: the output follows the source inside the brain.
    assert np.corrcoef(first[image.mask], image.data[image.mask])[0, 1] > 0.5


def test_save_load_is_exact_and_the_card_has_both_stages(fitted: SGCD, tmp_path: Path) -> None:
    image = render(8, "siteB", True, shape=SHAPE)
    loaded = SGCD.load(fitted.save(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.transform(image, "T2w"), fitted.transform(image, "T2w"))
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert set(card["loss_curve"]) == set(card["loss_curve_stage2"]) == {"T1w", "T2w"}
    assert card["psi"]["psi"] == "random-gram" and len(card["psi"]["sha256"]) == 64
    assert (tmp_path / "model" / "loss_stage2_T2w.png").is_file()
    for diagnostics in card["diagnostics"].values():
        assert set(diagnostics["baselines"]) == {sgcd.SITE_WD_SOURCE, sgcd.TARGET_WD_SOURCE}
        assert diagnostics["learned"] == (not diagnostics["warnings"])


def test_unified_target_stops_after_stage_one(tmp_path: Path) -> None:
    images, sites, sequences = _dataset(2)
    model = SGCD(preset="tiny", checkpoint_dir=tmp_path)
    model.fit(images, sites, sequences, target=UNIFIED)
    assert model.target_site_ == UNIFIED
    assert not any(key.startswith(STAGE2) for key in model.shared_state_)
    out = model.transform(images[0], "T1w")
    assert np.isfinite(out).all() and out.max() > 0
    # A new target reuses the cached stage 1 and trains stage 2 only.
    targeted = SGCD(preset="tiny", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target="siteB")
    for key, value in model.shared_state_.items():
        if key.startswith(STAGE1):
            np.testing.assert_array_equal(targeted.shared_state_[key], value)
    assert {p.name.split("-")[1] for p in (tmp_path / "stages").iterdir()} == {
        "stage1", "unified", "stage2", "psi"}


def test_stage_one_loss_falls() -> None:
    images, sites, sequences = _dataset(2)
    model = SGCD(preset="tiny", stage1_steps=80, t_max=100).fit(
        images, sites, sequences, target=UNIFIED)
    losses = model.state_["T1w"]["loss_history"]
    assert losses.size == 80 and np.isfinite(losses).all()
    assert losses[-20:].mean() < losses[:20].mean()


def test_stage_two_loss_falls() -> None:
    # One source and one target image: every update sees the same pair, so losses compare.
    images = [render(0, site, shape=SHAPE) for site in SITES]
    model = SGCD(preset="tiny", stage2_epochs=12, last_k=2, stage2_learning_rate=1e-3).fit(
        images, list(SITES), ["T1w", "T1w"], target="siteA")
    losses = model.state_["T1w"][sgcd.STAGE2_LOSS_HISTORY]
    assert losses.size == 12 and np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean()


@pytest.mark.parametrize("stage, counted", [("1", "stage1_loss"), ("2", "style_updates")])
def test_interrupted_training_resumes_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, counted: str
) -> None:
    images, sites, sequences = _dataset(2)
    settings = {"preset": "tiny", "stage1_steps": 6, "stage2_epochs": 2, "checkpoint_every": 2}
    expected = SGCD(**settings).fit(images, sites, sequences, target="siteA")
    original = getattr(sgcd, counted)
    calls: list[int] = []
    # Stage 1: step 5 after the checkpoint of step 4; stage 2 (one update per draw,
    # checkpointed every draw): its 3rd draw.
    stop = 5 if stage == "1" else 3

    def interrupting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sgcd, counted, interrupting)
    with pytest.raises(KeyboardInterrupt):
        SGCD(**settings, checkpoint_dir=tmp_path).fit(images, sites, sequences, target="siteA")
    assert len(list(tmp_path.glob(f"sgcd{stage}-*.pt"))) == 1
    resumed = SGCD(**settings, device="cpu", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target="siteA")
    assert not list(tmp_path.glob("*.pt"))
    for key, value in expected.shared_state_.items():
        np.testing.assert_array_equal(resumed.shared_state_[key], value, err_msg=key)
    for sequence, arrays in expected.state_.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(resumed.state_[sequence][key], value, err_msg=key)
    assert any(key.startswith(sgcd.EMA) for key in resumed.shared_state_)


def test_errors() -> None:
    with pytest.raises(NotFittedError):
        SGCD(preset="tiny").transform(render(0, "siteA", shape=SHAPE), "T1w")
    with pytest.raises(UsageError, match="unknown sgcd preset"):
        SGCD(preset="huge")
    with pytest.raises(UsageError, match="unknown sgcd parameter"):
        SGCD(preset="tiny", gamma=0.9)
    with pytest.raises(UsageError, match="t_stop"):
        SGCD(preset="tiny", reverse_steps=50)
    with pytest.raises(UsageError):
        SGCD(preset="tiny", psi="clip:/nonexistent/weights")
    with pytest.raises(UsageError, match="psi_steps"):
        SGCD(preset="tiny", psi="style-contrastive")  # tiny trains Psi for 0 steps
