"""BlindHarmonyDiff on CPU with the ``tiny`` preset: patches, edge maps, brain box, training,
its resume and stage cache, sampler, refinement, inference precision, I/O."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import ellipsoid_phantom

from bids_harmony.errors import DataError, NotFittedError, UsageError
from bids_harmony.harmonizers import blindharmonydiff
from bids_harmony.harmonizers.blindharmonydiff import (
    PRESETS,
    BlindHarmonyDiff,
    autocast_dtype,
    build_network,
    conditioning_channels,
    extract_patch,
    own_edge_scores,
    pipeline_edge_map,
    random_flip,
    sample_and_refine,
    sample_patch,
    whole_volume_coordinates,
    with_edges,
)
from bids_harmony.harmonizers.learned import NETWORK_PREFIX, WEIGHTS_FILE, BrainBox, machine_preset
from bids_harmony.imaging.edges import PIPELINE_DENOMINATOR, canny_edges_at_ratio
from bids_harmony.metrics import ncc
from bids_harmony.nn.guidance import masked_ncc_ascent_step, pearson_ncc_gradient
from bids_harmony.nn.rectified_flow import integrate
from bids_harmony.volume import EDGES, Volume

BRAIN = (32, 32, 24)
#: The template grid: the brain sits off-centre in a wider field of view, as in MNI space.
SHAPE = (40, 40, 32)
OFFSET = (5, 3, 6)


def phantom(subject: int, gamma: float = 1.0) -> Volume:
    brain = ellipsoid_phantom(BRAIN, subject, gamma)
    index = tuple(slice(o, o + side) for o, side in zip(OFFSET, BRAIN))
    data, mask = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, bool)
    data[index], mask[index] = brain.data, brain.mask
    return Volume(data, mask)


@pytest.fixture(scope="module")
def fitted() -> BlindHarmonyDiff:
    images = [phantom(s) for s in range(3)]
    return BlindHarmonyDiff(preset="tiny").fit(images, ["a"] * 3, ["T1w"] * 3, target="a")


def test_loss_falls_with_a_fixed_seed(fitted: BlindHarmonyDiff) -> None:
    losses = fitted.state_["T1w"]["loss_history"]
    assert losses.shape == (PRESETS["tiny"].steps,)
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.8 * losses[:10].mean()


def test_multi_stride_patch_shapes_and_coordinates() -> None:
    shape = (40, 36, 20)
    coordinates = torch.from_numpy(whole_volume_coordinates(shape, shape))
    assert coordinates[:, 0, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert coordinates[:, -1, -1, -1].tolist() == [1.0, 1.0, 1.0]
    generator = torch.Generator().manual_seed(3)
    seen_strides = set()
    for _ in range(20):
        patch, corner, strides = sample_patch(coordinates, 8, True, generator)
        assert patch.shape == (3, 8, 8, 8)
        assert strides != (1, 1, 1) and strides[2] <= 2
        expected = coordinates[
            :, corner[0]::strides[0], corner[1]::strides[1], corner[2]::strides[2]
        ][:, :8, :8, :8]
        torch.testing.assert_close(patch, expected, rtol=0, atol=0)
        seen_strides.add(strides)
    assert len(seen_strides) > 1
    plain, corner, strides = sample_patch(coordinates, 8, False, generator)
    assert strides == (1, 1, 1)
    torch.testing.assert_close(plain, extract_patch(coordinates, corner, (1, 1, 1), 8))


def test_padding_continues_coordinates_linearly() -> None:
    coordinates = whole_volume_coordinates((5,), (8,))[0]
    np.testing.assert_allclose(coordinates, -1.0 + 0.5 * np.arange(8), atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("schedule", ["after", "interleaved"])
def test_ode_output_is_finite_with_the_input_shape(solver: str, schedule: str) -> None:
    settings = replace(PRESETS["tiny"], solver=solver, refinement_schedule=schedule)
    network = build_network(settings)
    condition = torch.rand(1, 4, 16, 16, 8)
    noise = torch.randn(1, 1, 16, 16, 8)
    mask = torch.ones(1, 1, 16, 16, 8, dtype=torch.bool)
    out = sample_and_refine(network, condition, noise, torch.rand_like(noise), mask, settings)
    assert out.shape == noise.shape
    assert torch.isfinite(out).all()


def test_refinement_raises_ncc_with_the_source() -> None:
    source = torch.from_numpy(phantom(0).data)
    mask = torch.from_numpy(phantom(0).mask)
    x = torch.from_numpy(phantom(1, gamma=2.0).data) + 0.3 * torch.randn(SHAPE)
    before = ncc(x.numpy(), source.numpy(), mask.numpy())
    for _ in range(6):
        refined = masked_ncc_ascent_step(x, source, mask, 0.02)
        assert ncc(refined.numpy(), source.numpy(), mask.numpy()) > ncc(
            x.numpy(), source.numpy(), mask.numpy()
        )
        x = refined
    assert ncc(x.numpy(), source.numpy(), mask.numpy()) > before + 0.01


def test_refinement_step_is_the_voxel_sum_ncc_gradient_blindharmony_uses() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 6, 5, 4, generator=generator, dtype=torch.float64)
    source = torch.rand(1, 1, 6, 5, 4, generator=generator, dtype=torch.float64)
    mask = torch.rand(1, 1, 6, 5, 4, generator=generator) > 0.4
    inside = x[mask].clone().requires_grad_(True)
    a, b = inside - inside.mean(), source[mask] - source[mask].mean()
    correlation = (a * b).sum() / (a.norm() * b.norm())
    (gradient,) = torch.autograd.grad(correlation, inside)
    step = masked_ncc_ascent_step(x, source, mask, 0.5) - x
    torch.testing.assert_close(step[mask], 0.5 * mask.sum() * gradient)
    assert not step[~mask].any()
    everywhere = torch.ones_like(mask)  # on a whole image: BlindHarmony's per-slice gradient
    torch.testing.assert_close(
        masked_ncc_ascent_step(x, source, everywhere, 1.0) - x,
        x[0].numel() * pearson_ncc_gradient(x, source),
    )


def test_harmonized_output_is_finite_masked_and_reproducible(fitted: BlindHarmonyDiff) -> None:
    source = phantom(5, gamma=2.0)
    out = fitted.transform(source, "T1w")
    assert out.shape == SHAPE and out.dtype == np.float32
    assert np.isfinite(out).all() and not out[~source.mask].any()
    np.testing.assert_array_equal(out, fitted.transform(source, "T1w"))


def test_save_load_round_trip_is_exact(fitted: BlindHarmonyDiff, tmp_path: Path) -> None:
    directory = fitted.save(tmp_path / "model")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["loss_T1w.png", "model_card.json", WEIGHTS_FILE]
    )
    card = json.loads((directory / "model_card.json").read_text())
    assert card["parameters"]["preset"] == "tiny"
    assert len(card["loss_curve"]["T1w"]["loss"]) == PRESETS["tiny"].steps
    loaded = BlindHarmonyDiff.load(directory)
    source = phantom(6, gamma=0.5)
    np.testing.assert_array_equal(fitted.transform(source, "T1w"), loaded.transform(source, "T1w"))
    np.testing.assert_array_equal(
        fitted.reference_quantiles("T1w"), loaded.reference_quantiles("T1w")
    )


def test_transform_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        BlindHarmonyDiff(preset="tiny").transform(phantom(0), "T1w")


@pytest.mark.parametrize(
    "params",
    [{"preset": "huge"}, {"solver": "rk4"}, {"patch_size": 12}, {"refinement_schedule": "x"},
     {"multi_stride_fraction": 1.5}, {"learning_rate": 0.0}, {"unknown": 1},
     {"checkpoint_every": 0}, {"precision": "fp8"}],
)
def test_invalid_parameters_raise_usage_error(params: dict) -> None:
    with pytest.raises(UsageError):
        BlindHarmonyDiff(**params)


def test_interrupted_training_resumes_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, sites, sequences = [phantom(0), phantom(1)], ["a", "a"], ["T1w", "T1w"]
    settings = {"preset": "tiny", "steps": 6, "checkpoint_every": 2}
    expected = BlindHarmonyDiff(**settings).fit(images, sites, sequences).state_["T1w"]

    interrupted = BlindHarmonyDiff(**settings, checkpoint_dir=tmp_path)
    loss = blindharmonydiff.rectified_flow_loss
    calls: list[int] = []

    def counted_loss(*args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:  # step 5, after the checkpoint of step 4: as if killed
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(blindharmonydiff, "rectified_flow_loss", counted_loss)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(images, sites, sequences)
    (checkpoint,) = tmp_path.glob("*.pt")
    assert torch.load(checkpoint, weights_only=True)["step"] == 4

    resumed = BlindHarmonyDiff(  # device and precision are not in the run's name
        **settings, device="cpu", precision="bf16", checkpoint_dir=tmp_path
    )
    state = resumed.fit(images, sites, sequences).state_["T1w"]
    assert len(calls) == 5 + 2  # only steps 5 and 6 were run again
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(state[name], array, err_msg=name)
    assert not list(tmp_path.glob("*.pt"))
    assert len(list((tmp_path / "stages").iterdir())) == 1

    refit = BlindHarmonyDiff(**settings, checkpoint_dir=tmp_path)
    cached = refit.fit(images, sites, sequences).state_["T1w"]
    assert len(calls) == 7  # same inputs: the stage cache answers, no training step runs
    for name, array in expected.items():
        np.testing.assert_array_equal(cached[name], array, err_msg=name)


def test_bf16_inference_is_finite_and_close_to_fp32(fitted: BlindHarmonyDiff) -> None:
    # Two Euler steps on a small crop: bf16 convolutions are slow on CPUs without native bf16.
    settings = replace(fitted.settings, sampling_steps=2, solver="euler")
    network = build_network(settings)
    network.load_state_dict({
        name[len(NETWORK_PREFIX):]: torch.from_numpy(array)
        for name, array in fitted.state_["T1w"].items() if name.startswith(NETWORK_PREFIX)
    })
    crop = (slice(8, 24), slice(8, 24), slice(8, 16))
    image = phantom(5, gamma=2.0)
    condition = torch.randn(1, 4, 16, 16, 8)
    noise = torch.randn(1, 1, 16, 16, 8)
    source = torch.from_numpy(2.0 * image.data[crop] - 1.0)[None, None]
    mask = torch.from_numpy(image.mask[crop])[None, None]
    fp32_out, bf16_out = (
        sample_and_refine(network, condition, noise, source, mask,
                          replace(settings, precision=precision))
        for precision in ("fp32", "bf16")
    )
    assert bf16_out.shape == noise.shape and bf16_out.dtype == torch.float32
    assert torch.isfinite(bf16_out).all()
    assert not torch.equal(bf16_out, fp32_out)  # the network did run in bf16
    assert (bf16_out - fp32_out).abs().max() < 0.1


def test_precision_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16


def test_fp16_on_the_cpu_raises_usage_error_naming_the_fix() -> None:
    with pytest.raises(UsageError, match="bf16 or fp32"):
        BlindHarmonyDiff(preset="tiny", device="cpu", precision="fp16")


def test_trains_and_infers_on_the_brain_box(fitted: BlindHarmonyDiff, tmp_path: Path) -> None:
    box = BrainBox.from_state(fitted.state_["T1w"])
    assert box.grid == SHAPE
    assert box.start == OFFSET and box.stop == tuple(o + b for o, b in zip(OFFSET, BRAIN))
    assert all((high - low) % 8 == 0 for low, high in zip(box.start, box.stop))
    source = phantom(5, gamma=2.0)
    source_mask = source.mask.copy()
    source_mask[:OFFSET[0] + 2] = True  # brain the training masks never reached
    wide = Volume(source.data, source_mask)
    out = fitted.transform(wide, "T1w")
    assert out.shape == SHAPE
    outside = np.ones(SHAPE, bool)
    outside[box.index] = False
    assert not out[outside].any() and out[box.index][source.mask[box.index]].any()
    loaded = BlindHarmonyDiff.load(fitted.save(tmp_path / "model"))
    assert BrainBox.from_state(loaded.state_["T1w"]) == box
    with pytest.raises(DataError, match="grid"):
        fitted.transform(Volume(np.zeros((40, 40, 40), np.float32), np.ones((40, 40, 40), bool)),
                         "T1w")


def test_conditions_on_the_pipeline_edge_map_it_is_given() -> None:
    image = phantom(0)
    given = np.zeros(SHAPE, np.uint8)
    given[10:20, 12, 8:16] = 1
    with_map = Volume(image.data, image.mask, image.spacing, {EDGES: given})
    assert with_edges(with_map, 0.08) is with_map
    channels = conditioning_channels(with_edges(with_map, 0.08), (40, 40, 32))
    np.testing.assert_array_equal(channels[0], given)


def test_model_uses_the_given_map_without_recomputing(
    fitted: BlindHarmonyDiff, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = phantom(7, gamma=2.0)
    edges = pipeline_edge_map(image, 0.08)

    def no_canny(*args: object, **kwargs: object) -> None:
        raise AssertionError("the edge map was recomputed")

    monkeypatch.setattr(blindharmonydiff, "canny_edges_at_ratio", no_canny)
    out = fitted.transform(Volume(image.data, image.mask, image.spacing, {EDGES: edges}), "T1w")
    assert out.shape == SHAPE and np.isfinite(out).all()


def test_computed_edge_map_equals_the_pipeline_canny_step(tmp_path: Path) -> None:
    import nibabel as nib

    from bids_harmony.interfaces.canny import CannyEdges

    image = phantom(3)
    two_mm = Volume(image.data, image.mask, (2.0, 2.0, 2.0))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(image.data, affine).to_filename(tmp_path / "preproc.nii.gz")
    nib.Nifti1Image(image.mask.astype(np.uint8), affine).to_filename(tmp_path / "mask.nii.gz")
    node = CannyEdges(in_file=str(tmp_path / "preproc.nii.gz"),
                      mask_file=str(tmp_path / "mask.nii.gz"), edge_ratio=0.08,
                      denominator=PIPELINE_DENOMINATOR)
    result = node.run(cwd=str(tmp_path))
    written = np.asarray(nib.load(result.outputs.out_file).dataobj)
    np.testing.assert_array_equal(with_edges(two_mm, 0.08).channel(EDGES), written)
    without_spacing, _ = canny_edges_at_ratio(image.data, 0.08, mask=image.mask,
                                              denominator=PIPELINE_DENOMINATOR)
    assert not np.array_equal(without_spacing, written)  # the map the old code conditioned on


def test_a_few_hundred_tiny_steps_reconstruct_from_own_edges_better_than_untrained() -> None:
    images = [phantom(s) for s in range(3)]  # the last is held out for the diagnostics
    model = BlindHarmonyDiff(preset="tiny", steps=300, monitor_every=100).fit(
        images, ["a"] * 3, ["T1w"] * 3, target="a"
    )
    diagnostics = model.diagnostics()["T1w"]
    assert diagnostics["scored_on"] == "held-out"
    assert [record["step"] for record in diagnostics["history"]] == [100, 200, 300]
    settings = model.settings
    box = BrainBox.from_state(model.state_["T1w"])
    held_out = box.crop(with_edges(images[-1], settings.edge_ratio))
    untrained = own_edge_scores(build_network(settings), [held_out], settings,
                                torch.device("cpu"))
    final = diagnostics["history"][-1]
    assert final["own_edge_psnr"] > untrained["own_edge_psnr"] + 3.0
    assert final["own_edge_pcc"] > untrained["own_edge_pcc"] + 0.2
    assert np.isfinite(diagnostics["baselines"]["mean_image_psnr"])


def test_a_model_that_learned_nothing_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [phantom(s) for s in range(3)]
    model = BlindHarmonyDiff(preset="tiny", steps=1, monitor_every=1).fit(
        images, ["a"] * 3, ["T1w"] * 3, target="a"
    )
    with caplog.at_level("WARNING"):
        card = json.loads((model.save(tmp_path / "model") / "model_card.json").read_text())
    diagnostics = card["diagnostics"]["T1w"]
    assert diagnostics["learned"] is False
    assert "no better than the mean training image" in diagnostics["warnings"][0]
    assert "no better than the mean training image" in caplog.text


def test_default_preset_is_cpu_without_a_gpu() -> None:
    assert BlindHarmonyDiff(device="cpu").params["preset"] == "cpu"
    assert machine_preset("auto", "cpu") == "cpu" and machine_preset("paper", "cpu") == "paper"


def test_flips_keep_the_coordinates() -> None:
    patch = torch.arange(5 * 4 * 4 * 4, dtype=torch.float32).reshape(5, 4, 4, 4)
    generator = torch.Generator().manual_seed(0)
    flipped = [random_flip(patch, (0,), generator) for _ in range(8)]
    assert any(not torch.equal(f, patch) for f in flipped)
    for f in flipped:
        torch.testing.assert_close(f[2:], patch[2:])
        assert torch.equal(f[:2], patch[:2]) or torch.equal(f[:2], patch[:2].flip(1))


def test_x1_prediction_one_euler_step_returns_the_network_output() -> None:
    network = build_network(replace(PRESETS["tiny"], prediction="x1"))
    condition = torch.randn(1, 4, 16, 16, 16)
    noise = torch.randn(1, 1, 16, 16, 16)
    out = integrate(network, noise, condition, 1, "euler", prediction="x1")
    with torch.no_grad():
        expected = network(torch.cat([noise, condition], 1), torch.zeros(1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
