"""Ψ, the frozen style encoder of SGCD's stage 2 (§3.2.2), and its style losses.

A style vector is ``S = Ψ(M) - Ψ(M→U)``: an image's embedding minus that of its "unified"
counterpart of the same anatomy, so the anatomy cancels and the style remains. The paper's Ψ is
BiomedCLIP, which cannot be had offline; ``psi`` picks a substitute (design notes §2.1):

- ``style-contrastive`` (default): a small 2D slice encoder trained with InfoNCE so that two
  anatomies under the same random style transform embed alike; it needs no site labels.
- ``site-contrastive``: the same encoder trained with supervised contrast on site labels.
- ``random-gram``: statistics of fixed random convolutions, no training (tests, ablation).
- ``biomedclip:DIR`` / ``clip:DIR``: an open_clip visual tower from local weights (the paper's
  setting and its SGCDw/oB ablation); needs the optional ``clip`` extra.

Ψ is 2D, the volumes are 3D, and the paper is silent on how the two meet; as in MMH's code,
:class:`TriPlanarEncoder` embeds evenly spaced slices along each axis and averages them.
Every encoder returned is frozen (no parameter requires grad, eval mode) yet differentiable
with respect to its input, so the style losses can train the diffusion model through it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bids_harmony.errors import UsageError
from bids_harmony.nn import distributed
from bids_harmony.nn.training import train

PSI_BACKENDS = ("style-contrastive", "site-contrastive", "random-gram", "biomedclip", "clip")
#: The backends that read pretrained open_clip weights from a directory (``name:DIR``).
CLIP_BACKENDS = ("biomedclip", "clip")
#: Volumes are brain-box crops: slices come from the central 80 % of each axis.
BRAIN_BOX_MARGIN = 0.1
SLICES_PER_AXIS = 12
SLICE_SIZE = 64
#: Channels of :class:`SliceEncoder`'s four stride-2 stages.
CHANNELS = (16, 32, 64, 128)
#: Channels of the random convolution stack of ``random-gram``.
GRAM_CHANNELS = (8, 16, 32)
LEAKY_SLOPE = 0.2
#: Width of :class:`SliceEncoder`'s embedding, a linear map of its style statistics.
EMBEDDING = 128
TEMPERATURE = 0.1
LEARNING_RATE = 1e-3
#: Style transforms per InfoNCE step (each applied to two anatomies).
PAIRS = 16
#: Random slices per axis and volume in a training step (inference uses ``SLICES_PER_AXIS``).
VIEW_SLICES = 4
#: Floor of a variance under the square root of a standard deviation (finite gradients).
VARIANCE_FLOOR = 1e-6

#: Ranges of the random style transforms of ``style-contrastive``, on [0, 1] intensities.
CURVE_KNOTS = 5
CURVE_SPREAD = 0.75  # log-normal spread of the curve's segment slopes
MAX_BLUR_SIGMA = 1.5  # voxels, along one random axis
MAX_RICIAN_NOISE = 0.05
MAX_BIAS_AMPLITUDE = 0.2

#: open_clip's size of an input image, and OpenAI CLIP's channel mean and std.
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The weights files open_clip's ``local-dir:`` prefers, in its order of preference.
CLIP_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
CLIP_EXTRA = "pip install 'bids_harmony[clip]' (torch 2.14.1 with torchvision 0.29.1)"

LIMITATIONS = {
    "style-contrastive": (
        "The style encoder learned only global monotone intensity curves, blur, Rician noise "
        "and smooth bias fields (no tissue-dependent gains, which the benchmark's simulated "
        "scanners add), so it may miss style differences outside that family."
    ),
    "site-contrastive": (
        "The style encoder learned whatever separates the training sites; without traveling "
        "subjects, anatomy and demographics confounded with site can enter the style vectors."
    ),
    "random-gram": (
        "The style encoder is untrained random convolution statistics: an ablation and test "
        "setting, not a learned notion of style."
    ),
    "biomedclip": (
        "The paper's BiomedCLIP, applied to tri-planar 2D slices averaged over the volume, a "
        "3D aggregation the paper does not specify."
    ),
    "clip": (
        "CLIP pretrained on natural images (the paper's SGCDw/oB ablation) lacks medical "
        "domain knowledge of site-related style."
    ),
}

#: Keys of :func:`encoder_arrays`, prefixed so they can share a stage's result with others.
ARRAY_PREFIX = "psi."
WEIGHTS_PREFIX = ARRAY_PREFIX + "weights."
#: The key of Ψ's card description in a stage result (outside ``psi.``: not a weight).
DESCRIPTION_KEY = "psi_description"


# --- style vectors and losses ------------------------------------------------------------


def style_vector(encoder: nn.Module, image: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    """``Ψ(image) - Ψ(unified)`` (Eq. 12); both go through Ψ in one batch."""
    embeddings = encoder(torch.cat([image, unified]))
    return embeddings[: image.shape[0]] - embeddings[image.shape[0]:]


def style_reconstruction_loss(
    s_target: torch.Tensor, s_reconstructed: torch.Tensor
) -> torch.Tensor:
    """``L_R = ||S_T - S_T→T||_1``, the L1 distance averaged over the feature dimension (so
    its scale does not grow with Ψ's width) and over the batch; features are the last dim."""
    return (s_target - s_reconstructed).abs().mean(-1).mean()


def style_translation_loss(s_target: torch.Tensor, s_translated: torch.Tensor) -> torch.Tensor:
    """``L_S = ||S_T - S_X→T||_1 + (1 - cos(S_T, S_X→T))`` (Eq. 13), batch mean.

    The L1 term is averaged over the feature dimension, as in
    :func:`style_reconstruction_loss`; the cosine term penalises the direction apart from the
    size and lies in [0, 2].
    """
    cosine = nn.functional.cosine_similarity(s_target, s_translated, dim=-1)
    return style_reconstruction_loss(s_target, s_translated) + (1.0 - cosine).mean()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def style_updates(
    optimiser: torch.optim.Optimizer, parameters: Sequence[nn.Parameter], encoder: nn.Module,
    s_target: torch.Tensor, translations: Iterable[torch.Tensor],
    reconstructions: Iterable[torch.Tensor], unified_source: torch.Tensor,
    unified_target: torch.Tensor, render: Callable[[torch.Tensor], torch.Tensor] = _identity,
    clip_norm: float = 1.0,
) -> float:
    """The fine harmonizer's updates (SGCD Algorithm 2, UMH Eq. 11): for each pair of
    estimates the two reverse chains yield (a source translated, a target re-rendered),
    ``L_S + L_R`` through Ψ and one clipped optimiser step; the mean loss.

    ``render`` turns an estimate into the volume Ψ sees (UMH: the decoder of its latents);
    the chains must yield lazily (:func:`bids_harmony.nn.ddim.reverse_last_k`), so that each
    estimate is made with the weights the previous update left.
    """
    losses = []
    for translated, reconstructed in zip(translations, reconstructions):
        loss = style_translation_loss(
            s_target, style_vector(encoder, render(translated), unified_source)
        ) + style_reconstruction_loss(
            s_target, style_vector(encoder, render(reconstructed), unified_target))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parameters), clip_norm)
        optimiser.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


