"""BlindHarmony: a 2D normalizing-flow prior of the target site, used to harmonize any site.

Training (per sequence) fits an unconditional Neural Spline Flow
(:func:`bids_harmony.nn.spline_flow.build_spline_flow`) by maximum likelihood to axial slices
of the target-site images only. Harmonization is the paper's Algorithm 1, slice by slice:
starting from the mean target image, alternate a gradient step in image space (raise the NCC
with the source, lower the gradient magnitude where the source has no edges) with a step in
latent space (shrink ``z = f(x)`` by ``1 - alpha`` toward the Gaussian's centre), N times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bids_harmony.errors import DataError, UsageError
from bids_harmony.harmonizers.registry import register
from bids_harmony.harmonizers.learned import (
    BrainBox,
    LearnedHarmonizer,
    network_arrays,
    network_state,
    resolve_settings,
)
from bids_harmony.nn import checkpoint_path, fingerprint, train
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.guidance import pearson_ncc_gradient
from bids_harmony.nn.spline_flow import FlowArchitecture, SplineFlow, build_spline_flow
from bids_harmony.volume import Volume

MEAN_IMAGE = "mean_image"
#: The settings that decide the trained weights (a run's fingerprint).
TRAINING_FIELDS = (
    "levels", "steps_per_level", "hidden_channels", "residual_blocks", "batch_size", "steps",
    "learning_rate", "dequantization_bits", "slice_axis", "min_brain_fraction", "seed",
)
#: Pixels of the paper's slices (144 x 176 at 1.2 mm): the size its beta_1 was tuned for.
PAPER_SLICE_PIXELS = 144 * 176


@dataclass(frozen=True)
class PriorSettings:
    """Everything that defines a BlindHarmony model and how it harmonizes.

    Flow: ``levels`` x ``steps_per_level`` coupling steps whose spline parameters come from
    conv nets of ``hidden_channels`` channels and ``residual_blocks`` blocks. Training:
    Adam at ``learning_rate`` with cosine annealing to 0 over ``steps`` steps of
    ``batch_size`` slices, the loss in bits per pixel after ``dequantization_bits``-bit
    uniform dequantization. Slices: along ``slice_axis`` (2: axial in the template), those
    whose brain area is at least ``min_brain_fraction`` of the largest slice's.
    Algorithm 1: ``iterations`` (N), ``alpha``, ``beta_ncc`` (beta_1), ``beta_edge`` (beta_2);
    the source's edges are the ``edge_fraction`` of brain pixels with the largest gradient.
    """

    levels: int
    steps_per_level: int
    hidden_channels: int
    residual_blocks: int
    batch_size: int
    steps: int
    learning_rate: float
    dequantization_bits: int = 12
    slice_axis: int = 2
    min_brain_fraction: float = 0.1
    iterations: int = 10
    alpha: float = 0.001
    beta_ncc: float = 1000.0
    beta_edge: float = 0.001
    edge_fraction: float = 0.08
    inference_batch: int = 16
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"

    @property
    def architecture(self) -> FlowArchitecture:
        return FlowArchitecture(
            self.levels, self.steps_per_level, self.hidden_channels, self.residual_blocks
        )


#: ``paper``: Sec. 4.2 and the public configuration (4 x 7 steps, 96 channels, 3 residual
#: blocks, batch 256, lr 5e-4, 20k steps). ``fast``: a smaller flow for a first model on one
#: GPU. ``tiny``: tests and CPU smoke runs.
PRESETS: dict[str, PriorSettings] = {
    "paper": PriorSettings(4, 7, 96, 3, 256, 20_000, 5e-4),
    "fast": PriorSettings(4, 4, 48, 2, 64, 5_000, 5e-4),
    "tiny": PriorSettings(2, 2, 8, 1, 8, 40, 1e-3),
}


@register("blindharmony")
class BlindHarmony(LearnedHarmonizer):
    """BlindHarmony: a 2D spline-flow prior trained on the target site only (Algorithm 1).

    ``preset`` (``tiny`` / ``fast`` / ``paper``) sets every field of :class:`PriorSettings`;
    keyword overrides replace single fields, and all resolved values are kept in ``params``
    (model card and every harmonized image's sidecar). Choices the paper leaves open:

    * Slices keep the volume's 1-99 % normalisation instead of the paper's per-slice min-max,
      so that harmonized slices stack back into a volume without slice-to-slice jumps.
    * Training and inference run on the :class:`~bids_harmony.harmonizers.learned.BrainBox`
      of the training masks, its in-plane sides multiples of 2^levels (the flow's squeezes);
      the output is 0 outside it. Slices are zero-padded around the centre to a multiple of
      2^levels where the grid is too small for that.
    * x0, "an averaged image of training data images", is the voxel-wise mean of the target
      volumes: every image is in template space, so it is the mean slice at the same place.
    * beta_1 multiplies the gradient of the slice's Pearson NCC scaled by
      (pixels / 144*176), so one step moves a pixel as far as in the paper's 144x176 slices
      whatever the resolution. beta_2 multiplies the gradient of ``sum M (|dx/du| + |dx/dv|)``
      (forward differences); M excludes the ``edge_fraction`` of brain pixels where the
      source's gradient magnitude is largest, the pipeline's edge share.
    * The output is x_N, the last image-space update (Algorithm 1, line 5), clipped to
      [0, 1]. Inference is not dequantized, so it is deterministic.
    * The flow runs in float32: spline inverses and LU solves lose invertibility in
      16-bit floats.
    """

    citation = ("Jeong H, Byun H, Kang DU, Lee J. BlindHarmony: \"blind\" harmonization for MR "
                "images via flow model. ICCV, 2023.")

    presets: ClassVar[tuple[str, ...]] = tuple(PRESETS)
    loss_label: ClassVar[str] = "negative log-likelihood (bits / pixel)"

    def __init__(self, preset: str = "fast", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **asdict(settings))

    # -- contract --------------------------------------------------------------------------
    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        settings = self.settings
        box = BrainBox.around([im.mask for im in reference], box_multiples(settings))
        slices = training_slices([box.crop(im) for im in reference], settings)
        run = self._run_name(slices)

        def train_flow() -> dict[str, np.ndarray]:
            height, width = slices.shape[-2:]
            flow = build_spline_flow(settings.architecture, height, width, settings.seed)
            device = resolve_device(settings.device)
            checkpoint = checkpoint_path(self.checkpoint_dir, run)
            return network_arrays(flow, fit_flow(flow.to(device), slices, settings, checkpoint))

        state = {**self._stage("flow", run, train_flow), **box.to_state()}
        state[MEAN_IMAGE] = np.mean([im.data for im in reference], axis=0).astype(np.float32)
        return state

    def _transform_sequence(self, image: Volume, state: dict[str, np.ndarray]) -> np.ndarray:
        settings = self.settings
        box = BrainBox.from_state(state)
        image = box.crop(image)  # refuses an image on another grid
        height, width = padded_slice_shape(image.data.shape, settings)
        flow = build_spline_flow(settings.architecture, height, width, settings.seed)
        flow.load_state_dict({k: torch.from_numpy(v) for k, v in network_state(state).items()})
        device = resolve_device(settings.device)
        flow.to(device).eval()
        return box.uncrop(
            harmonize_volume(flow, image, state[MEAN_IMAGE][box.index], settings, device)
        )

    def _run_name(self, slices: torch.Tensor) -> str:
        """The fingerprint of the flow's training (its checkpoint and stage), from what
        decides the weights: not the device, the checkpoint interval or the harmonization
        settings."""
        settings = {
            name: value for name, value in asdict(self.settings).items()
            if name in TRAINING_FIELDS
        }
        return fingerprint(settings, [slices.numpy()])


# -- settings ------------------------------------------------------------------------------
def _validate(settings: PriorSettings) -> None:
    """Reject settings that cannot train or harmonize, naming the parameter."""
    for name in ("levels", "steps_per_level", "hidden_channels", "residual_blocks",
                 "batch_size", "steps", "dequantization_bits", "inference_batch",
                 "checkpoint_every", "iterations"):
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"blindharmony needs {name} >= 1, got {getattr(settings, name)}")
    if not settings.learning_rate > 0:
        raise UsageError(f"blindharmony needs learning_rate > 0, got {settings.learning_rate}")
    if settings.slice_axis not in (0, 1, 2):
        raise UsageError(f"slice_axis must be 0, 1 or 2, got {settings.slice_axis}")
    if not 0.0 <= settings.alpha < 1.0:
        raise UsageError(f"alpha must lie in [0, 1), got {settings.alpha}")
    if settings.beta_ncc < 0 or settings.beta_edge < 0:
        raise UsageError("beta_ncc and beta_edge must be >= 0")
    for name in ("min_brain_fraction", "edge_fraction"):
        if not 0.0 <= getattr(settings, name) < 1.0:
            raise UsageError(f"{name} must lie in [0, 1), got {getattr(settings, name)}")
    validate_device(settings.device)


# -- slices --------------------------------------------------------------------------------
def box_multiples(settings: PriorSettings) -> list[int]:
    """What the brain box's sides must be multiples of: 2^levels in-plane, 1 across slices."""
    divisor = settings.architecture.divisor
    return [1 if axis == settings.slice_axis else divisor for axis in range(3)]


def padded_slice_shape(shape: Sequence[int], settings: PriorSettings) -> tuple[int, int]:
    """The in-plane sides of a slice, rounded up to a multiple of 2^levels."""
    divisor = settings.architecture.divisor
    in_plane = [side for axis, side in enumerate(shape) if axis != settings.slice_axis]
    return tuple(math.ceil(side / divisor) * divisor for side in in_plane)  # type: ignore[return-value]


def to_slices(volume: np.ndarray, settings: PriorSettings) -> np.ndarray:
    """(S, 1, H, W): every slice along ``slice_axis``, zero-padded around the centre."""
    slices = np.moveaxis(volume, settings.slice_axis, 0)
    height, width = padded_slice_shape(volume.shape, settings)
    pad_h, pad_w = height - slices.shape[1], width - slices.shape[2]
    padded = np.pad(
        slices, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    )
    return padded[:, None].astype(np.float32)


def from_slices(slices: np.ndarray, shape: Sequence[int], settings: PriorSettings) -> np.ndarray:
    """Inverse of :func:`to_slices`: crop the padding and restack into ``shape``."""
    in_plane = [side for axis, side in enumerate(shape) if axis != settings.slice_axis]
    top = (slices.shape[2] - in_plane[0]) // 2
    left = (slices.shape[3] - in_plane[1]) // 2
    cropped = slices[:, 0, top:top + in_plane[0], left:left + in_plane[1]]
    return np.moveaxis(cropped, 0, settings.slice_axis)


def brain_slices(mask: np.ndarray, settings: PriorSettings, min_fraction: float) -> np.ndarray:
    """Indices of the slices whose brain area is at least ``min_fraction`` of the largest
    (and at least one pixel)."""
    areas = np.moveaxis(mask.astype(bool), settings.slice_axis, 0).reshape(
        mask.shape[settings.slice_axis], -1
    ).sum(axis=1)
    if areas.max() == 0:
        return np.zeros(0, dtype=int)
    return np.flatnonzero(areas >= max(1, min_fraction * areas.max()))


def training_slices(reference: Sequence[Volume], settings: PriorSettings) -> torch.Tensor:
    """All brain slices of the target images, as one (N, 1, H, W) tensor."""
    slices = [to_slices(im.data, settings)[
            brain_slices(im.mask, settings, settings.min_brain_fraction)
        ] for im in reference]
    stacked = np.concatenate(slices)
    if stacked.shape[0] == 0:
        raise DataError("the target images have no brain slices; check their brain masks")
    return torch.from_numpy(stacked)


# -- training ------------------------------------------------------------------------------
def dequantize(images: torch.Tensor, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Quantize [0, 1] images to ``bits`` bits and spread each level uniformly over its bin,
    so the flow models a continuous density (constant background would otherwise let the
    likelihood grow without bound)."""
    levels = 2**bits
    quantized = torch.floor(images.clamp(0.0, 1.0) * (levels - 1))
    noise = torch.rand(images.shape, generator=generator).to(images.device)
    return (quantized + noise) / levels


def bits_per_pixel(flow: SplineFlow, images: torch.Tensor, bits: int) -> torch.Tensor:
    """Mean negative log-likelihood in bits per pixel of the ``bits``-bit discrete images."""
    pixels = images[0].numel()
    nats = -flow.log_prob(images).mean() / pixels
    return nats / math.log(2.0) + bits


def fit_flow(
    flow: SplineFlow, slices: torch.Tensor, settings: PriorSettings, checkpoint: Any
) -> list[float]:
    """Maximum likelihood with Adam and cosine annealing; returns the loss of every step."""
    device = next(flow.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.steps)

    def step_loss(rng: torch.Generator) -> torch.Tensor:
        index = torch.randint(slices.shape[0], (settings.batch_size,), generator=rng)
        batch = dequantize(slices[index], settings.dequantization_bits, rng).to(device)
        return bits_per_pixel(flow, batch, settings.dequantization_bits)

    return train(
        flow, optimiser, step_loss, settings.steps, generator,
        scheduler=scheduler, checkpoint=checkpoint,
        checkpoint_every=settings.checkpoint_every, description="blindharmony flow",
    )


# -- Algorithm 1 ---------------------------------------------------------------------------
def gradient_magnitude_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along the two in-plane axes (zero at the far border)."""
    d_u = torch.zeros_like(x)
    d_v = torch.zeros_like(x)
    d_u[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    d_v[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return d_u, d_v


def non_edge_mask(
    source: torch.Tensor, brain: torch.Tensor, edge_fraction: float
) -> torch.Tensor:
    """M: 1 except at the ``edge_fraction`` of brain pixels with the largest source gradient."""
    d_u, d_v = gradient_magnitude_terms(source)
    magnitude = torch.sqrt(d_u**2 + d_v**2)
    mask = torch.ones_like(source)
    for k in range(source.shape[0]):
        inside = magnitude[k][brain[k]]
        if inside.numel() and edge_fraction > 0:
            threshold = torch.quantile(inside, 1.0 - edge_fraction)
            # A flat region has no edges even where the quantile is 0.
            mask[k][(magnitude[k] >= threshold) & (magnitude[k] > 0) & brain[k]] = 0.0
    return mask


def edge_penalty_gradient(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum M (|dx/du| + |dx/dv|)`` with respect to x."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        d_u, d_v = gradient_magnitude_terms(x)
        penalty = (mask * (d_u.abs() + d_v.abs())).sum()
        (gradient,) = torch.autograd.grad(penalty, x)
    return gradient


@torch.no_grad()
def blind_harmony(
    flow: SplineFlow,
    source: torch.Tensor,
    brain: torch.Tensor,
    initial: torch.Tensor,
    settings: PriorSettings,
) -> torch.Tensor:
    """Algorithm 1 on a batch of slices: returns x_N, (B, 1, H, W)."""
    mask = non_edge_mask(source, brain, settings.edge_fraction)
    ncc_scale = settings.beta_ncc * source[0].numel() / PAPER_SLICE_PIXELS
    x = initial
    for iteration in range(settings.iterations):
        x = (
            x
            + ncc_scale * pearson_ncc_gradient(x, source)
            - settings.beta_edge * edge_penalty_gradient(x, mask)
        )
        if iteration < settings.iterations - 1:
            x = flow.decode((1.0 - settings.alpha) * flow.encode(x))
    return x


def harmonize_volume(
    flow: SplineFlow,
    image: Volume,
    mean_image: np.ndarray,
    settings: PriorSettings,
    device: torch.device,
) -> np.ndarray:
    """Algorithm 1 on every slice of ``image`` that holds brain; other slices stay 0."""
    source = to_slices(image.data, settings)
    brain = to_slices(image.mask.astype(np.float32), settings) > 0.5
    initial = to_slices(mean_image, settings)
    out = np.zeros_like(source)
    selected = brain_slices(image.mask, settings, 0.0)
    for start in range(0, selected.size, settings.inference_batch):
        index = selected[start:start + settings.inference_batch]
        result = blind_harmony(
            flow,
            torch.from_numpy(source[index]).to(device),
            torch.from_numpy(brain[index]).to(device),
            torch.from_numpy(initial[index]).to(device),
            settings,
        )
        out[index] = result.cpu().numpy()
    return np.clip(from_slices(out, image.data.shape, settings), 0.0, 1.0)
