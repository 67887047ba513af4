"""BlindHarmony on CPU with the ``tiny`` preset: the flow, Algorithm 1, brain box, training,
its resume and stage cache, I/O."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import ellipsoid_phantom

from bids_harmony.errors import DataError, NotFittedError, UsageError
from bids_harmony.harmonizers.blindharmony import (
    PRESETS,
    BlindHarmony,
    blind_harmony,
    edge_penalty_gradient,
    from_slices,
    non_edge_mask,
    to_slices,
)
from bids_harmony.harmonizers.learned import WEIGHTS_FILE, BrainBox
from bids_harmony.metrics import ncc
from bids_harmony.nn.guidance import pearson_ncc_gradient
from bids_harmony.nn.spline_flow import FlowArchitecture, build_spline_flow
from bids_harmony.volume import Volume

SHAPE = (28, 32, 16)
TINY = PRESETS["tiny"]


def phantom(subject: int, gamma: float = 1.0) -> Volume:
    return ellipsoid_phantom(SHAPE, subject, gamma)


@pytest.fixture(scope="module")
def fitted() -> BlindHarmony:
    images = [phantom(s) for s in range(3)] + [phantom(10, gamma=2.0)]
    return BlindHarmony(preset="tiny").fit(
        images, ["a", "a", "a", "b"], ["T1w"] * 4, target="a"
    )


def small_flow(height: int = 4, width: int = 4) -> torch.nn.Module:
    """A one-level flow in float64, its actnorm initialised by one training batch."""
    flow = build_spline_flow(FlowArchitecture(1, 2, 4, 1), height, width, seed=3).double()
    flow.train()
    flow.log_prob(torch.rand(8, 1, height, width, dtype=torch.float64))
    return flow.eval()


def test_flow_is_invertible() -> None:
    flow = small_flow(8, 8)
    images = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    latents = flow.encode(images)
    assert latents.shape == (5, 64)
    assert torch.allclose(flow.decode(latents), images, atol=1e-8)
    # Far outside the training range the linear tails keep the map invertible.
    outside = 3.0 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(flow.decode(flow.encode(outside)), outside, atol=1e-6)


def test_flow_log_determinant_matches_autograd() -> None:
    flow = small_flow(4, 4)
    image = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    _, log_det = flow.transform(image)
    jacobian = torch.autograd.functional.jacobian(
        lambda x: flow.encode(x.reshape(1, 1, 4, 4))[0], image.reshape(16)
    )
    sign, expected = torch.linalg.slogdet(jacobian)
    assert sign.item() != 0
    assert log_det.item() == pytest.approx(expected.item(), abs=1e-8)


def test_slices_round_trip_and_padding() -> None:
    volume = phantom(0).data
    slices = to_slices(volume, TINY)
    assert slices.shape == (SHAPE[2], 1, 28, 32)  # already multiples of 2^2
    paper_like = replace(TINY, levels=4)
    padded = to_slices(volume, paper_like)
    assert padded.shape == (SHAPE[2], 1, 32, 32)
    np.testing.assert_array_equal(from_slices(padded, SHAPE, paper_like), volume)


def test_ncc_gradient_matches_autograd() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 6, 5, generator=generator, dtype=torch.float64)
    source = torch.rand(2, 1, 6, 5, generator=generator, dtype=torch.float64)
    x.requires_grad_(True)
    a = x - x.mean(dim=(1, 2, 3), keepdim=True)
    b = source - source.mean(dim=(1, 2, 3), keepdim=True)
    norm_a, norm_b = (v.pow(2).sum(dim=(1, 2, 3)).sqrt() for v in (a, b))
    correlation = (a * b).sum(dim=(1, 2, 3)) / (norm_a * norm_b)
    (expected,) = torch.autograd.grad(correlation.sum(), x)
    torch.testing.assert_close(pearson_ncc_gradient(x.detach(), source), expected)


def test_edge_mask_spares_the_source_edges_only() -> None:
    source = torch.zeros(1, 1, 16, 16)
    source[..., :, 8:] = 1.0  # one vertical edge
    brain = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    mask = non_edge_mask(source, brain, edge_fraction=0.08)
    assert mask[0, 0, :, 7].eq(0).all()  # the edge column is exempt
    assert mask.sum() == 256 - 16
    noisy = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    gradient = edge_penalty_gradient(noisy, mask)
    stepped = noisy - 1e-3 * gradient
    d_before = (noisy[..., 1:, :] - noisy[..., :-1, :]).abs().sum()
    d_after = (stepped[..., 1:, :] - stepped[..., :-1, :]).abs().sum()
    assert d_after < d_before


def test_algorithm_raises_ncc_with_the_source(fitted: BlindHarmony) -> None:
    state = fitted.state_["T1w"]
    box = BrainBox.from_state(state)
    source_volume = box.crop(phantom(11, gamma=2.0))
    height, width = source_volume.data.shape[:2]
    flow = build_spline_flow(TINY.architecture, height, width, TINY.seed)
    flow.load_state_dict(
        {k[4:]: torch.from_numpy(v) for k, v in state.items() if k.startswith("net.")}
    )
    flow.eval()
    middle = slice(6, 10)
    source = torch.from_numpy(to_slices(source_volume.data, TINY)[middle])
    brain = torch.from_numpy(to_slices(source_volume.mask.astype(np.float32), TINY)[middle]) > 0
    initial = torch.from_numpy(to_slices(state["mean_image"][box.index], TINY)[middle])
    out = blind_harmony(flow, source, brain, initial, TINY)
    assert out.shape == source.shape and torch.isfinite(out).all()
    for k in range(out.shape[0]):
        before = ncc(initial[k].numpy(), source[k].numpy())
        after = ncc(out[k].numpy(), source[k].numpy())
        assert after > before + 0.02


def test_diagnostics_score_a_held_out_image_and_judge_the_flow(fitted: BlindHarmony) -> None:
    diagnostics = fitted.diagnostics()["T1w"]
    assert diagnostics["scored_on"] == "held-out"  # 3 target images: 2 train, 1 scores
    assert [r["step"] for r in diagnostics["history"]] == [20, 40]
    final = diagnostics["history"][-1]
    assert set(final) == {"step", "bits_target", "bits_shifted", "gamma_psnr_flow",
                          "gamma_psnr_no_flow"}
    assert all(np.isfinite(value) for value in final.values())
    assert diagnostics["history"][-1]["bits_target"] < diagnostics["history"][0]["bits_target"]
    flow_adds = final["gamma_psnr_flow"] > final["gamma_psnr_no_flow"]
    separates = final["bits_shifted"] - final["bits_target"] >= 0.05
    assert diagnostics["learned"] == (flow_adds and separates)
    assert len(diagnostics["warnings"]) == (not flow_adds) + (not separates)


def test_loss_falls_with_a_fixed_seed(fitted: BlindHarmony) -> None:
    losses = fitted.state_["T1w"]["loss_history"]
    assert losses.shape == (TINY.steps,)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean() - 0.3  # bits per pixel


def test_harmonizes_an_unseen_contrast_toward_the_target(fitted: BlindHarmony) -> None:
    truth, source = phantom(20), phantom(20, gamma=2.0)
    out = fitted.transform(source, "T1w")
    assert out.shape == SHAPE and np.isfinite(out).all()
    assert np.all(out[~source.mask] == 0)
    brain = source.mask
    assert np.abs(out - truth.data)[brain].mean() < np.abs(source.data - truth.data)[brain].mean()
    np.testing.assert_array_equal(out, fitted.transform(source, "T1w"))


def test_save_load_round_trip_is_exact(fitted: BlindHarmony, tmp_path: Path) -> None:
    directory = fitted.save(tmp_path / "model")
    card = json.loads((directory / "model_card.json").read_text())
    assert card["state_file"] == WEIGHTS_FILE
    assert card["parameters"]["ncc_step"] == 0.2 and card["parameters"]["iterations"] == 10
    assert len(card["loss_curve"]["T1w"]["loss"]) == TINY.steps
    assert (directory / "loss_T1w.png").stat().st_size > 1000
    loaded = BlindHarmony.load(directory)
    source = phantom(21, gamma=2.0)
    np.testing.assert_array_equal(loaded.transform(source, "T1w"), fitted.transform(source, "T1w"))


def test_training_is_repeatable_and_resumes(tmp_path: Path) -> None:
    images = [phantom(s) for s in range(2)]
    first = BlindHarmony(preset="tiny", steps=6).fit(images, ["a", "a"], ["T1w"] * 2, "a")
    resumed = BlindHarmony(preset="tiny", steps=6, checkpoint_every=2, checkpoint_dir=tmp_path)

    class Interrupted(Exception):
        pass

    import bids_harmony.harmonizers.blindharmony as module

    original = module.bits_per_pixel
    calls = {"n": 0}

    def interrupt_at_step_five(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupted
        return original(*args, **kwargs)

    module.bits_per_pixel = interrupt_at_step_five
    try:
        with pytest.raises(Interrupted):
            resumed.fit(images, ["a", "a"], ["T1w"] * 2, "a")
    finally:
        module.bits_per_pixel = original
    assert len(list(tmp_path.glob("*.pt"))) == 1  # step 4's checkpoint
    resumed.fit(images, ["a", "a"], ["T1w"] * 2, "a")
    assert not list(tmp_path.glob("*.pt"))  # removed once the model is complete
    for key, value in first.state_["T1w"].items():
        np.testing.assert_array_equal(resumed.state_["T1w"][key], value, err_msg=key)

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a training step ran")

    refit = BlindHarmony(preset="tiny", steps=6, checkpoint_dir=tmp_path)
    module.bits_per_pixel = no_training
    try:
        refit.fit(images, ["a", "a"], ["T1w"] * 2, "a")  # same inputs: from the stage cache
    finally:
        module.bits_per_pixel = original
    for key, value in first.state_["T1w"].items():
        np.testing.assert_array_equal(refit.state_["T1w"][key], value, err_msg=key)


def test_transform_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        BlindHarmony(preset="tiny").transform(phantom(0), "T1w")


def test_trains_and_infers_on_the_brain_box(fitted: BlindHarmony, tmp_path: Path) -> None:
    box = BrainBox.from_state(fitted.state_["T1w"])
    assert box.grid == SHAPE
    in_plane = [high - low for axis, (low, high) in enumerate(zip(box.start, box.stop))
                if axis != TINY.slice_axis]
    assert all(side % TINY.architecture.divisor == 0 for side in in_plane)
    union = np.logical_or.reduce([phantom(s).mask for s in range(3)])
    assert union[box.index].sum() == union.sum()  # the box holds every training brain voxel
    assert box.stop[0] - box.start[0] < SHAPE[0]  # and is smaller than the grid
    source = phantom(22, gamma=2.0)
    wide = Volume(source.data, np.ones(SHAPE, bool))
    out = fitted.transform(wide, "T1w")
    outside = np.ones(SHAPE, bool)
    outside[box.index] = False
    assert out.shape == SHAPE and not out[outside].any()
    loaded = BlindHarmony.load(fitted.save(tmp_path / "model"))
    assert BrainBox.from_state(loaded.state_["T1w"]) == box
    np.testing.assert_array_equal(loaded.transform(wide, "T1w"), out)


def test_other_grid_raises(fitted: BlindHarmony) -> None:
    image = Volume(np.zeros((20, 20, 20), np.float32), np.ones((20, 20, 20), bool))
    with pytest.raises(DataError, match="--resolution"):
        fitted.transform(image, "T1w")


@pytest.mark.parametrize(
    "params",
    [{"preset": "huge"}, {"levels": 0}, {"alpha": 1.0}, {"ncc_step": -1.0}, {"ncc_form": "sum"},
     {"slice_axis": 3}, {"edge_fraction": 1.5}, {"device": "tpu"}, {"warmup": 3}],
)
def test_invalid_parameters_raise_usage_error(params: dict) -> None:
    with pytest.raises(UsageError):
        BlindHarmony(**{"preset": "tiny", **params})


def test_brain_box_grows_to_multiples_inside_the_grid() -> None:
    mask = np.zeros((20, 20, 6), bool)
    mask[3:7, 17:20, 2:4] = True
    box = BrainBox.around([mask], [8, 8, 8])
    assert box.start == (1, 12, 0) and box.stop == (9, 20, 6)  # centred; shifted; whole side
    image = Volume(np.where(mask, 0.5, 0.0).astype(np.float32), mask)
    cropped = box.crop(image)
    assert cropped.data.shape == (8, 8, 6)
    np.testing.assert_array_equal(box.uncrop(cropped.data), image.data)
    assert BrainBox.from_state(box.to_state()) == box
    with pytest.raises(DataError, match="empty"):
        BrainBox.around([np.zeros((4, 4, 4), bool)], [2, 2, 2])
    with pytest.raises(DataError, match="same --resolution"):
        BrainBox.around([mask, np.ones((10, 10, 3), bool)], [8, 8, 8])