# --- the psi setting -----------------------------------------------------------------------


def parse_psi(psi: str) -> tuple[str, Path | None]:
    """The backend and weights directory that a ``psi`` setting names."""
    name, separator, directory = psi.partition(":")
    known = "style-contrastive, site-contrastive, random-gram, biomedclip:DIR or clip:DIR"
    if name not in PSI_BACKENDS:
        raise UsageError(f"unknown psi {psi!r}; use one of {known}")
    if name not in CLIP_BACKENDS:
        if separator:
            raise UsageError(f"psi={name} takes no directory, got {psi!r}; use psi={name}")
        return name, None
    if not directory:
        raise UsageError(
            f"psi={name} needs the directory of its open_clip weights: use psi={name}:DIR"
        )
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(
            f"psi={psi}: directory {path} does not exist; give the folder that holds "
            "open_clip_config.json and the weights"
        )
    return name, path


# --- slice encoders and their tri-planar application ---------------------------------------


class SliceEncoder(nn.Module):
    """Four stride-2 3x3 convolutions with LeakyReLU; a linear map of the per-channel mean and
    standard deviation of every stage's features is the embedding (~0.16 M parameters).

    Means and deviations are style statistics (as in AdaIN-style losses): they describe
    intensity, contrast and texture at each scale but not where things are; the linear map
    lets training weigh them. No normalisation layer: it would divide out the very intensity
    statistics Ψ must see. Weights are drawn from ``generator`` only (the global random state
    is left alone).
    """

    def __init__(
        self, channels: Sequence[int] = CHANNELS, *, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.convs = _conv_stack(self.channels, generator)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.project = nn.utils.skip_init(nn.Linear, 2 * sum(self.channels), EMBEDDING)
        nn.init.kaiming_normal_(self.project.weight, nonlinearity="linear", generator=generator)
        nn.init.zeros_(self.project.bias)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``slices``: (N, 1, H, W) -> (N, EMBEDDING)."""
        statistics = []
        h = slices
        for conv in self.convs:
            h = self.act(conv(h))
            statistics.append(_mean_std(h))
        return self.project(torch.cat(statistics, dim=1))


class RandomGramEncoder(nn.Module):
    """Fixed random stride-2 convolutions; the last stage's channel means, standard
    deviations and the upper triangle of its channel Gram matrix are the embedding.

    Untrained: it asks whether training Ψ matters, and serves the quick tests.
    """

    def __init__(
        self, channels: Sequence[int] = GRAM_CHANNELS, *, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.convs = _conv_stack(self.channels, generator)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``slices``: (N, 1, H, W) -> (N, 2 C + C (C + 1) / 2) with C the last channels."""
        h = slices
        for conv in self.convs:
            h = self.act(conv(h))
        flat = h.flatten(2)
        gram = flat @ flat.transpose(1, 2) / flat.shape[2]
        rows, cols = torch.triu_indices(h.shape[1], h.shape[1], device=h.device)
        return torch.cat([_mean_std(h), gram[:, rows, cols]], dim=1)


class ClipSliceEncoder(nn.Module):
    """An open_clip visual tower applied to MRI slices as MMH does: intensities from [-1, 1]
    to [0, 1], zero-padded to 224 x 224 (shrunk first only if larger), three channels,
    OpenAI's mean and standard deviation."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        image = (slices + 1.0) / 2.0
        height, width = image.shape[-2:]
        if max(height, width) > CLIP_SIZE:
            scale = CLIP_SIZE / max(height, width)
            image = nn.functional.interpolate(
                image, size=(int(height * scale), int(width * scale)), mode="bilinear",
                align_corners=False,
            )
            height, width = image.shape[-2:]
        top, left = (CLIP_SIZE - height) // 2, (CLIP_SIZE - width) // 2
        image = nn.functional.pad(
            image, (left, CLIP_SIZE - width - left, top, CLIP_SIZE - height - top)
        )
        return self.visual((image.expand(-1, 3, -1, -1) - self.mean) / self.std)


class TriPlanarEncoder(nn.Module):
    """A 2D slice encoder applied to a 3D volume: the mean embedding of tri-planar slices.

    The paper does not say how a 2D Ψ meets 3D volumes; MMH's code embeds tri-planar slices,
    and so does this: ``slices_per_axis`` evenly spaced slices along each axis, inside the
    central 80 % of the axis (the volume is already the brain-box crop, whose edges hold little
    brain), each resized to ``slice_size`` squared (bilinear; ``None`` keeps the size, for
    encoders that pad), embedded, and averaged.
    """

    def __init__(
        self, slice_encoder: nn.Module, slices_per_axis: int = SLICES_PER_AXIS,
        slice_size: int | None = SLICE_SIZE,
    ) -> None:
        super().__init__()
        if slices_per_axis < 1:
            raise ValueError(f"slices_per_axis must be >= 1, got {slices_per_axis}")
        self.slice_encoder = slice_encoder
        self.slices_per_axis = slices_per_axis
        self.slice_size = slice_size

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``volume``: (B, 1, X, Y, Z) in [-1, 1] -> (B, features)."""
        return self.embed_slices(volume, slice_positions(volume.shape[2:], self.slices_per_axis))

    def embed_slices(
        self, volume: torch.Tensor, positions: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The mean embedding of the slices at ``positions`` (one index tensor per axis)."""
        batch = volume.shape[0]
        embeddings = []
        for axis, index in enumerate(positions):
            picked = volume.index_select(axis + 2, index.to(volume.device)).movedim(axis + 2, 1)
            slices = picked.reshape(batch * len(index), 1, *picked.shape[-2:])
            if self.slice_size is not None:
                slices = nn.functional.interpolate(
                    slices, size=(self.slice_size, self.slice_size), mode="bilinear",
                    align_corners=False,
                )
            embeddings.append(self.slice_encoder(slices).view(batch, len(index), -1))
        return torch.cat(embeddings, dim=1).mean(dim=1)


def slice_positions(shape: Sequence[int], count: int) -> list[torch.Tensor]:
    """``count`` evenly spaced slice indices per axis inside the central 80 % of each side."""
    return [torch.linspace(*_box(side), count).round().long() for side in shape]


def random_slice_positions(
    shape: Sequence[int], count: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``count`` uniformly drawn slice indices per axis inside the central 80 % of each side."""
    positions = []
    for side in shape:
        low, high = _box(side)
        draw = torch.rand(count, generator=generator)
        positions.append((low + (high - low) * draw).round().long())
    return positions


# --- style transforms (the augmentations of style-contrastive) -----------------------------


@dataclass(frozen=True)
class StyleTransforms:
    """A batch of random style transforms, one per row (all on the CPU).

    ``knots``: (B, CURVE_KNOTS) values of a monotone piecewise-linear intensity curve at
    evenly spaced inputs, from 0 to 1; ``blur_sigma`` / ``blur_axis``: a Gaussian blur along
    one axis; ``noise``: the Rician noise level; ``bias_coefficients`` / ``bias_amplitude``: a
    smooth multiplicative field from a second-order polynomial, within 1 ± amplitude.
    """

    knots: torch.Tensor
    blur_sigma: torch.Tensor
    blur_axis: torch.Tensor
    noise: torch.Tensor
    bias_coefficients: torch.Tensor
    bias_amplitude: torch.Tensor

    def repeat(self, times: int) -> StyleTransforms:
        """The batch repeated ``times`` times (the same transforms for more volumes)."""
        return StyleTransforms(**{
            name: torch.cat([getattr(self, name)] * times)
            for name in (field.name for field in fields(self))
        })


def draw_style_transforms(count: int, generator: torch.Generator) -> StyleTransforms:
    """``count`` random global style transforms, drawn from ``generator``.

    No tissue-dependent gains: the benchmark's simulated scanners apply them, so a Ψ trained
    on that family would rig the benchmark; the curve maps every voxel alike.
    """
    slopes = torch.exp(CURVE_SPREAD * torch.randn(count, CURVE_KNOTS - 1, generator=generator))
    knots = torch.cat([torch.zeros(count, 1), slopes.cumsum(1)], dim=1)
    return StyleTransforms(
        knots=knots / knots[:, -1:],
        blur_sigma=MAX_BLUR_SIGMA * torch.rand(count, generator=generator),
        blur_axis=torch.randint(0, 3, (count,), generator=generator),
        noise=MAX_RICIAN_NOISE * torch.rand(count, generator=generator),
        bias_coefficients=2.0 * torch.rand(count, 9, generator=generator) - 1.0,
        bias_amplitude=MAX_BIAS_AMPLITUDE * torch.rand(count, generator=generator),
    )


def apply_style_transforms(
    volumes: torch.Tensor, transforms: StyleTransforms, generator: torch.Generator
) -> torch.Tensor:
    """Row ``i`` of ``transforms`` applied to volume ``i`` of (B, 1, X, Y, Z) in [-1, 1].

    Inside the brain (voxels above -1), on [0, 1] intensities: the intensity curve, the bias
    field, the blur, then Rician noise (drawn from ``generator``), clipped to [0, 1];
    the background stays -1.
    """
    device = volumes.device
    brain = volumes > -1.0
    intensity = _monotone_curve((volumes + 1.0) / 2.0, transforms.knots.to(device))
    intensity = intensity * _bias_field(
        volumes.shape[2:], transforms.bias_coefficients.to(device),
        transforms.bias_amplitude.to(device),
    )
    intensity = _blur_along_axis(
        intensity, transforms.blur_sigma.to(device), transforms.blur_axis.to(device)
    )
    noise = torch.randn((2, *volumes.shape), generator=generator).to(device)
    level = transforms.noise.to(device).view(-1, 1, 1, 1, 1)
    intensity = torch.sqrt((intensity + level * noise[0]) ** 2 + (level * noise[1]) ** 2)
    return torch.where(brain, 2.0 * intensity.clamp(0.0, 1.0) - 1.0, -1.0)


# --- contrastive objectives and training ---------------------------------------------------


def info_nce_loss(
    first: torch.Tensor, second: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """Symmetric InfoNCE: row ``i`` of ``first`` and of ``second`` are positives, every other
    row a negative; cosine similarities over ``temperature``."""
    logits = nn.functional.normalize(first, dim=1) @ nn.functional.normalize(second, dim=1).T
    labels = torch.arange(first.shape[0], device=first.device)
    return 0.5 * (
        nn.functional.cross_entropy(logits / temperature, labels)
        + nn.functional.cross_entropy(logits.T / temperature, labels)
    )


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020, L_out): rows with the same label are positives; the mean
    over anchors that have one of the mean log-probability of their positives."""
    z = nn.functional.normalize(embeddings, dim=1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, -math.inf)
    log_probability = logits.log_softmax(dim=1).masked_fill(self_mask, 0.0)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    anchored = counts > 0
    per_anchor = (log_probability * positives).sum(1)[anchored] / counts[anchored]
    return -per_anchor.mean()


def train_style_contrastive(
    volumes: Sequence[np.ndarray], *, steps: int, seed: int, device: torch.device,
    pairs: int = PAIRS, view_slices: int = VIEW_SLICES, slice_size: int = SLICE_SIZE,
) -> tuple[TriPlanarEncoder, list[float]]:
    """A :class:`SliceEncoder` trained with InfoNCE to embed style, not anatomy; frozen.

    Each step draws ``pairs`` style transforms and as many distinct volumes ``a_0 .. a_P-1``;
    transform ``p`` is applied to ``a_p`` and to ``a_p+1`` (different anatomies: a positive
    pair), each embedded from a random slice set. Every other transform is a negative, and one
    of them is the anchor's own anatomy under another transform, so encoding anatomy does not
    help. The step's embeddings are centred before the loss: Ψ is only used through
    differences, so a common offset must not count (at the start it makes every cosine ~1 and
    the loss nearly flat). Every random draw (weights included) comes from
    ``torch.Generator(seed)``; Adam at 1e-3, temperature 0.1. Returns the encoder and the loss
    of every step.
    """
    data = _stack(volumes, device)
    if data.shape[0] < 2:
        raise UsageError(
            f"psi=style-contrastive needs at least 2 training images, got {data.shape[0]}; "
            "use psi=random-gram"
        )
    _check_steps(steps)
    generator = torch.Generator().manual_seed(seed)
    encoder = TriPlanarEncoder(
        SliceEncoder(generator=generator), SLICES_PER_AXIS, slice_size
    ).to(device)
    count = min(pairs, data.shape[0])
    embed = distributed.replicate(encoder, "embed_slices")

    def step_loss(rng: torch.Generator) -> torch.Tensor:
        order = torch.randperm(data.shape[0], generator=rng)[:count]
        transforms = draw_style_transforms(count, rng).repeat(2)
        batch = data[torch.cat([order, order.roll(-1)]).to(device)]
        styled = apply_style_transforms(batch, transforms, rng)
        positions = random_slice_positions(data.shape[2:], view_slices, rng)
        embeddings = embed(styled, positions)
        first, second = (embeddings - embeddings.mean(dim=0)).chunk(2)
        return info_nce_loss(first, second)

    optimiser = torch.optim.Adam(encoder.parameters(), lr=LEARNING_RATE)
    losses = train(encoder, optimiser, step_loss, steps, generator,
                   description="psi style-contrastive")
    return _frozen(encoder), losses


def train_site_contrastive(
    volumes: Sequence[np.ndarray], sites: Sequence[str], *, steps: int, seed: int,
    device: torch.device, batch: int = PAIRS, view_slices: int = VIEW_SLICES,
    slice_size: int = SLICE_SIZE,
) -> tuple[TriPlanarEncoder, list[float]]:
    """A :class:`SliceEncoder` trained with supervised contrast on site labels; frozen.

    Risk: without traveling subjects, anatomy and demographics are confounded with site, and
    Ψ may learn them as "style". Each step draws about ``batch`` volumes, as many from each
    site (without repeats while a site has enough), embedded from one random slice set.
    """
    data = _stack(volumes, device)
    if len(sites) != data.shape[0]:
        raise ValueError(f"{data.shape[0]} volumes but {len(sites)} sites")
    names = sorted(set(sites))
    if len(names) < 2:
        raise UsageError(
            f"psi=site-contrastive needs images from at least 2 sites, got {names}; "
            "use psi=style-contrastive"
        )
    _check_steps(steps)
    labels = torch.tensor([names.index(site) for site in sites])
    members = [torch.nonzero(labels == label).flatten() for label in range(len(names))]
    per_site = max(2, batch // len(names))
    generator = torch.Generator().manual_seed(seed)
    encoder = TriPlanarEncoder(
        SliceEncoder(generator=generator), SLICES_PER_AXIS, slice_size
    ).to(device)
    embed = distributed.replicate(encoder, "embed_slices")

    def step_loss(rng: torch.Generator) -> torch.Tensor:
        chosen = torch.cat([
            group[torch.randperm(len(group), generator=rng).repeat(
                math.ceil(per_site / len(group)))[:per_site]]
            for group in members
        ])
        positions = random_slice_positions(data.shape[2:], view_slices, rng)
        embeddings = embed(data[chosen.to(device)], positions)
        return supervised_contrastive_loss(embeddings, labels[chosen].to(device))

    optimiser = torch.optim.Adam(encoder.parameters(), lr=LEARNING_RATE)
    losses = train(encoder, optimiser, step_loss, steps, generator,
                   description="psi site-contrastive")
    return _frozen(encoder), losses


def random_gram_encoder(seed: int, device: torch.device) -> TriPlanarEncoder:
    """The untrained ``random-gram`` Ψ, its weights drawn from ``torch.Generator(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return _frozen(TriPlanarEncoder(RandomGramEncoder(generator=generator)).to(device))


# --- building, describing, storing ---------------------------------------------------------


def build_style_encoder(
    psi: str, volumes: Sequence[np.ndarray], sites: Sequence[str], *, steps: int, seed: int,
    device: torch.device,
) -> tuple[TriPlanarEncoder, dict]:
    """The frozen Ψ that ``psi`` names, trained on ``volumes`` where it learns, and its
    description for the model card (see :func:`describe_style_encoder`).

    ``volumes``: the training images' brain boxes, 3D float32 in [-1, 1], all one shape;
    ``sites``: their site labels (read by ``site-contrastive`` only). ``steps`` applies to the
    trained backends.
    """
    name, directory = parse_psi(psi)
    losses: list[float] = []
    if name == "style-contrastive":
        encoder, losses = train_style_contrastive(volumes, steps=steps, seed=seed, device=device)
    elif name == "site-contrastive":
        encoder, losses = train_site_contrastive(
            volumes, sites, steps=steps, seed=seed, device=device
        )
    elif name == "random-gram":
        encoder = random_gram_encoder(seed, device)
    else:
        encoder = _clip_encoder(name, directory, device)  # type: ignore[arg-type]
    return encoder, describe_style_encoder(psi, encoder, losses)


def describe_style_encoder(
    psi: str, encoder: TriPlanarEncoder, losses: Sequence[float]
) -> dict:
    """What the model card says about Ψ: backend, SHA-256 of its weights (the weights file
    for open_clip, else the sorted state dict), training steps, final loss, whether it is the
    paper's setting, and its limitation."""
    name, directory = parse_psi(psi)
    if directory is None:
        digest = hashlib.sha256()
        for key, tensor in sorted(encoder.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        sha256 = digest.hexdigest()
    else:
        sha256 = _file_sha256(_clip_weights_file(name, directory))
    return {
        "psi": name,
        "sha256": sha256,
        "trained_steps": len(losses),
        "final_loss": float(losses[-1]) if losses else None,
        "paper_setting": name == "biomedclip",
        "limitation": LIMITATIONS[name],
    }


def style_encoder_stage(
    psi: str, volumes: Sequence[np.ndarray], sites: Sequence[str], *, steps: int, seed: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """:func:`build_style_encoder` as one stage result: Ψ's arrays and its card description
    (:data:`DESCRIPTION_KEY`), for a harmonizer's stage cache."""
    encoder, description = build_style_encoder(psi, volumes, sites, steps=steps, seed=seed,
                                               device=device)
    return {**encoder_arrays(encoder), DESCRIPTION_KEY: np.frombuffer(
        json.dumps(description).encode(), dtype=np.uint8).copy()}


def stage_description(arrays: dict[str, np.ndarray]) -> dict:
    """The card description stored by :func:`style_encoder_stage`."""
    return json.loads(bytes(arrays[DESCRIPTION_KEY]).decode())


def encoder_arrays(encoder: TriPlanarEncoder) -> dict[str, np.ndarray]:
    """Ψ as named arrays (``psi.*``, for the stage cache): its weights and the settings that
    shape it, so :func:`load_style_encoder` rebuilds it exactly."""
    arrays = {
        ARRAY_PREFIX + "slices_per_axis": np.array([encoder.slices_per_axis], dtype=np.int64),
        ARRAY_PREFIX + "slice_size": np.array([encoder.slice_size or 0], dtype=np.int64),
    }
    channels = getattr(encoder.slice_encoder, "channels", None)
    if channels is not None:
        arrays[ARRAY_PREFIX + "channels"] = np.array(channels, dtype=np.int64)
    for name, tensor in encoder.state_dict().items():
        arrays[WEIGHTS_PREFIX + name] = tensor.detach().cpu().numpy()
    return arrays


def load_style_encoder(
    psi: str, arrays: dict[str, np.ndarray], device: torch.device
) -> TriPlanarEncoder:
    """The frozen Ψ of :func:`encoder_arrays`; keys without the ``psi.`` prefix are ignored,
    so the arrays may share a stage result. For open_clip backends the architecture is read
    from DIR again."""
    name, directory = parse_psi(psi)
    if name in CLIP_BACKENDS:
        encoder = _clip_encoder(name, directory, device)  # type: ignore[arg-type]
    else:
        channels = [int(c) for c in arrays[ARRAY_PREFIX + "channels"]]
        cls = RandomGramEncoder if name == "random-gram" else SliceEncoder
        placeholder = torch.Generator().manual_seed(0)  # the weights are overwritten below
        size = int(arrays[ARRAY_PREFIX + "slice_size"][0])
        encoder = TriPlanarEncoder(
            cls(channels, generator=placeholder),
            int(arrays[ARRAY_PREFIX + "slices_per_axis"][0]), size or None,
        )
    state = {
        key[len(WEIGHTS_PREFIX):]: torch.from_numpy(np.array(value))
        for key, value in arrays.items() if key.startswith(WEIGHTS_PREFIX)
    }
    encoder.load_state_dict(state)
    return _frozen(encoder.to(device))


# --- helpers -------------------------------------------------------------------------------


def _conv_stack(channels: Sequence[int], generator: torch.Generator) -> nn.ModuleList:
    """Stride-2 3x3 convolutions from one channel, He-initialised from ``generator``."""
    widths = (1, *channels)
    convs = nn.ModuleList(
        nn.utils.skip_init(nn.Conv2d, c_in, c_out, 3, stride=2, padding=1)
        for c_in, c_out in zip(widths[:-1], widths[1:])
    )
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, a=LEAKY_SLOPE, generator=generator)
        nn.init.zeros_(conv.bias)
    return convs


def _mean_std(features: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and standard deviation of (N, C, H, W) -> (N, 2 C)."""
    variance = features.var(dim=(2, 3), unbiased=False)
    return torch.cat(
        [features.mean(dim=(2, 3)), torch.sqrt(variance + VARIANCE_FLOOR)], dim=1
    )


def _box(side: int) -> tuple[float, float]:
    """The first and last index of the central 80 % of an axis of ``side`` voxels."""
    return BRAIN_BOX_MARGIN * (side - 1), (1.0 - BRAIN_BOX_MARGIN) * (side - 1)


def _monotone_curve(intensity: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Per-volume piecewise-linear curves through ``knots`` (B, K) at K evenly spaced inputs."""
    segments = knots.shape[1] - 1
    position = intensity.clamp(0.0, 1.0).flatten(1) * segments
    index = position.floor().clamp(max=segments - 1).long()
    low, high = knots.gather(1, index), knots.gather(1, index + 1)
    return (low + (position - index) * (high - low)).view_as(intensity)


def _bias_field(
    shape: Sequence[int], coefficients: torch.Tensor, amplitude: torch.Tensor
) -> torch.Tensor:
    """``1 + amplitude * p / max|p|`` for the second-order polynomials ``p`` of
    ``coefficients`` (B, 9) over [-1, 1]^3; shape (B, 1, X, Y, Z)."""
    device = coefficients.device
    x, y, z = torch.meshgrid(
        *(torch.linspace(-1.0, 1.0, side, device=device) for side in shape), indexing="ij"
    )
    terms = torch.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
    terms = terms - terms.mean(dim=(1, 2, 3), keepdim=True)
    polynomial = torch.einsum("bk,kxyz->bxyz", coefficients, terms)
    peak = polynomial.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (1.0 + amplitude.view(-1, 1, 1, 1) * polynomial / peak).unsqueeze(1)


def _blur_along_axis(
    volumes: torch.Tensor, sigma: torch.Tensor, axis: torch.Tensor
) -> torch.Tensor:
    """Gaussian blur of volume ``i`` of (B, 1, X, Y, Z) along ``axis[i]`` with ``sigma[i]``
    voxels (zero padding: the background is 0 in [0, 1] intensities); one grouped
    convolution per axis, over the volumes blurred along it."""
    radius = math.ceil(3.0 * MAX_BLUR_SIGMA)
    offsets = torch.arange(-radius, radius + 1, device=volumes.device, dtype=volumes.dtype)
    kernels = torch.exp(-offsets**2 / (2.0 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    out = volumes.clone()
    for dim in range(3):
        chosen = torch.nonzero(axis == dim).flatten()
        if len(chosen) == 0:
            continue
        shape = [len(chosen), 1, 1, 1, 1]
        shape[dim + 2] = 2 * radius + 1
        padding = [0, 0, 0]
        padding[dim] = radius
        grouped = volumes[chosen].view(1, len(chosen), *volumes.shape[2:])
        blurred = nn.functional.conv3d(
            grouped, kernels[chosen].view(shape), padding=padding, groups=len(chosen)
        )
        out[chosen] = blurred.view(len(chosen), 1, *volumes.shape[2:])
    return out


def _stack(volumes: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Training volumes as one (N, 1, X, Y, Z) float32 tensor on ``device``."""
    shapes = {np.shape(volume) for volume in volumes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"volumes must be 3D arrays of one shape, got shapes {sorted(shapes)}")
    stacked = np.stack([np.asarray(volume, dtype=np.float32) for volume in volumes])
    return torch.from_numpy(stacked).unsqueeze(1).to(device)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"a trained psi needs steps >= 1, got {steps}")


def _frozen(encoder: TriPlanarEncoder) -> TriPlanarEncoder:
    """No parameter requires grad and eval mode; gradients still flow to the input."""
    return encoder.requires_grad_(False).eval()


def _clip_weights_file(name: str, directory: Path) -> Path:
    for filename in CLIP_WEIGHTS:
        if (directory / filename).is_file():
            return directory / filename
    raise UsageError(
        f"psi={name}:{directory}: no weights file there; expected one of {', '.join(CLIP_WEIGHTS)}"
    )


def _clip_encoder(name: str, directory: Path, device: torch.device) -> TriPlanarEncoder:
    """The visual tower of the open_clip model in ``directory`` (nothing is downloaded)."""
    try:
        import open_clip
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision of another torch
        raise UsageError(
            f"psi={name}:DIR needs open_clip, which cannot be imported ({error}); install the "
            f"optional extra: {CLIP_EXTRA}"
        ) from error
    _clip_weights_file(name, directory)
    model = open_clip.create_model_from_pretrained(
        "local-dir:" + str(directory), device=device, return_transform=False
    )
    return _frozen(TriPlanarEncoder(ClipSliceEncoder(model.visual), slice_size=None).to(device))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
