"""BlindHarmonyDiff on CPU with the ``tiny`` preset: patches, training and its resume, sampler,
refinement, inference precision, I/O."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phantoms import ellipsoid_phantom

from bids_harmony.errors import NotFittedError, UsageError
from bids_harmony.harmonizers import blindharmonydiff
from bids_harmony.volume import Volume
from bids_harmony.harmonizers.blindharmonydiff import (
    PRESETS,
    BlindHarmonyDiff,
    autocast_dtype,
    build_network,
    extract_patch,
    ncc_ascent_step,
    sample_and_refine,
    sample_patch,
    whole_volume_coordinates,
)
from bids_harmony.harmonizers.learned import NETWORK_PREFIX, WEIGHTS_FILE
from bids_harmony.metrics import ncc

SHAPE = (32, 32, 24)


def phantom(subject: int, gamma: float = 1.0) -> Volume:
    return ellipsoid_phantom(SHAPE, subject, gamma)


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
        refined = ncc_ascent_step(x, source, mask, 0.02)
        assert ncc(refined.numpy(), source.numpy(), mask.numpy()) > ncc(
            x.numpy(), source.numpy(), mask.numpy()
        )
        x = refined
    assert ncc(x.numpy(), source.numpy(), mask.numpy()) > before + 0.01


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

    interrupted = BlindHarmonyDiff(**settings)
    interrupted.checkpoint_dir = tmp_path
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

    resumed = BlindHarmonyDiff(**settings, device="cpu", precision="bf16")  # not in the name
    resumed.checkpoint_dir = tmp_path
    state = resumed.fit(images, sites, sequences).state_["T1w"]
    assert len(calls) == 5 + 2  # only steps 5 and 6 were run again
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(state[name], array, err_msg=name)
    assert not list(tmp_path.iterdir())


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
