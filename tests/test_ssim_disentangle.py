"""The SSIM-guided disentanglement on CPU with the ``tiny`` preset, on phantoms of three
sites: network shapes, the torch SSIM terms against the evaluation's, every loss term, the
labels and the agnostic style, exact resume of both optimisers, I/O and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import render

from bids_harmony.errors import DataError, NotFittedError, UsageError
from bids_harmony.harmonizers import ssim_disentangle as sd
from bids_harmony.harmonizers.base import UNIFIED
from bids_harmony.harmonizers.ssim_disentangle import SSIMDisentangle
from bids_harmony.metrics.similarity import ssim_components
from bids_harmony.nn.disentangle import Disentangler
from bids_harmony.nn.ssim import ssim_terms
from bids_harmony.volume import Volume

SITES = ("siteA", "siteB", "siteC")
SHAPE = (24, 24, 16)


def _dataset(subjects: int = 2, shape: tuple[int, int, int] = SHAPE
             ) -> tuple[list[Volume], list[str], list[str]]:
    images, sites = [], []
    for subject in range(subjects):
        for site in SITES:
            images.append(render(subject, site, shape=shape))
            sites.append(site)
    return images, sites, ["T1w"] * len(images)


@pytest.fixture(scope="module")
def fitted() -> SSIMDisentangle:
    images, sites, sequences = _dataset()
    return SSIMDisentangle(preset="tiny").fit(images, sites, sequences, target="siteA")


def test_networks_keep_a_non_cubic_box() -> None:
    model = Disentangler(width=4, noise_size=3, sites=3, blocks=1)
    image = torch.rand(2, 1, 20, 24, 14)
    mask = image > 0.2
    code = model.structure(image)
    noise, logits = model.style(image, mask)
    assert code.shape == (2, 8, 10, 12, 7)
    assert noise.shape == (2, 3) and logits.shape == (2, 3)
    assert model.generator(code, noise, torch.tanh(logits)).shape == image.shape
    real, sites = model.image_critic(image, mask)
    assert real.shape[:2] == (2, 1) and sites.shape == (2, 3)
    assert model.structure_critic(code).shape == (2, 3)


def test_crop_trained_networks_apply_to_the_whole_box() -> None:
    shape = (32, 28, 22)
    images, sites, sequences = _dataset(shape=shape)
    model = SSIMDisentangle(preset="tiny", crop=12, steps=4).fit(images, sites, sequences,
                                                                 target="siteB")
    box = sd.BrainBox.from_state(model.state_["T1w"])
    assert any(stop - start > 12 for start, stop in zip(box.start, box.stop))
    out = model.transform(render(5, "siteC", shape=shape), "T1w")
    assert out.shape == shape and np.isfinite(out).all()


def test_an_odd_box_side_is_padded_and_cut_back() -> None:
    model = sd.build_model(sd.PRESETS["tiny"], 2).eval()
    image = np.random.default_rng(0).random((15, 12, 13)).astype(np.float32)
    out = sd.translate(model, image, image > 0.3, np.array([1.0, -1.0], dtype=np.float32),
                       torch.device("cpu"))
    assert out.shape == image.shape and 0.0 <= out.min() and out.max() <= 1.0


def test_torch_ssim_terms_equal_the_evaluation_measure() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((18, 22, 14))
    x[:4] = 0.0  # a flat background slab: the square roots' floor must not show
    y = np.clip(0.7 * x + 0.2 * rng.random(x.shape), 0.0, 1.0)
    mask = np.zeros(x.shape, dtype=bool)
    mask[2:16, 3:19, 1:13] = True
    expected = ssim_components(x, y, mask)
    tensor_x = torch.tensor(x, requires_grad=True)
    got = ssim_terms(tensor_x[None, None], torch.tensor(y)[None, None],
                     torch.tensor(mask)[None, None])
    for name, value in expected.items():
        assert abs(float(got[name].detach()) - value) < 1e-4, name
    unmasked = ssim_components(x, y)
    unmasked_got = ssim_terms(tensor_x[None, None], torch.tensor(y)[None, None])["ssim"]
    assert abs(float(unmasked_got.detach()) - unmasked["ssim"]) < 1e-4
    sum(got[name] for name in ("luminance", "contrast", "structure")).backward()
    assert tensor_x.grad is not None and torch.isfinite(tensor_x.grad).all()
    assert tensor_x.grad.abs().sum() > 0


def _batch(settings: sd.DisentangleSettings) -> sd.Batch:
    images, sites, _ = _dataset()
    box = sd.BrainBox.around([im.mask for im in images], [2, 2, 2])
    data = [sd.Prepared.of(box.crop(im)) for im in images]
    sampler = sd.PairSampler(data, sites, sorted(set(sites)), settings)
    return sampler.draw(torch.Generator().manual_seed(0), torch.device("cpu"))


def test_every_loss_term_is_finite_and_differentiable() -> None:
    settings = sd.PRESETS["tiny"]
    model = sd.build_model(settings, len(SITES))
    batch = _batch(settings)
    assert bool((batch.source_label != batch.other_label).any(dim=1).all())  # another site
    forward = sd.forward_pass(model, batch, torch.Generator().manual_seed(1))
    generator_side, critic_side = model.generator_side(), model.discriminator_side()
    terms = {**sd.generator_terms(model, batch, forward, settings),
             **sd.critic_terms(model, batch, forward)}
    assert set(terms) | {"d_total"} == set(sd.TERMS)
    for name, value in terms.items():
        assert torch.isfinite(value), name
        parameters = critic_side if name.startswith("d_") else generator_side
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        used = [g for g in grads if g is not None]
        assert used and all(torch.isfinite(g).all() for g in used), name
        assert any(g.abs().sum() > 0 for g in used), name


def test_labels_and_the_agnostic_style_are_reproducible(fitted: SSIMDisentangle) -> None:
    labels = ["siteA", "siteB", "siteC"]
    np.testing.assert_array_equal(sd.target_label(labels, "siteB"), [-1.0, 1.0, -1.0])
    np.testing.assert_array_equal(sd.target_label(labels, UNIFIED), [-1.0, -1.0, -1.0])
    with pytest.raises(DataError, match="siteZ"):
        sd.target_label(labels, "siteZ")
    settings = sd.PRESETS["tiny"]
    np.testing.assert_array_equal(sd.agnostic_noise(settings), sd.agnostic_noise(settings))
    other = sd.resolve_settings("ssim_disentangle", sd.PRESETS, "tiny", {"seed": 1})
    assert not np.array_equal(sd.agnostic_noise(settings), sd.agnostic_noise(other))
    assert sd._decode(fitted.state_["T1w"][sd.SITE_LABELS]) == labels
    np.testing.assert_array_equal(fitted.state_["T1w"][sd.AGNOSTIC_NOISE],
                                  sd.agnostic_noise(settings))


def test_output_is_finite_masked_and_depends_on_the_target(fitted: SSIMDisentangle) -> None:
    image = render(7, "siteB", shape=SHAPE)
    first = fitted.transform(image, "T1w")
    assert first.shape == SHAPE and np.isfinite(first).all()
    assert np.all(first[~image.mask] == 0.0) and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, fitted.transform(image, "T1w"))
    fitted.target_site_ = "siteC"  # the label is read at transform; the weights are shared
    try:
        to_c = fitted.transform(image, "T1w")
    finally:
        fitted.target_site_ = "siteA"
    assert not np.array_equal(first, to_c)


def test_unified_fit_shares_the_trained_weights_and_is_seeded(tmp_path: Path) -> None:
    images, sites, sequences = _dataset()
    named = SSIMDisentangle(preset="tiny", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target="siteA")
    unified = SSIMDisentangle(preset="tiny", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target=UNIFIED)
    for key, value in named.state_["T1w"].items():
        if key.startswith(sd.NETWORK):
            np.testing.assert_array_equal(value, unified.state_["T1w"][key])
    image = render(6, "siteC", shape=SHAPE)
    out = unified.transform(image, "T1w")
    np.testing.assert_array_equal(out, unified.transform(image, "T1w"))
    assert not np.array_equal(out, named.transform(image, "T1w"))
    diagnostics = unified.diagnostics()["T1w"]
    assert sd.SITE_WD_AGNOSTIC in diagnostics["history"][-1]
    assert sd.TARGET_WD_HARMONIZED not in diagnostics["history"][-1]


def test_interrupted_training_resumes_to_identical_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, sites, sequences = _dataset()
    reference = SSIMDisentangle(preset="tiny", steps=16, checkpoint_every=5).fit(
        images, sites, sequences, target="siteA")
    original, calls = sd.training_step, {"count": 0}

    def interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 13:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sd, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SSIMDisentangle(preset="tiny", steps=16, checkpoint_every=5,
                        checkpoint_dir=tmp_path).fit(images, sites, sequences, target="siteA")
    checkpoints = list(tmp_path.glob("*.pt"))
    assert len(checkpoints) == 1
    saved = torch.load(checkpoints[0], weights_only=True)
    assert saved["step"] == 10 and set(saved["optimisers"]) == {"generator", "critics"}
    assert all(len(values) == 10 for values in saved["terms"].values())
    monkeypatch.setattr(sd, "training_step", original)
    resumed = SSIMDisentangle(preset="tiny", steps=16, checkpoint_every=5,
                              checkpoint_dir=tmp_path).fit(images, sites, sequences,
                                                           target="siteA")
    for key, value in reference.state_["T1w"].items():
        if key.startswith((sd.NETWORK, sd.TERM_PREFIX)) or key == sd.LOSS_HISTORY:
            np.testing.assert_array_equal(value, resumed.state_["T1w"][key], err_msg=key)
    assert not list(tmp_path.glob("*.pt"))
    assert sorted(p.name for p in (tmp_path / sd.SAMPLES_DIR).glob("*.png"))


def test_save_load_is_exact_and_the_card_has_every_term(fitted: SSIMDisentangle,
                                                       tmp_path: Path) -> None:
    image = render(8, "siteC", shape=SHAPE)
    loaded = SSIMDisentangle.load(fitted.save(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.transform(image, "T1w"), fitted.transform(image, "T1w"))
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert set(card["loss_terms"]["T1w"]) == set(sd.TERMS)
    assert card["site_labels"] == {"T1w": list(SITES)}
    assert [record["step"] for record in card["training_progress"]["T1w"]] == [10, 20]
    assert (tmp_path / "model" / "loss_terms_T1w.png").is_file()
    diagnostics = card["diagnostics"]["T1w"]
    assert set(diagnostics["baselines"]) == {sd.SITE_WD_SOURCE, sd.TARGET_WD_SOURCE}
    assert diagnostics["learned"] == (not diagnostics["warnings"])
    assert not any(key.startswith(sd.NETWORK + "image_critic") for key in fitted.state_["T1w"])


def test_transform_before_fit_and_bad_inputs_raise() -> None:
    with pytest.raises(NotFittedError):
        SSIMDisentangle(preset="tiny").transform(render(0, "siteA", shape=SHAPE), "T1w")
    images = [render(s, "siteA", shape=SHAPE) for s in range(2)]
    with pytest.raises(DataError, match="every T1w image is from site 'siteA'"):
        SSIMDisentangle(preset="tiny").fit(images, ["siteA"] * 2, ["T1w"] * 2, target="siteA")
    with pytest.raises(UsageError, match="crop"):
        SSIMDisentangle(preset="tiny", crop=13)
    with pytest.raises(UsageError, match="ssim_mix"):
        SSIMDisentangle(preset="tiny", ssim_mix=1.5)
    with pytest.raises(UsageError, match="unknown ssim_disentangle parameter"):
        SSIMDisentangle(preset="tiny", depth=3)


def test_unlabelled_images_train_through_the_predicted_label() -> None:
    images, sites, sequences = _dataset()
    model = SSIMDisentangle(preset="tiny", steps=3, unlabelled_fraction=0.5).fit(
        images, sites, sequences, target="siteA")
    assert np.isfinite(model.state_["T1w"][sd.LOSS_HISTORY]).all()
