"""BlindHarmonyDiff: a 3D edge-to-image rectified flow trained on the target site only.

Training (per sequence, on the target-site reference images): each image's 3D Canny edge map
(the pipeline's rule, the paper's: 8 % of all voxels) and whole-volume coordinates condition a
U-Net (:class:`bids_harmony.nn.VelocityUNet`) trained with the rectified-flow loss on
multi-stride patches. Harmonization: the source's edge map drives an ODE from noise over the
brain box, then gradient ascent on the subject-wise NCC with the source suppresses
hallucinations (paper Sec. 3, supplement S3.1). The objective and the sampler are
:mod:`bids_harmony.nn.rectified_flow`, the NCC ascent :mod:`bids_harmony.nn.guidance`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bids_harmony.errors import UsageError
from bids_harmony.harmonizers.registry import register
from bids_harmony.harmonizers.learned import (
    BrainBox,
    NO_DIAGNOSTICS,
    LearnedHarmonizer,
    machine_preset,
    monitor_arrays,
    network_arrays,
    network_state,
    pad_end,
    padded_shape,
    resolve_settings,
    split_validation,
)
from bids_harmony.imaging.edges import PIPELINE_DENOMINATOR, canny_edges_at_ratio
from bids_harmony.metrics import pearson, psnr
from bids_harmony.nn import (
    Monitor,
    VelocityUNet,
    checkpoint_path,
    fingerprint,
    train,
    warmup_schedule,
)
from bids_harmony.nn import distributed
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.guidance import masked_ncc_ascent_step, relative_ncc_step
from bids_harmony.nn.rectified_flow import PREDICTIONS, SOLVERS, integrate, rectified_flow_loss
from bids_harmony.volume import EDGES, Volume

#: ``after``: the paper's refinement (Sec. 3.5), all NCC steps on the ODE output.
#: ``interleaved``: the public code's ``sample_tra``, NCC steps between ODE segments.
REFINEMENT_SCHEDULES = ("after", "interleaved")
#: ``absolute``: the paper's step, ``step_size`` times the voxel-sum NCC gradient.
#: ``relative``: each step turns the estimate by ``step_size`` of its angle to the source
#: (:func:`bids_harmony.nn.guidance.relative_ncc_step`), whatever the generator's contrast.
REFINEMENT_SCALES = ("absolute", "relative")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Settings that do not change the trained weights, left out of a run's fingerprint so that
#: a run resumes (or a finished one is reused) on another device, at another precision or
#: checkpoint interval, and with other sampling or refinement settings.
NOT_IN_FINGERPRINT = (
    "device", "precision", "checkpoint_every", "sampling_steps", "solver",
    "refinement_steps", "refinement_step_size", "refinement_schedule", "refinement_scale",
)
#: Diagnostics: PSNR / PCC of the reconstruction of held-out target images from their own
#: edges, and of the model-free baseline a generator must beat (the mean training image).
OWN_EDGE_PSNR, OWN_EDGE_PCC, MEAN_IMAGE_PSNR = "own_edge_psnr", "own_edge_pcc", "mean_image_psnr"


@dataclass(frozen=True)
class FlowSettings:
    """Everything that defines a BlindHarmonyDiff model and how it samples.

    ``multi_stride_fraction`` is the share of training patches cut with strides > 1 (paper:
    20 %). ``prediction``: what the network outputs, ``velocity`` (paper) or the clean image
    ``x1``. Optimisation: Adam at ``learning_rate`` after ``warmup_steps`` of linear warm-up,
    gradients clipped to norm ``clip_norm`` (0: off), an EMA of the weights with
    ``ema_decay`` (0: off; the EMA weights are the model). ``flip_axes``: axes along which
    image and edges (not the coordinates) are mirrored with probability 1/2.
    ``sampling_steps`` is the number of ODE steps of size 1 / steps (paper: 16).
    ``refinement_steps`` / ``refinement_step_size`` / ``refinement_scale``: NCC
    gradient-ascent steps (paper: 6 absolute steps of 0.02). ``edge_ratio``: share of all
    voxels that are Canny edges (paper: 8 %), used only for images that come without the
    pipeline's edge map (the Python API).
    ``validation_images``: reference images held out of training to score the model on
    (when at least two stay for training), every ``monitor_every`` steps.
    ``checkpoint_every``: training steps between checkpoints, written only when the harmonizer
    has a ``checkpoint_dir`` (the group level's work directory). ``precision`` of the
    network's evaluations in the ODE: ``auto`` (bf16 on a CUDA device that supports it, else
    fp32), ``fp32``, ``bf16`` or ``fp16`` (CUDA only); training always runs in fp32.
    """

    base_channels: int
    multipliers: tuple[int, ...]
    patch_size: int
    batch_size: int
    steps: int
    learning_rate: float
    multi_stride_fraction: float = 0.2
    prediction: str = "velocity"
    warmup_steps: int = 0
    clip_norm: float = 0.0
    ema_decay: float = 0.0
    flip_axes: tuple[int, ...] = (0, 1, 2)
    validation_images: int = 1
    monitor_every: int = 250
    sampling_steps: int = 16
    solver: str = "midpoint"
    refinement_steps: int = 6
    refinement_step_size: float = 0.02
    refinement_schedule: str = "after"
    refinement_scale: str = "absolute"
    edge_ratio: float = 0.08
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    precision: str = "auto"


#: ``cpu``: the default without a GPU, ~17 min on 2 cores at 2 mm; one network evaluation
#: (the conditional mean) and the paper's 6 NCC steps, relative (see
#: :class:`BlindHarmonyDiff`). ``fast``: a first model on one GPU. Both take what makes a
#: short run converge (measured at 2 mm on IXI, ``benchmarks/results``): the
#: clean-image prediction, warm-up with clipping at a 10x larger learning rate, the EMA.
#: ``paper``: supplement S3.1 (2 x Quadro RTX 8000 in the paper). ``tiny``: tests.
PRESETS: dict[str, FlowSettings] = {
    "cpu": FlowSettings(16, (1, 2, 4, 8), 32, 2, 2400, 1e-3, prediction="x1",
                        warmup_steps=100, clip_norm=1.0, ema_decay=0.995, flip_axes=(0,),
                        sampling_steps=1, solver="euler", refinement_step_size=0.6,
                        refinement_scale="relative"),
    "fast": FlowSettings(32, (1, 2, 4, 8), 32, 4, 20_000, 5e-4, prediction="x1",
                         warmup_steps=500, clip_norm=1.0, ema_decay=0.999, flip_axes=(0,),
                         monitor_every=1000, sampling_steps=4, refinement_step_size=0.6,
                         refinement_scale="relative"),
    "paper": FlowSettings(64, (1, 2, 4, 8), 64, 8, 150_000, 5e-5, monitor_every=5000),
    "tiny": FlowSettings(8, (1, 2, 4, 8), 16, 2, 120, 2e-3, prediction="x1",
                         warmup_steps=10, clip_norm=1.0, flip_axes=(0,), monitor_every=60,
                         sampling_steps=1, solver="euler"),
}
#: Measured seconds per training step on 2 CPU cores (``benchmarks/blind_methods.py``), for
#: the time printed before training starts.
CPU_SECONDS_PER_STEP = {"cpu": 0.42, "tiny": 0.02}


@register("blindharmonydiff")
class BlindHarmonyDiff(LearnedHarmonizer):
    """BlindHarmonyDiff: 3D edge-to-image rectified flow trained on the target site only.

    ``preset`` (``tiny`` / ``fast`` / ``paper``) sets every field of :class:`FlowSettings`;
    keyword overrides replace single fields. All resolved values are kept in ``params`` so
    the model card says exactly how the model was trained and samples. Choices the paper
    leaves open:

    * The edge map is the image's :data:`~bids_harmony.volume.EDGES` channel, the
      pipeline's ``desc-edges`` file; an image without one gets it computed by
      :func:`pipeline_edge_map`, the pipeline's own rule, on the full grid.
    * Training and inference run on the :class:`~bids_harmony.harmonizers.learned.BrainBox`
      of the training masks, each side a multiple of the U-Net's ``divisor``; the output is
      0 outside it.
    * Images enter the flow as ``2 * data - 1`` (target in [-1, 1], the scale of the noise),
      edge maps as {0, 1}; outputs are mapped back and clipped to [0, 1].
    * Boxes are zero-padded at their high end (to the patch size for training, to a
      multiple of the U-Net's ``divisor`` for inference when the grid is smaller than the
      box needs); coordinates run from -1 to 1 over the box and continue linearly into the
      padding, so a voxel has the same coordinates in training and at inference.
    * A multi-stride patch draws each axis's stride uniformly from 1 .. floor(side / patch)
      (redrawn while all are 1), crops a random sub-volume of stride x patch voxels and keeps
      every stride-th voxel. Flips (``flip_axes``; the short-run presets: left-right only)
      mirror image and edges but not the coordinates, as the public code flips the volume
      before patching; mirroring the coordinates too would show the network coordinate
      orientations it never meets at inference.
    * Flow times are drawn uniformly in [0, 1] (the integral of Eq. 6).
    * The refinement maximises NCC inside the brain mask, in the flow's [-1, 1] space, with
      the gradient of the voxel-sum NCC (voxel count times the mean-form gradient) as in the
      public code, so the step 0.02 does not depend on the volume size (``absolute``). That
      step moves a voxel by 0.02 / sd², sd the estimate's spread, so its pull depends on the
      generator; ``relative`` (the ``cpu`` and ``fast`` presets) scales it by the estimate's
      squared norm instead. On the training heads at 2 mm (cpu model), 6 relative steps of
      0.6 beat the source on both real-style sites (+0.15 / +0.48 dB); 20 absolute steps of
      0.02 gave +0.24 / -0.03, the paper's 6 x 0.02 less. Large relative steps also widen
      the estimate's contrast, which the conditional mean underestimates.
    * The ``cpu`` preset samples with one Euler step: with the x1 prediction that is the
      network's conditional mean, within ~1 dB of 4 midpoint steps at 16x less cost.

    Training goes through :func:`bids_harmony.nn.train`: with a ``checkpoint_dir`` it saves a
    checkpoint every ``checkpoint_every`` steps, named by a fingerprint of the settings and
    the reference images, and a rerun resumes from it to the same weights an uninterrupted
    run gives (every step draws its patches, noise and times from one seeded generator).
    The finished weights go to the stage cache under the same fingerprint, so a refit on the
    same target images loads them instead of training again.
    Training runs in fp32, as in the paper; mixed-precision training is a later option. The
    ODE's network evaluations run under ``torch.autocast`` at ``precision`` (bf16 by default
    on a GPU, for speed); the state ``x`` and the NCC refinement stay fp32, so rounding does
    not accumulate over the steps.
    """

    citation = ("Jeong H, Lee H, Chun SY, Lee J. Efficient and robust 3D blind harmonization for "
                "large domain gaps. CVPR, 2025.")

    #: ``auto``: ``cpu`` where training runs on the CPU, else ``fast``.
    presets: ClassVar[tuple[str, ...]] = ("auto", *PRESETS)
    loss_label: ClassVar[str] = "rectified-flow loss"

    def __init__(self, preset: str = "auto", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        for name in ("multipliers", "flip_axes"):
            if name in overrides:
                overrides[name] = tuple(int(m) for m in overrides[name])
        preset = machine_preset(preset, overrides.get("device", "auto"))
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        params = asdict(settings)
        params["multipliers"] = list(settings.multipliers)
        params["flip_axes"] = list(settings.flip_axes)
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **params)

    # -- contract --------------------------------------------------------------------------
    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        settings = self.settings
        network = build_network(settings)
        box = BrainBox.around([im.mask for im in reference], [network.divisor] * 3)
        cropped = [box.crop(with_edges(im, settings.edge_ratio)) for im in reference]
        training, validation = split_validation(cropped, settings.validation_images)
        volumes = [
            training_channels(im, padded_shape(im.data.shape, 1, settings.patch_size))
            for im in training
        ]
        run_settings = {
            name: value for name, value in asdict(settings).items()
            if name not in NOT_IN_FINGERPRINT
        }
        run = fingerprint(run_settings, volumes)

        def train_network() -> dict[str, np.ndarray]:
            checkpoint = checkpoint_path(self.checkpoint_dir, run)
            device = resolve_device(settings.device)
            self._announce(settings.steps, CPU_SECONDS_PER_STEP.get(self.params["preset"]))
            scored = validation or training

            def evaluate(model: torch.nn.Module) -> dict[str, float]:
                return own_edge_scores(model, scored, settings, device)

            trained, losses, history = train_velocity_field(
                network, volumes, settings, device, checkpoint, evaluate
            )
            baselines = {MEAN_IMAGE_PSNR: mean_image_psnr(scored, training)}
            return {
                **network_arrays(trained, losses),
                **monitor_arrays(history, baselines, held_out=bool(validation)),
            }

        return {**self._stage("velocity", run, train_network), **box.to_state()}

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """A model whose own-edge reconstruction is no better than the mean training image
        learned nothing a harmonization could use."""
        final = diagnostics["history"][-1]
        baseline = diagnostics["baselines"].get(MEAN_IMAGE_PSNR)
        if baseline is None:
            return [NO_DIAGNOSTICS]
        if final[OWN_EDGE_PSNR] <= baseline:
            return [
                f"the network reconstructs {diagnostics['scored_on']} target images from "
                f"their own edges at {final[OWN_EDGE_PSNR]:.2f} dB, no better than the mean "
                f"training image ({baseline:.2f} dB): it has not learned the target site; "
                "train longer (steps) or on a GPU (--preset fast)"
            ]
        return []

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        settings = self.settings
        device = resolve_device(settings.device)
        network = build_network(settings)
        network.load_state_dict(
            {name: torch.from_numpy(value) for name, value in network_state(state).items()}
        )
        box = BrainBox.from_state(state)
        image = box.crop(with_edges(image, settings.edge_ratio))
        shape = padded_shape(image.data.shape, network.divisor, 1)
        condition = conditioning_channels(image, shape)
        source = pad_end((2.0 * image.data - 1.0).astype(np.float32), shape, -1.0)
        mask = pad_end(image.mask.astype(bool), shape, False)
        generator = torch.Generator().manual_seed(settings.seed)
        noise = torch.randn((1, 1, *shape), generator=generator)
        harmonized = sample_and_refine(
            network.to(device).eval(),
            torch.from_numpy(condition)[None].to(device),
            noise.to(device),
            torch.from_numpy(source)[None, None].to(device),
            torch.from_numpy(mask)[None, None].to(device),
            settings,
        )
        out = harmonized[0, 0].cpu().numpy()[tuple(slice(0, s) for s in image.data.shape)]
        return box.uncrop(np.clip((out + 1.0) / 2.0, 0.0, 1.0))


# -- settings ------------------------------------------------------------------------------
def _validate(settings: FlowSettings) -> None:
    """Reject settings that cannot train or sample, naming the parameter."""
    positive = (
        "base_channels", "patch_size", "batch_size", "steps", "sampling_steps", "checkpoint_every",
        "monitor_every",
    )
    for name in positive:
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"blindharmonydiff needs {name} >= 1, got {getattr(settings, name)}")
    divisor = 2 ** (len(settings.multipliers) - 1)
    if settings.patch_size % divisor:
        raise UsageError(
            f"blindharmonydiff patch_size must be a multiple of {divisor} for "
            f"{len(settings.multipliers)} U-Net levels, got {settings.patch_size}"
        )
    if not settings.learning_rate > 0:
        raise UsageError(f"blindharmonydiff needs learning_rate > 0, got {settings.learning_rate}")
    if settings.prediction not in PREDICTIONS:
        raise UsageError(
            f"prediction must be one of {', '.join(PREDICTIONS)}, got {settings.prediction!r}"
        )
    for name in ("warmup_steps", "validation_images"):
        if int(getattr(settings, name)) < 0:
            raise UsageError(f"blindharmonydiff needs {name} >= 0, got {getattr(settings, name)}")
    if settings.clip_norm < 0 or not 0.0 <= settings.ema_decay < 1.0:
        raise UsageError("clip_norm must be >= 0 and ema_decay in [0, 1)")
    if any(axis not in (0, 1, 2) for axis in settings.flip_axes):
        raise UsageError(f"flip_axes must be among 0, 1, 2, got {settings.flip_axes}")
    if not 0.0 <= settings.multi_stride_fraction <= 1.0:
        raise UsageError(
            f"multi_stride_fraction must lie in [0, 1], got {settings.multi_stride_fraction}"
        )
    if settings.solver not in SOLVERS:
        raise UsageError(f"solver must be one of {', '.join(SOLVERS)}, got {settings.solver!r}")
    if settings.refinement_schedule not in REFINEMENT_SCHEDULES:
        raise UsageError(
            f"refinement_schedule must be one of {', '.join(REFINEMENT_SCHEDULES)}, "
            f"got {settings.refinement_schedule!r}"
        )
    if settings.refinement_scale not in REFINEMENT_SCALES:
        raise UsageError(
            f"refinement_scale must be one of {', '.join(REFINEMENT_SCALES)}, "
            f"got {settings.refinement_scale!r}"
        )
    if settings.refinement_steps < 0 or settings.refinement_step_size < 0:
        raise UsageError("refinement_steps and refinement_step_size must be >= 0")
    if not 0.0 < settings.edge_ratio < 1.0:
        raise UsageError(f"edge_ratio must lie in (0, 1), got {settings.edge_ratio}")
    validate_device(settings.device)
    if settings.precision not in PRECISIONS:
        raise UsageError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}"
        )
    if settings.precision == "fp16":  # fail before training rather than at the first image
        autocast_dtype(settings.precision, resolve_device(settings.device))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the ODE's network evaluations on ``device``; ``None`` means fp32.

    ``auto`` takes bf16 only where the GPU computes it natively (Ampere and later): bf16 keeps
    fp32's exponent range, so the velocities cannot overflow as fp16 can.
    """
    if precision == "fp16" and device.type == "cpu":
        raise UsageError(
            "precision fp16 needs a CUDA device (CPU autocast supports bf16 only); "
            "pass precision bf16 or fp32 on the CPU"
        )
    if precision == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
        precision = "bf16" if native_bf16 else "fp32"
    return AUTOCAST_DTYPES.get(precision)


