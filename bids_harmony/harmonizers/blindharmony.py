"""BlindHarmony: a 2D normalizing-flow prior of the target site, used to harmonize any site.

Training (per sequence) fits an unconditional Neural Spline Flow
(:func:`bids_harmony.nn.spline_flow.build_spline_flow`) by maximum likelihood to axial slices
of the target-site images only. Harmonization is the paper's Algorithm 1, slice by slice:
starting from the mean target image, alternate a gradient step in image space (raise the NCC
with the source, lower the gradient magnitude where the source has no edges) with a step in
latent space (shrink ``z = f(x)`` by ``1 - alpha`` toward the Gaussian's centre), N times.

Training scores the flow on held-out target slices (bits per pixel, against the same slices
under a gamma shift) and runs Algorithm 1 with and without the flow step on a shifted slice;
the model card says when the flow adds nothing over the NCC walk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bids_harmony.errors import DataError, UsageError
from bids_harmony.harmonizers.registry import register
from bids_harmony.harmonizers.learned import (
    BrainBox,
    LearnedHarmonizer,
    machine_preset,
    monitor_arrays,
    network_arrays,
    network_state,
    resolve_settings,
    split_validation,
)
from bids_harmony.metrics import psnr
from bids_harmony.nn import Monitor, checkpoint_path, fingerprint, train
from bids_harmony.nn import distributed
from bids_harmony.nn.device import resolve_device, validate_device
from bids_harmony.nn.guidance import relative_ncc_step
from bids_harmony.nn.spline_flow import FlowArchitecture, SplineFlow, build_spline_flow
from bids_harmony.volume import Volume

MEAN_IMAGE = "mean_image"
#: The settings that decide the trained weights (a run's fingerprint).
TRAINING_FIELDS = (
    "levels", "steps_per_level", "hidden_channels", "residual_blocks", "batch_size", "steps",
    "learning_rate", "dequantization_bits", "slice_axis", "min_brain_fraction", "seed",
    "validation_images",
)
NCC_FORMS = ("cosine", "centred")
#: The known contrast shift of the diagnostics (the paper's gamma 0.7 domain).
DIAGNOSTIC_GAMMA = 0.7
#: Held-out slices the diagnostics run Algorithm 1 on (the central ones).
DIAGNOSTIC_SLICES = 4
#: Diagnostic names: bits per pixel of held-out target slices and of the same slices gamma
#: shifted; PSNR of Algorithm 1 on the shifted slices with the flow step and without it.
BITS_TARGET, BITS_SHIFTED = "bits_target", "bits_shifted"
PSNR_FLOW, PSNR_NO_FLOW = "gamma_psnr_flow", "gamma_psnr_no_flow"
#: Least bits-per-pixel gap between shifted and target slices that shows the flow tells
#: the target site from another contrast.
MIN_BITS_GAP = 0.05


@dataclass(frozen=True)
class PriorSettings:
    """Everything that defines a BlindHarmony model and how it harmonizes.

    Flow: ``levels`` x ``steps_per_level`` coupling steps whose spline parameters come from
    conv nets of ``hidden_channels`` channels and ``residual_blocks`` blocks. Training:
    Adam at ``learning_rate`` with cosine annealing to 0 over ``steps`` steps of
    ``batch_size`` slices, the loss in bits per pixel after ``dequantization_bits``-bit
    uniform dequantization. Slices: along ``slice_axis`` (2: axial in the template), those
    whose brain area is at least ``min_brain_fraction`` of the largest slice's.
    Algorithm 1: ``iterations`` (N), ``alpha``, ``ncc_step`` (beta_1 relative to the slice:
    see :class:`BlindHarmony`), ``ncc_form``, ``beta_edge`` (beta_2); the source's edges are
    the ``edge_fraction`` of brain pixels with the largest gradient. Diagnostics:
    ``validation_images`` target images held out of training (when two stay), scored every
    ``monitor_every`` steps.
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
    ncc_step: float = 0.2
    ncc_form: str = "cosine"
    beta_edge: float = 0.0
    edge_fraction: float = 0.08
    inference_batch: int = 16
    validation_images: int = 1
    monitor_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"

    @property
    def architecture(self) -> FlowArchitecture:
        return FlowArchitecture(
            self.levels, self.steps_per_level, self.hidden_channels, self.residual_blocks
        )


