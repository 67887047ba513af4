"""UMH on CPU with the ``tiny`` preset, on phantoms of two sequences at two sites: the
autoencoder and its latent scale, IN(Z0), sub-block decoding, the perceptual networks, every
stage training and resuming exactly, the stage cache, the output, I/O and settings errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import render

from bids_harmony.errors import NotFittedError, UsageError
from bids_harmony.harmonizers import umh
from bids_harmony.harmonizers.base import UNIFIED
from bids_harmony.harmonizers.umh import AUTOENCODER, STAGE1, STAGE2, UMH
from bids_harmony.nn.autoencoder import (
    build_autoencoder,
    decode,
    decode_block,
    downsampling,
    encode,
    instance_normalise,
)
from bids_harmony.nn.perceptual import (
    build_perceptual,
    describe_perceptual,
    medicalnet_state,
    perceptual_loss,
)

SITES = ("siteA", "siteB")
SHAPE = (24, 24, 16)


def _dataset(subjects: int = 3, sequences: tuple[str, ...] = ("T1w", "T2w")
             ) -> tuple[list, list[str], list[str]]:
    images, sites, labels = [], [], []
    for subject in range(subjects):
        for site in SITES:
            for sequence in sequences:
                images.append(render(subject, site, sequence == "T2w", shape=SHAPE))
                sites.append(site)
                labels.append(sequence)
    return images, sites, labels


@pytest.fixture(scope="module")
def fitted() -> UMH:
    images, sites, sequences = _dataset()
    return UMH(preset="tiny").fit(images, sites, sequences, target="siteA")


# -- the autoencoder ---------------------------------------------------------------------------
def test_autoencoder_shapes_on_a_non_cubic_box() -> None:
    network = build_autoencoder((8, 16, 16), 3, 1, seed=0).eval()
    assert downsampling((8, 16, 16)) == 4
    image = torch.rand(1, 1, 32, 24, 40)
    with torch.no_grad():
        latent = encode(network, image)
        rebuilt = decode(network, latent)
    assert latent.shape == (1, 3, 8, 6, 10)
    assert rebuilt.shape == image.shape
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in network.modules())


def test_sub_block_decoding_equals_the_full_decode_away_from_the_border() -> None:
    network = build_autoencoder((8, 16, 16), 3, 1, seed=1).eval()
    latent = torch.randn(1, 3, 16, 14, 12)
    with torch.no_grad():
        full = decode(network, latent)
        block, index = decode_block(network, latent, (4, 3, 2), (6, 6, 6), halo=4, factor=4)
    assert block.shape == (1, 1, 24, 24, 24)
    region = full[(slice(None), slice(None), *index)]
    border = 4
    inner = (slice(None), slice(None), *(slice(border, -border),) * 3)
    np.testing.assert_allclose(block[inner].numpy(), region[inner].numpy(), atol=1e-4)
    # Without the halo the block's edge differs: the test would see a non-local decoder.
    with torch.no_grad():
        bare, _ = decode_block(network, latent, (4, 3, 2), (6, 6, 6), halo=0, factor=4)
    assert float((bare - region).abs().max()) > 1e-3


def test_instance_normalised_condition_has_zero_mean_and_unit_std_per_channel() -> None:
    latent = torch.randn(2, 4, 6, 5, 7) * torch.tensor([1.0, 3.0, 0.2, 10.0]).view(1, 4, 1, 1, 1)
    latent = latent + torch.tensor([5.0, -2.0, 0.0, 1.0]).view(1, 4, 1, 1, 1)
    condition = instance_normalise(latent)
    np.testing.assert_allclose(condition.mean(dim=(2, 3, 4)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(condition.std(dim=(2, 3, 4), unbiased=False).numpy(), 1.0,
                               atol=1e-4)
    assert torch.isfinite(instance_normalise(torch.ones(1, 2, 3, 3, 3))).all()


def test_scale_factor_is_stored_and_reused(fitted: UMH, tmp_path: Path) -> None:
    scale = float(fitted.shared_state_[umh.SCALE_FACTOR][0])
    images, _, _ = _dataset()
    autoencoder = umh.load_autoencoder(fitted.settings, fitted.shared_state_, torch.device("cpu"))
    box = umh.BrainBox.from_state(fitted.shared_state_)
    divisor = umh._divisor(fitted.settings)
    latents = [torch.from_numpy(umh.encode_scaled(autoencoder, umh.prepare(
        box.crop(im), divisor).image, 1.0, torch.device("cpu"))) for im in images]
    assert scale == pytest.approx(1.0 / float(torch.cat([z.reshape(-1) for z in latents]).std()),
                                  rel=1e-5)
    loaded = UMH.load(fitted.save(tmp_path / "model"))
    assert float(loaded.shared_state_[umh.SCALE_FACTOR][0]) == scale
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["scale_factor"] == pytest.approx(scale)


# -- the perceptual networks -------------------------------------------------------------------
def test_deepbet_features_are_frozen_differentiable_and_offline() -> None:
    extractor = build_perceptual("deepbet", torch.device("cpu"))
    assert extractor is not None and not extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())
    reference = torch.rand(1, 1, 24, 24, 24)
    estimate = torch.rand(1, 1, 24, 24, 24, requires_grad=True)
    loss = perceptual_loss(extractor, reference, estimate)
    loss.backward()
    assert loss > 0 and estimate.grad is not None and estimate.grad.abs().sum() > 0
    assert float(perceptual_loss(extractor, reference, reference.clone())) == 0.0
    described = describe_perceptual("deepbet")
    assert described["backend"] == "deepbet" and len(described["sha256"]) == 64
    assert build_perceptual("none", torch.device("cpu")) is None


def test_medicalnet_loader_unwraps_a_wrapped_prefixed_checkpoint(tmp_path: Path) -> None:
    from monai.networks.nets import resnet50

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B",
                       bias_downsample=False, feed_forward=False)
    path = tmp_path / "resnet_50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "epoch": 1}, path)
    assert set(medicalnet_state(path)) == set(net.state_dict())
    extractor = build_perceptual(f"medicalnet:{path}", torch.device("cpu"))
    assert extractor is not None
    np.testing.assert_array_equal(extractor.net.conv1.weight.numpy(), net.conv1.weight.detach().numpy())
    features = extractor(torch.rand(1, 1, 16, 16, 16))
    assert [f.shape[1] for f in features] == [64, 256, 512]
    torch.save({"weights": 1}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="bad.pth"):
        medicalnet_state(tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="does not exist"):
        UMH(preset="tiny", perceptual=f"medicalnet:{tmp_path / 'missing.pth'}")


# -- the harmonizer ----------------------------------------------------------------------------
def test_one_model_serves_both_sequences(fitted: UMH) -> None:
    assert fitted.training_["sequences"] == ["T1w", "T2w"]
    for prefix in (AUTOENCODER, STAGE1, STAGE2):
        assert any(key.startswith(prefix) for key in fitted.shared_state_)
    assert [int(fitted.state_[s][umh.CLASS_LABEL][0]) for s in ("T1w", "T2w")] == [0, 1]
    # auto: deepbet's T1w features for T1w, no L_P for T2w.
    assert [umh._text(fitted.state_[s][umh.PERCEPTUAL]) for s in ("T1w", "T2w")] == [
        "deepbet", "none"]


def test_output_is_finite_masked_and_seeded(fitted: UMH) -> None:
    image = render(7, "siteB", shape=SHAPE)
    first, second = fitted.transform(image, "T1w"), fitted.transform(image, "T1w")
    assert first.shape == SHAPE and np.isfinite(first).all()
    assert np.all(first[~image.mask] == 0.0) and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    assert first[image.mask].std() > 0
    rebuilt = fitted.reconstruct(image)
    assert rebuilt.shape == SHAPE and np.all(rebuilt[~image.mask] == 0.0)


def test_save_load_is_exact_and_the_card_has_every_stage(fitted: UMH, tmp_path: Path) -> None:
    image = render(8, "siteB", True, shape=SHAPE)
    loaded = UMH.load(fitted.save(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.transform(image, "T2w"), fitted.transform(image, "T2w"))
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert set(card["loss_curve"]) == set(card["loss_curve_stage2"]) == {"T1w", "T2w"}
    assert set(card["loss_curve_autoencoder"]) == {"T1w", "T2w"}
    assert card["perceptual"]["T1w"]["backend"] == "deepbet"
    assert len(card["perceptual"]["T1w"]["sha256"]) == 64
    assert card["perceptual"]["T2w"] == {"backend": "none"}
    assert card["psi"]["psi"] == "random-gram"
    for name in ("loss_autoencoder_T1w.png", "loss_stage2_T2w.png", "loss_T1w.png"):
        assert (tmp_path / "model" / name).is_file()
    for diagnostics in card["diagnostics"].values():
        assert set(diagnostics["baselines"]) == {umh.SITE_WD_SOURCE, umh.TARGET_WD_SOURCE}
        assert umh.AE_PSNR in diagnostics["history"][-1]
        # 10 autoencoder steps learn little: the card says so.
        assert any("autoencoder reconstructs" in w for w in diagnostics["warnings"])
        assert diagnostics["learned"] is False


def test_unified_target_stops_after_stage_one_and_a_new_target_reuses_it(
        tmp_path: Path) -> None:
    images, sites, sequences = _dataset(2, ("T1w",))
    model = UMH(preset="tiny", checkpoint_dir=tmp_path)
    model.fit(images, sites, sequences, target=UNIFIED)
    assert not any(key.startswith(STAGE2) for key in model.shared_state_)
    out = model.transform(images[0], "T1w")
    assert np.isfinite(out).all() and out.max() > 0
    targeted = UMH(preset="tiny", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target="siteB")
    for key, value in model.shared_state_.items():
        if key.startswith((STAGE1, AUTOENCODER)):
            np.testing.assert_array_equal(targeted.shared_state_[key], value)
    assert not np.array_equal(targeted.transform(images[0], "T1w"), out)
    assert {p.name.split("-")[1] for p in (tmp_path / "stages").iterdir()} == {
        "autoencoder", "stage1", "unified", "stage2", "psi"}


def test_autoencoder_and_stage_one_losses_fall() -> None:
    images, sites, sequences = _dataset(2, ("T1w",))
    model = UMH(preset="tiny", ae_steps=60, stage1_steps=60).fit(
        images, sites, sequences, target=UNIFIED)
    for key in (umh.AE_LOSS_HISTORY, "loss_history"):
        losses = model.state_["T1w"][key]
        assert losses.size == 60 and np.isfinite(losses).all()
        assert losses[-15:].mean() < losses[:15].mean(), key


def test_the_autoencoder_options_train(tmp_path: Path) -> None:
    # HCLD's 3-layer patch critic needs 32^3 crops.
    images = [render(0, site, shape=(40, 40, 32)) for site in SITES]
    sites, sequences = list(SITES), ["T1w", "T1w"]
    model = UMH(preset="tiny", ae_steps=3, stage1_steps=2, ae_crop=32,
                ae_perceptual_weight=0.1, ae_adversarial_weight=0.01, checkpoint_every=2,
                checkpoint_dir=tmp_path)
    model.fit(images, sites, sequences, target=UNIFIED)
    losses = model.state_["T1w"][umh.AE_LOSS_HISTORY]
    assert losses.size == 3 and np.isfinite(losses).all()


@pytest.mark.parametrize("stage, counted", [("0", "autoencoder_loss"), ("1", "stage1_loss"),
                                            ("2", "style_updates")])
def test_interrupted_training_resumes_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, counted: str
) -> None:
    images, sites, sequences = _dataset(2, ("T1w",))
    settings = {"preset": "tiny", "ae_steps": 6, "stage1_steps": 6, "stage2_epochs": 2,
                "checkpoint_every": 2}
    expected = UMH(**settings).fit(images, sites, sequences, target="siteA")
    original = getattr(umh, counted)
    calls: list[int] = []
    # Stages 0 and 1: step 5, after the checkpoint of step 4; stage 2 (checkpointed every
    # draw): its 3rd draw.
    stop = 5 if stage != "2" else 3

    def interrupting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(umh, counted, interrupting)
    with pytest.raises(KeyboardInterrupt):
        UMH(**settings, checkpoint_dir=tmp_path).fit(images, sites, sequences, target="siteA")
    assert len(list(tmp_path.glob(f"umh{stage}-*.pt"))) == 1
    monkeypatch.undo()
    resumed = UMH(**settings, device="cpu", checkpoint_dir=tmp_path).fit(
        images, sites, sequences, target="siteA")
    assert not list(tmp_path.glob("*.pt"))
    for key, value in expected.shared_state_.items():
        np.testing.assert_array_equal(resumed.shared_state_[key], value, err_msg=key)
    for sequence, arrays in expected.state_.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(resumed.state_[sequence][key], value, err_msg=key)


def test_errors() -> None:
    with pytest.raises(NotFittedError):
        UMH(preset="tiny").transform(render(0, "siteA", shape=SHAPE), "T1w")
    with pytest.raises(NotFittedError):
        UMH(preset="tiny").reconstruct(render(0, "siteA", shape=SHAPE))
    with pytest.raises(UsageError, match="unknown umh preset"):
        UMH(preset="huge")
    with pytest.raises(UsageError, match="unknown umh parameter"):
        UMH(preset="tiny", gamma=0.9)
    with pytest.raises(UsageError, match="t_stop"):
        UMH(preset="tiny", reverse_steps=50)
    with pytest.raises(UsageError, match="ae_crop"):
        UMH(preset="tiny", ae_crop=5)
    with pytest.raises(UsageError, match="perceptual"):
        UMH(preset="tiny", perceptual="vgg")
    with pytest.raises(UsageError, match="psi_steps"):
        UMH(preset="tiny", psi="style-contrastive")