def build_network(settings: FlowSettings) -> VelocityUNet:
    """The U-Net with weights initialised from ``settings.seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return VelocityUNet(
            in_channels=5,
            out_channels=1,
            base_channels=settings.base_channels,
            multipliers=settings.multipliers,
        )


# -- data ----------------------------------------------------------------------------------
def whole_volume_coordinates(shape: Sequence[int], padded_shape: Sequence[int]) -> np.ndarray:
    """(3, *padded_shape) coordinates, -1 .. 1 across ``shape`` and linear beyond it."""
    axes = [
        -1.0 + 2.0 * np.arange(padded, dtype=np.float32) / max(size - 1, 1)
        for size, padded in zip(shape, padded_shape)
    ]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def pipeline_edge_map(image: Volume, edge_ratio: float) -> np.ndarray:
    """The edge map the pipeline's Canny step writes for ``image`` (``desc-edges``).

    The same call as the participant level's ``CannyEdges`` node: ``edge_ratio`` of all
    voxels inside the mask (:data:`PIPELINE_DENOMINATOR`), the interface's default smoothing
    and search, and the voxel spacing,
    without which the smoothing kernel and so the map differ on any grid but 1 mm.
    """
    edges, _ = canny_edges_at_ratio(
        image.data, edge_ratio, spacing=image.spacing, mask=image.mask,
        denominator=PIPELINE_DENOMINATOR,
    )
    return edges


def with_edges(image: Volume, edge_ratio: float) -> Volume:
    """``image`` with its :data:`EDGES` channel: the pipeline's map when it came with one,
    else :func:`pipeline_edge_map`."""
    if EDGES in image.channels:
        return image
    channels = {**image.channels, EDGES: pipeline_edge_map(image, edge_ratio)}
    return Volume(image.data, image.mask, image.spacing, channels)


def conditioning_channels(image: Volume, shape: Sequence[int]) -> np.ndarray:
    """(4, *shape): the image's edge map (:data:`EDGES` channel) and the coordinates."""
    edges = np.asarray(image.channel(EDGES), dtype=np.float32)
    coordinates = whole_volume_coordinates(image.data.shape, shape)
    return np.concatenate([pad_end(edges, shape, 0.0)[None], coordinates])


