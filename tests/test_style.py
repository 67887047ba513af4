"""Ψ, SGCD's style encoder: the style losses, the psi setting, the style transforms, the
backends (trained for real on small phantom brains), their freezing, and storage."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import anatomy
from safetensors.numpy import load_file, save_file

from bids_harmony.errors import UsageError
from bids_harmony.nn.style import (
    PSI_BACKENDS,
    StyleTransforms,
    TriPlanarEncoder,
    apply_style_transforms,
    build_style_encoder,
    describe_style_encoder,
    draw_style_transforms,
    encoder_arrays,
    load_style_encoder,
    parse_psi,
    random_gram_encoder,
    random_slice_positions,
    slice_positions,
    style_reconstruction_loss,
    style_translation_loss,
    style_vector,
    train_site_contrastive,
    train_style_contrastive,
)

SHAPE = (24, 24, 24)
CPU = torch.device("cpu")
#: Small training settings: 10 transforms a step, 2 slices per axis, 32 x 32 slices.
SMALL = {"pairs": 10, "view_slices": 2, "slice_size": 32}


def _brains(count: int, first: int = 0) -> list[np.ndarray]:
    """Phantom brains of different anatomies in [-1, 1], background -1."""
    volumes = []
    for subject in range(first, first + count):
        tissue, mask, _ = anatomy(subject, shape=SHAPE)
        volumes.append(np.where(mask, 2.0 * tissue - 1.0, -1.0).astype(np.float32))
    return volumes


def _batch(volumes: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(volumes)).unsqueeze(1)


def _transforms(*rows: dict[str, object]) -> StyleTransforms:
    """Explicit style transforms, one per row (unspecified parts: none)."""
    base = {"knots": [0.0, 0.25, 0.5, 0.75, 1.0], "blur_sigma": 0.0, "blur_axis": 0,
            "noise": 0.0, "bias_coefficients": [0.0] * 9, "bias_amplitude": 0.0}
    filled = [{**base, **row} for row in rows]
    return StyleTransforms(**{
        name: torch.tensor([row[name] for row in filled]) for name in base
    })


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tensors here are tiny: on shared cores, a second OpenMP thread busy-waits and made the
    training fixture 30x slower (59 s against 1.8 s, measured on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def style_contrastive() -> tuple[TriPlanarEncoder, list[float]]:
    return train_style_contrastive(_brains(10), steps=40, seed=0, device=CPU, **SMALL)


# --- losses --------------------------------------------------------------------------------


def test_style_losses_vanish_for_equal_styles() -> None:
    s = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert float(style_reconstruction_loss(s, s.clone())) == 0.0
    assert float(style_translation_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)


def test_cosine_term_is_two_for_opposite_styles() -> None:
    s = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    l1_part = style_reconstruction_loss(s, -s)
    assert float(style_translation_loss(s, -s) - l1_part) == pytest.approx(2.0, abs=1e-6)


def test_l1_is_averaged_over_features_and_batch() -> None:
    target = torch.zeros(2, 4)
    other = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    assert float(style_reconstruction_loss(target, other)) == pytest.approx(2.0)


def test_style_vector_is_the_difference_of_embeddings() -> None:
    encoder = random_gram_encoder(0, CPU)
    image, unified = _batch(_brains(2)).chunk(2)
    torch.testing.assert_close(style_vector(encoder, image, unified),
                               encoder(image) - encoder(unified))


# --- the psi setting -----------------------------------------------------------------------


def test_parse_psi_accepts_the_backends(tmp_path: Path) -> None:
    for name in PSI_BACKENDS[:3]:
        assert parse_psi(name) == (name, None)
    assert parse_psi(f"biomedclip:{tmp_path}") == ("biomedclip", tmp_path)
    assert parse_psi(f"clip:{tmp_path}") == ("clip", tmp_path)


@pytest.mark.parametrize(
    ("psi", "fix"),
    [("vgg", "use one of"), ("biomedclip", "psi=biomedclip:DIR"), ("clip:", "psi=clip:DIR"),
     ("clip:/nonexistent", "does not exist"), ("random-gram:/tmp", "takes no directory")],
)
def test_parse_psi_rejects_with_the_fix(psi: str, fix: str) -> None:
    with pytest.raises(UsageError, match=fix) as raised:
        parse_psi(psi)
    assert "\n" not in str(raised.value)


# --- slices and style transforms -----------------------------------------------------------


def test_slices_stay_inside_the_central_box() -> None:
    even = slice_positions((80, 96, 80), 12)
    drawn = random_slice_positions((80, 96, 80), 50, torch.Generator().manual_seed(0))
    for positions, side in zip(even + drawn, (80, 96, 80) * 2):
        assert int(positions.min()) >= round(0.1 * (side - 1))
        assert int(positions.max()) <= round(0.9 * (side - 1))
    assert np.ptp(np.diff(even[0].numpy())) <= 1  # evenly spaced, up to rounding


def test_identity_style_transform_keeps_the_volume() -> None:
    volumes = _batch(_brains(2))
    out = apply_style_transforms(volumes, _transforms({}, {}), torch.Generator())
    torch.testing.assert_close(out, volumes)


def test_style_transforms_are_global_monotone_and_keep_the_background() -> None:
    volumes = _batch(_brains(2))
    curve = _transforms({"knots": [0.0, 0.6, 0.8, 0.92, 1.0]}, {"knots": [0, 0.05, 0.1, 0.3, 1]})
    curved = apply_style_transforms(volumes, curve, torch.Generator())
    brain = volumes > -1
    for source, result, inside in zip(volumes, curved, brain):
        order = torch.argsort(source[inside])
        assert bool((torch.diff(result[inside][order]) >= 0).all())  # same map for all voxels
    drawn = draw_style_transforms(2, torch.Generator().manual_seed(0))
    styled = apply_style_transforms(volumes, drawn, torch.Generator().manual_seed(1))
    assert bool((styled[~brain] == -1).all())
    assert float(styled.min()) >= -1.0 and float(styled.max()) <= 1.0
    again = apply_style_transforms(volumes, drawn, torch.Generator().manual_seed(1))
    assert torch.equal(styled, again)


# --- backends ------------------------------------------------------------------------------


def test_random_gram_is_deterministic() -> None:
    volumes = _batch(_brains(2))
    first, second = random_gram_encoder(3, CPU), random_gram_encoder(3, CPU)
    assert torch.equal(first(volumes), second(volumes))
    assert not torch.equal(first(volumes), random_gram_encoder(4, CPU)(volumes))


def test_style_contrastive_learns_style_not_anatomy(
    style_contrastive: tuple[TriPlanarEncoder, list[float]],
) -> None:
    """Distances, not cosines: Ψ is used through differences, which cancel a common offset
    of the embeddings (and the training loss centres each batch for the same reason)."""
    trained, losses = style_contrastive
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    untrained = TriPlanarEncoder(
        type(trained.slice_encoder)(generator=torch.Generator().manual_seed(0)),
        trained.slices_per_axis, trained.slice_size,
    )
    # Held-out anatomies: two under one transform, one of them under a very different one.
    volumes = _batch(_brains(4, first=20))
    mild = {"knots": [0.0, 0.3, 0.55, 0.8, 1.0]}
    harsh = {"knots": [0.0, 0.6, 0.8, 0.92, 1.0], "blur_sigma": 1.5, "noise": 0.05}
    ratios = {}
    for name, encoder in (("trained", trained), ("untrained", untrained)):
        values = []
        for a, b in ((0, 1), (2, 3), (1, 2), (3, 0)):
            x = volumes[[a, b, a]]
            styled = apply_style_transforms(
                x, _transforms(mild, mild, harsh), torch.Generator().manual_seed(a)
            )
            with torch.no_grad():
                z = encoder(styled)
            values.append(float((z[0] - z[1]).norm() / (z[0] - z[2]).norm()))
        ratios[name] = values
    # Another anatomy under the same style is nearer than the same anatomy restyled, by far
    # more than before training.
    assert max(ratios["trained"]) < 1.0
    assert np.mean(ratios["trained"]) < 0.7 * np.mean(ratios["untrained"])


def test_site_contrastive_needs_two_sites_and_trains() -> None:
    volumes = _brains(6)
    with pytest.raises(UsageError, match="at least 2 sites"):
        train_site_contrastive(volumes, ["A"] * 6, steps=1, seed=0, device=CPU)
    restyled = [np.where(v > -1, 2.0 * ((v + 1) / 2) ** 0.5 - 1, -1.0).astype(np.float32)
                for v in volumes[3:]]
    encoder, losses = train_site_contrastive(
        volumes[:3] + restyled, ["A"] * 3 + ["B"] * 3, steps=6, seed=0, device=CPU,
        batch=6, view_slices=2, slice_size=32,
    )
    assert len(losses) == 6 and np.isfinite(losses).all()
    _assert_frozen_and_differentiable(encoder)


def test_every_encoder_is_frozen_and_differentiable(
    style_contrastive: tuple[TriPlanarEncoder, list[float]],
) -> None:
    _assert_frozen_and_differentiable(random_gram_encoder(0, CPU))
    _assert_frozen_and_differentiable(style_contrastive[0])


def _assert_frozen_and_differentiable(encoder: torch.nn.Module) -> None:
    assert not encoder.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    volume = _batch(_brains(1, first=30)).requires_grad_(True)
    encoder(volume).sum().backward()
    assert volume.grad is not None
    assert bool(torch.isfinite(volume.grad).all()) and float(volume.grad.abs().sum()) > 0


# --- description and storage ---------------------------------------------------------------


def test_build_and_describe(style_contrastive: tuple[TriPlanarEncoder, list[float]]) -> None:
    volumes = _brains(3)
    encoder, description = build_style_encoder(
        "style-contrastive", volumes, ["A"] * 3, steps=2, seed=0, device=CPU
    )
    assert description["psi"] == "style-contrastive"
    assert description["trained_steps"] == 2 and np.isfinite(description["final_loss"])
    assert not description["paper_setting"]
    assert "tissue-dependent gains" in description["limitation"]
    assert len(description["sha256"]) == 64
    _, gram = build_style_encoder("random-gram", volumes, ["A"] * 3, steps=2, seed=0, device=CPU)
    assert gram["trained_steps"] == 0 and gram["final_loss"] is None
    trained, losses = style_contrastive
    described = describe_style_encoder("style-contrastive", trained, losses)
    assert described["final_loss"] == losses[-1]
    assert described["sha256"] != description["sha256"]


@pytest.mark.parametrize("backend", ["random-gram", "style-contrastive"])
def test_encoder_round_trip_through_the_stage_cache(
    backend: str, style_contrastive: tuple[TriPlanarEncoder, list[float]], tmp_path: Path
) -> None:
    encoder = random_gram_encoder(0, CPU) if backend == "random-gram" else style_contrastive[0]
    path = tmp_path / "psi.safetensors"
    save_file({"other": np.zeros(1), **encoder_arrays(encoder)}, str(path))
    loaded = load_style_encoder(backend, load_file(str(path)), CPU)
    volumes = _batch(_brains(2, first=40))
    assert torch.equal(loaded(volumes), encoder(volumes))
    assert describe_style_encoder(backend, loaded, [])["sha256"] == describe_style_encoder(
        backend, encoder, []
    )["sha256"]


# --- open_clip backends --------------------------------------------------------------------


def test_clip_backends_without_open_clip_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now fails
    with pytest.raises(UsageError, match=r"pip install 'bids_harmony\[clip\]'") as raised:
        build_style_encoder(f"biomedclip:{tmp_path}", [], [], steps=0, seed=0, device=CPU)
    assert "\n" not in str(raised.value)
    with pytest.raises(UsageError, match="does not exist"):
        build_style_encoder("clip:/nonexistent", [], [], steps=0, seed=0, device=CPU)


def test_clip_backend_from_a_local_dir(tmp_path: Path) -> None:
    open_clip = pytest.importorskip(
        "open_clip", reason="open_clip is the optional extra bids_harmony[clip]"
    )
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "patch_size": 56, "width": 32, "head_width": 16,
                       "layers": 1},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                     "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}})
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**model_cfg)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    encoder, description = build_style_encoder(
        f"clip:{tmp_path}", [], [], steps=0, seed=0, device=CPU
    )
    assert description["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert description["psi"] == "clip" and not description["paper_setting"]
    volume = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert encoder(volume).shape == (1, 16)
    _assert_frozen_and_differentiable(encoder)