#: ``cpu``: the default without a GPU, ~8 min on 2 cores at 2 mm. ``fast``: a smaller flow
#: for a first model on one GPU. ``paper``: Sec. 4.2 and the public configuration (4 x 7
#: steps, 96 channels, 3 residual blocks, batch 256, lr 5e-4, 20k steps). ``tiny``: tests.
PRESETS: dict[str, PriorSettings] = {
    "cpu": PriorSettings(4, 2, 32, 1, 16, 1200, 5e-4, monitor_every=400),
    "fast": PriorSettings(4, 4, 48, 2, 64, 5_000, 5e-4, monitor_every=1000),
    "paper": PriorSettings(4, 7, 96, 3, 256, 20_000, 5e-4, beta_edge=0.001,
                           monitor_every=2000),
    "tiny": PriorSettings(2, 2, 8, 1, 8, 40, 1e-3, monitor_every=20),
}
#: Measured seconds per training step on 2 CPU cores, for the time printed before training.
CPU_SECONDS_PER_STEP = {"cpu": 0.38, "tiny": 0.01}


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
    * The NCC is taken inside the slice's brain mask, as the uncentred cosine of the public
      code (``ncc_form='cosine'``; ``'centred'``: Pearson). Over the whole slice it is
      dominated by the brain/background contrast. Measured on the training heads at 2 mm,
      the cosine beats the source on both real-style sites, the Pearson form loses on one.
    * beta_1 is relative: the step is ``ncc_step * ||x||²`` times the NCC gradient (norms
      over the slice's brain), so each iteration turns the slice by ``ncc_step`` of its angle
      to the source whatever the brain area. A fixed beta_1 diverges on the small slices at
      the top and bottom of the brain (5-7 dB there). The paper's beta_1 = 1000 on its
      144x176 slices is about ``ncc_step`` 0.3; 0.2 (with the paper's N = 10) keeps ~10 %
      of the mean image's angle to the source. Chosen leave-one-out on the training heads
      at 2 mm (each head's mean image from the other three): +0.29 / +0.14 dB over the
      source on the GE- / Philips-style sites, against +0.04 / +0.26 for the converged walk
      (0.3; its limit is the source rescaled per slice) and +0.43 / -0.37 for 0.15.
      beta_2 multiplies the gradient of ``sum M (|dx/du| + |dx/dv|)`` (forward
      differences); M excludes the ``edge_fraction`` of brain pixels where the source's
      gradient magnitude is largest, the pipeline's edge share. Image-space steps change
      only brain pixels. beta_2 is 0 except in the ``paper`` preset (0.001): on the
      training heads at 2 mm the paper's value cost 0.3 dB on the Philips-style site and
      1 dB on the gamma domain for 0.1 dB on the GE-style one.
    * The output is x_N, the last image-space update (Algorithm 1, line 5), clipped to
      [0, 1]. Inference is not dequantized, so it is deterministic.
    * The flow runs in float32: spline inverses and LU solves lose invertibility in
      16-bit floats.
    """

    citation = ("Jeong H, Byun H, Kang DU, Lee J. BlindHarmony: \"blind\" harmonization for MR "
                "images via flow model. ICCV, 2023.")

    #: ``auto``: ``cpu`` where training runs on the CPU, else ``fast``.
    presets: ClassVar[tuple[str, ...]] = ("auto", *PRESETS)
    loss_label: ClassVar[str] = "negative log-likelihood (bits / pixel)"

    def __init__(self, preset: str = "auto", checkpoint_dir: Path | None = None,
                 **overrides: Any) -> None:
        preset = machine_preset(preset, overrides.get("device", "auto"))
        settings = resolve_settings(self.name, PRESETS, preset, overrides)
        _validate(settings)
        self.settings = settings
        super().__init__(preset=preset, checkpoint_dir=checkpoint_dir, **asdict(settings))

    # -- contract --------------------------------------------------------------------------
    def _fit_sequence(self, reference: Sequence[Volume]) -> dict[str, np.ndarray]:
        settings = self.settings
        box = BrainBox.around([im.mask for im in reference], box_multiples(settings))
        cropped = [box.crop(im) for im in reference]
        training, validation = split_validation(cropped, settings.validation_images)
        slices = training_slices(training, settings)
        mean_image = np.mean([im.data for im in training], axis=0).astype(np.float32)
        run = self._run_name(slices)

        def train_flow() -> dict[str, np.ndarray]:
            height, width = slices.shape[-2:]
            flow = build_spline_flow(settings.architecture, height, width, settings.seed)
            device = resolve_device(settings.device)
            checkpoint = checkpoint_path(self.checkpoint_dir, run)
            self._announce(settings.steps, CPU_SECONDS_PER_STEP.get(self.params["preset"]))
            scored = validation or training
            monitor = Monitor(
                lambda: flow_diagnostics(flow, scored, mean_image, settings, device),
                settings.monitor_every,
            )
            losses = fit_flow(flow.to(device), slices, settings, checkpoint, monitor)
            return {**network_arrays(flow, losses),
                    **monitor_arrays(monitor.history, {}, held_out=bool(validation))}

        state = {**self._stage("flow", run, train_flow), **box.to_state()}
        state[MEAN_IMAGE] = box.uncrop(mean_image)
        return state

    def _diagnose(self, diagnostics: dict[str, Any]) -> list[str]:
        """Warn when the flow does not tell the target contrast from a shifted one, or when
        Algorithm 1 does no better with the flow step than without it."""
        final = diagnostics["history"][-1]
        warnings = []
        gap = final[BITS_SHIFTED] - final[BITS_TARGET]
        if gap < MIN_BITS_GAP:
            warnings.append(
                f"the flow gives {diagnostics['scored_on']} target slices "
                f"{final[BITS_TARGET]:.2f} bits/pixel and gamma-shifted ones "
                f"{final[BITS_SHIFTED]:.2f}: it does not "
                "tell the target contrast from another; train longer or on a GPU (--preset fast)"
            )
        if final[PSNR_FLOW] <= final[PSNR_NO_FLOW]:
            warnings.append(
                f"Algorithm 1 scores {final[PSNR_FLOW]:.2f} dB with the flow step and "
                f"{final[PSNR_NO_FLOW]:.2f} dB without it on a gamma-shifted target slice: "
                "the prior adds nothing, the harmonization is the NCC walk from the mean image"
            )
        return warnings

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
                 "checkpoint_every", "iterations", "monitor_every"):
        if int(getattr(settings, name)) < 1:
            raise UsageError(f"blindharmony needs {name} >= 1, got {getattr(settings, name)}")
    if not settings.learning_rate > 0:
        raise UsageError(f"blindharmony needs learning_rate > 0, got {settings.learning_rate}")
    if settings.slice_axis not in (0, 1, 2):
        raise UsageError(f"slice_axis must be 0, 1 or 2, got {settings.slice_axis}")
    if not 0.0 <= settings.alpha < 1.0:
        raise UsageError(f"alpha must lie in [0, 1), got {settings.alpha}")
    if settings.ncc_step < 0 or settings.beta_edge < 0:
        raise UsageError("ncc_step and beta_edge must be >= 0")
    if settings.ncc_form not in NCC_FORMS:
        raise UsageError(
            f"ncc_form must be one of {', '.join(NCC_FORMS)}, got {settings.ncc_form!r}"
        )
    if settings.validation_images < 0:
        raise UsageError(f"validation_images must be >= 0, got {settings.validation_images}")
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


def bits_per_pixel(log_prob: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Mean negative log-likelihood in bits per pixel of the ``bits``-bit discrete images
    (``log_prob``: the flow's, or its training replica)."""
    pixels = images[0].numel()
    nats = -log_prob(images).mean() / pixels
    return nats / math.log(2.0) + bits


def fit_flow(
    flow: SplineFlow, slices: torch.Tensor, settings: PriorSettings, checkpoint: Any,
    monitor: Monitor | None = None,
) -> list[float]:
    """Maximum likelihood with Adam and cosine annealing; returns the loss of every step."""
    device = next(flow.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.steps)

    if distributed.world_size() > 1:
        # ActNorm initialises itself from the first batch it sees in training mode, which
        # differs between ranks: do it before DDP broadcasts rank 0's weights to all.
        with torch.no_grad():
            index = torch.randint(slices.shape[0], (settings.batch_size,),
                                  generator=torch.Generator().manual_seed(settings.seed))
            flow.log_prob(dequantize(slices[index], settings.dequantization_bits,
                                     torch.Generator().manual_seed(settings.seed)).to(device))
    log_prob = distributed.replicate(flow, "log_prob")

    def step_loss(rng: torch.Generator) -> torch.Tensor:
        index = torch.randint(slices.shape[0], (settings.batch_size,), generator=rng)
        batch = dequantize(slices[index], settings.dequantization_bits, rng).to(device)
        return bits_per_pixel(log_prob, batch, settings.dequantization_bits)

    return train(
        flow, optimiser, step_loss, settings.steps, generator,
        scheduler=scheduler, monitor=monitor, checkpoint=checkpoint,
        checkpoint_every=settings.checkpoint_every, description="blindharmony flow",
    )


def gamma_shifted(slices: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The diagnostics' known domain shift: min-max inside the brain, ``x ** 0.7``,
    min-max again (the paper's gamma domain), 0 outside the brain."""
    out = np.zeros_like(slices)
    for k in range(slices.shape[0]):
        inside = brain[k]
        if not inside.any():
            continue
        values = slices[k][inside]
        low, high = values.min(), values.max()
        shifted = ((values - low) / max(high - low, 1e-6)) ** DIAGNOSTIC_GAMMA
        out[k][inside] = (shifted - shifted.min()) / max(shifted.max() - shifted.min(), 1e-6)
    return out


@torch.no_grad()
def flow_diagnostics(
    flow: SplineFlow, scored: Sequence[Volume], mean_image: np.ndarray,
    settings: PriorSettings, device: torch.device,
) -> dict[str, float]:
    """Bits per pixel of the scored images' brain slices and of the same slices gamma
    shifted (a flow that models the target gives the shifted ones more), and the PSNR of
    Algorithm 1 on the central shifted slices with the flow step and without it (alpha 0)."""
    was_training = flow.training
    flow.eval()
    bits, bits_shifted, with_flow, without_flow = [], [], [], []
    initial_all = to_slices(mean_image, settings)
    for image in scored:
        index = brain_slices(image.mask, settings, settings.min_brain_fraction)
        target = to_slices(image.data, settings)[index]
        brain = to_slices(image.mask.astype(np.float32), settings)[index] > 0.5
        shifted = gamma_shifted(target, brain)
        quantize = 2**settings.dequantization_bits
        for values, out in ((target, bits), (shifted, bits_shifted)):
            centred = (np.floor(np.clip(values, 0, 1) * (quantize - 1)) + 0.5) / quantize
            out.append(float(bits_per_pixel(
                flow.log_prob, torch.from_numpy(centred).to(device), settings.dequantization_bits)))
        middle = len(index) // 2
        chosen = slice(max(0, middle - DIAGNOSTIC_SLICES // 2),
                       middle - DIAGNOSTIC_SLICES // 2 + DIAGNOSTIC_SLICES)
        tensors = [torch.from_numpy(a[chosen]).to(device)
                   for a in (shifted, brain, initial_all[index])]
        truth = target[chosen]
        for alpha, out in ((settings.alpha, with_flow), (0.0, without_flow)):
            result = blind_harmony(flow, *tensors, replace(settings, alpha=alpha)).cpu().numpy()
            out.append(psnr(np.clip(result, 0, 1), truth, brain[chosen]))
    flow.train(was_training)
    return {BITS_TARGET: float(np.mean(bits)), BITS_SHIFTED: float(np.mean(bits_shifted)),
            PSNR_FLOW: float(np.mean(with_flow)), PSNR_NO_FLOW: float(np.mean(without_flow))}


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
    """Algorithm 1 on a batch of slices: returns x_N, (B, 1, H, W).

    With ``alpha`` 0 the latent step is the identity and is skipped: the NCC walk alone, the
    ablation the diagnostics compare with.
    """
    mask = non_edge_mask(source, brain, settings.edge_fraction)
    inside = brain.to(source.dtype)
    x = initial * inside
    for iteration in range(settings.iterations):
        x = relative_ncc_step(x, source, brain, settings.ncc_step,
                              centred=settings.ncc_form == "centred")
        if settings.beta_edge > 0:
            x = x - settings.beta_edge * edge_penalty_gradient(x, mask) * inside
        if iteration < settings.iterations - 1 and settings.alpha > 0:
            x = flow.decode((1.0 - settings.alpha) * flow.encode(x)) * inside
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