def training_channels(image: Volume, shape: Sequence[int]) -> np.ndarray:
    """(5, *shape): the image in [-1, 1] (background -1), then :func:`conditioning_channels`."""
    target = pad_end((2.0 * image.data - 1.0).astype(np.float32), shape, -1.0)
    return np.concatenate([target[None], conditioning_channels(image, shape)])


def extract_patch(
    volume: torch.Tensor, corner: Sequence[int], strides: Sequence[int], patch_size: int
) -> torch.Tensor:
    """Every ``stride``-th voxel of the sub-volume at ``corner``: a (C, P, P, P) patch."""
    index = tuple(
        slice(start, start + stride * patch_size, stride)
        for start, stride in zip(corner, strides)
    )
    return volume[(slice(None), *index)]


def sample_patch(
    volume: torch.Tensor,
    patch_size: int,
    multi_stride: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """A random plain (stride 1) or multi-stride patch, with its corner and strides."""
    sides = volume.shape[1:]
    largest = [side // patch_size for side in sides]
    strides = (1, 1, 1)
    if multi_stride and max(largest) > 1:
        while strides == (1, 1, 1):
            strides = tuple(
                int(torch.randint(1, n + 1, (1,), generator=generator)) for n in largest
            )
    corner = tuple(
        int(torch.randint(0, side - stride * patch_size + 1, (1,), generator=generator))
        for side, stride in zip(sides, strides)
    )
    return extract_patch(volume, corner, strides, patch_size), corner, strides


def random_flip(
    patch: torch.Tensor, axes: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """Mirror image and edges along each of ``axes`` with probability 1/2; the coordinate
    channels stay, so the network sees only coordinates it meets at inference (the public
    code flips the whole volume before patching and keeps its coordinates)."""
    flipped = [axis + 1 for axis in axes if torch.rand(1, generator=generator) < 0.5]
    if not flipped:
        return patch
    return torch.cat([patch[:2].flip(flipped), patch[2:]])


def training_batch(
    volumes: Sequence[torch.Tensor], settings: FlowSettings, generator: torch.Generator
) -> torch.Tensor:
    """(B, 5, P, P, P): patches of random images; ``multi_stride_fraction`` are multi-stride."""
    patches = []
    for _ in range(settings.batch_size):
        volume = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        multi = bool(torch.rand(1, generator=generator) < settings.multi_stride_fraction)
        patch, _, _ = sample_patch(volume, settings.patch_size, multi, generator)
        patches.append(random_flip(patch, settings.flip_axes, generator))
    return torch.stack(patches)


def mean_image_psnr(scored: Sequence[Volume], training: Sequence[Volume]) -> float:
    """PSNR of the voxel-wise mean training image against each scored image (its mask): the
    model-free estimate of a target image that a generator has to beat."""
    mean = np.mean([im.data for im in training], axis=0)
    return float(np.mean([psnr(mean, im.data, im.mask) for im in scored]))


@torch.no_grad()
def own_edge_scores(
    network: torch.nn.Module, scored: Sequence[Volume], settings: FlowSettings,
    device: torch.device,
) -> dict[str, float]:
    """PSNR / PCC of each image's reconstruction from its own edges (the sampler of
    ``settings`` from fixed noise, no refinement), inside its mask, averaged: the ceiling of
    what the model can harmonize to."""
    was_training = network.training
    rows = []
    for image in scored:
        shape = padded_shape(image.data.shape, network.divisor, 1)
        condition = torch.from_numpy(conditioning_channels(image, shape))[None].to(device)
        noise = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(settings.seed))
        x = integrate(network, noise.to(device), condition, settings.sampling_steps,
                      settings.solver, None, None, settings.prediction)
        crop = tuple(slice(0, side) for side in image.data.shape)
        out = np.clip((x[0, 0].cpu().numpy()[crop] + 1.0) / 2.0, 0.0, 1.0)
        rows.append((psnr(out, image.data, image.mask), pearson(out, image.data, image.mask)))
    network.train(was_training)
    return {OWN_EDGE_PSNR: float(np.mean([r[0] for r in rows])),
            OWN_EDGE_PCC: float(np.mean([r[1] for r in rows]))}


# -- training and sampling -----------------------------------------------------------
def train_velocity_field(
    network: VelocityUNet,
    volumes: Sequence[np.ndarray],
    settings: FlowSettings,
    device: torch.device,
    checkpoint: Path | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> tuple[torch.nn.Module, list[float], list[dict[str, float]]]:
    """Adam on the rectified-flow loss for ``settings.steps`` steps: the trained network
    (the EMA copy when ``ema_decay`` > 0), the loss per step and the monitor's history.

    Patches, noise and times all come from the generator :func:`bids_harmony.nn.train`
    checkpoints, so resuming from ``checkpoint`` repeats the uninterrupted run exactly.
    ``evaluate`` (if any) scores the network the model will be, the EMA copy where there is
    one, every ``monitor_every`` steps.
    """
    tensors = [torch.from_numpy(v) for v in volumes]
    network.to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    scheduler = warmup_schedule(optimiser, settings.warmup_steps, settings.steps)
    ema = None
    if settings.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            network, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(settings.ema_decay)
        )
    model = network if ema is None else ema.module
    monitor = None if evaluate is None else Monitor(
        lambda: evaluate(model), settings.monitor_every
    )

    replica = distributed.replicate(network)

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        batch = training_batch(tensors, settings, generator).to(device)
        return rectified_flow_loss(replica, batch, generator, settings.prediction)

    losses = train(
        network, optimiser, step_loss, settings.steps,
        torch.Generator().manual_seed(settings.seed), scheduler=scheduler,
        clip_norm=settings.clip_norm or None, ema=ema, monitor=monitor,
        checkpoint=checkpoint, checkpoint_every=settings.checkpoint_every,
        description="blindharmonydiff",
    )
    return model, losses, [] if monitor is None else monitor.history


@torch.no_grad()
def sample_and_refine(
    network: VelocityUNet,
    condition: torch.Tensor,
    noise: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    settings: FlowSettings,
) -> torch.Tensor:
    """ODE from ``noise`` (t = 0) to the image (t = 1), with the NCC refinement.

    ``after`` (paper): ``refinement_steps`` NCC steps on the ODE output. ``interleaved``
    (public code): NCC steps at ``refinement_steps`` evenly spaced ODE step boundaries (the
    last at t = 1), each toward the source moved along the same path, ``t s + (1 - t) x0``.
    The network runs at ``settings.precision``; ``x`` and the refinement stay in fp32.
    """
    steps = settings.sampling_steps
    step_size = settings.refinement_step_size
    interleaved_at: set[int] = set()
    if settings.refinement_schedule == "interleaved" and settings.refinement_steps:
        boundaries = np.linspace(steps, 0, settings.refinement_steps, endpoint=False)
        interleaved_at = {int(k) for k in np.round(boundaries)}

    def refine(x: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
        if settings.refinement_scale == "relative":
            return relative_ncc_step(x, toward, mask, step_size)
        return masked_ncc_ascent_step(x, toward, mask, step_size)

    def toward_moving_source(k: int, x: torch.Tensor) -> torch.Tensor:
        if k not in interleaved_at:
            return x
        t = k * (1.0 / steps)  # the time the ODE reached, as integrate computes it
        return refine(x, t * source + (1.0 - t) * noise)

    x = integrate(
        network, noise, condition, steps, settings.solver,
        autocast_dtype(settings.precision, noise.device),
        toward_moving_source if interleaved_at else None, settings.prediction,
    )
    if settings.refinement_schedule == "after":
        for _ in range(settings.refinement_steps):
            x = refine(x, source)
    return x
