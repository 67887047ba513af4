"""UMH's stage 0: a fully convolutional 3D KL autoencoder (MONAI ``AutoencoderKL``), its loss,
the latent scale, the style-free condition IN(Z0) and decoding of latent sub-blocks.

MONAI's ``AutoencoderKL`` normalises with GroupNorm, whose statistics span the whole input:
a net trained on random crops then renders a whole brain box in another contrast, and a
decoded latent sub-block differs from the same region of a full decode (both measured with
the disentangler's instance norm, benchmarks/results/ssim_disentangle.md). Every GroupNorm is
therefore replaced by a learned per-channel scale and shift (:class:`ChannelAffine`), and
attention is off, so every output voxel depends only on a neighbourhood of the input: crops
train the net the whole box uses, and sub-block decoding is exact away from the block border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

SPATIAL_DIMS = 3
#: Starting log-variance of the latent (sigma = exp(-4) = 0.018). MONAI's head starts near 0,
#: unit noise on a latent whose mean is still small; with the paper's KL weight of 1e-6
#: nothing shrinks it but the L1, which at a CPU budget of hundreds of steps left the
#: reconstruction at 19-20 dB PSNR (benchmarks/results/umh.md).
INITIAL_LOG_VARIANCE = -8.0
#: Floor of a standard deviation (IN of a constant latent channel, the scale of a flat latent).
STD_FLOOR = 1e-6


class ChannelAffine(nn.Module):
    """``x * (1 + scale) + shift`` per channel: GroupNorm's affine part without its statistics,
    starting at the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.ndim - 2)
        return x * (1.0 + self.scale.view(view)) + self.shift.view(view)


def build_autoencoder(channels: Sequence[int], latent_channels: int, res_blocks: int,
                      seed: int) -> AutoencoderKL:
    """MONAI's 3D ``AutoencoderKL`` (one level per entry of ``channels``, a 2x downsampling
    between levels), no attention, GroupNorm replaced by :class:`ChannelAffine`; weights from
    ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = AutoencoderKL(
            spatial_dims=SPATIAL_DIMS, in_channels=1, out_channels=1,
            channels=tuple(channels), latent_channels=latent_channels,
            num_res_blocks=(res_blocks,) * len(channels),
            norm_num_groups=min(channels),
            attention_levels=(False,) * len(channels),
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        )
    _replace_group_norms(network)
    torch.nn.init.constant_(network.quant_conv_log_sigma.conv.bias, INITIAL_LOG_VARIANCE)
    return network


def _replace_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, ChannelAffine(child.num_channels))
        else:
            _replace_group_norms(child)


def downsampling(channels: Sequence[int]) -> int:
    """The factor by which the latent grid is coarser than the image grid, per axis."""
    return 2 ** (len(channels) - 1)


class SampledReconstruction(nn.Module):
    """The autoencoder's training pass, ``(D(mu + sigma * noise), mu, sigma)``, with the noise
    given: MONAI's ``forward`` draws it from the global RNG, which a resumed run cannot
    replay. A module, so that ``torchrun`` can replicate this pass."""

    def __init__(self, network: AutoencoderKL) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.network.encode(images)
        return self.network.decode(mu + sigma * noise), mu, sigma


def latent_shape(shape: Sequence[int], channels: Sequence[int], latent_channels: int
                 ) -> tuple[int, ...]:
    """The latent's (C, X, Y, Z) for an image of spatial ``shape`` (sides multiples of the
    downsampling)."""
    factor = downsampling(channels)
    return (latent_channels, *(side // factor for side in shape))


def autoencoder_loss(reconstruction: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                     images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 + ``kl_weight`` KL of one batch (the outputs of :class:`SampledReconstruction`):
    the L1 a mean over the whole crop (background included: the decoder renders it too), the
    KL HCLD's sum over latent voxels per sample, averaged over the batch."""
    l1 = torch.mean(torch.abs(reconstruction - images))
    kl = 0.5 * torch.sum(mu**2 + sigma**2 - torch.log(sigma**2 + STD_FLOOR) - 1.0,
                         dim=tuple(range(1, mu.ndim)))
    return l1 + kl_weight * kl.mean()


def encode(network: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The latent mean (no sampling: inference and the diffusion model's data are
    deterministic)."""
    mu, _ = network.encode(images)
    return mu


def decode(network: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    return network.decode(latents)


def latent_scale(latents: Sequence[torch.Tensor]) -> float:
    """HCLD's ``scale_factor``: 1 / std of the training latents, so the diffusion model sees
    unit-variance data whatever the autoencoder learned."""
    values = torch.cat([z.detach().reshape(-1) for z in latents])
    return float(1.0 / max(float(values.std()), STD_FLOOR))


def instance_normalise(latent: torch.Tensor) -> torch.Tensor:
    """IN(Z0): each channel of each sample to zero mean and unit std over the latent grid, the
    style-free content condition (the paper's "across channels", per channel as in instance
    normalisation, its refs 15 and 26)."""
    dims = tuple(range(2, latent.ndim))
    mean = latent.mean(dim=dims, keepdim=True)
    std = latent.std(dim=dims, keepdim=True, unbiased=False).clamp_min(STD_FLOOR)
    return (latent - mean) / std


def decode_block(network: AutoencoderKL, latent: torch.Tensor, corner: Sequence[int],
                 side: Sequence[int], halo: int, factor: int
                 ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Decode the latent block at ``corner`` of sides ``side`` and return the image voxels
    of that block (``factor`` per latent voxel) with the image-grid index they belong to.

    ``halo`` extra latent voxels per side (clipped at the latent grid's edge) are decoded
    with it and trimmed, so the returned voxels equal a full decode wherever the halo covers
    the decoder's receptive field.
    """
    shape = latent.shape[2:]
    low = [max(0, c - halo) for c in corner]
    high = [min(n, c + s + halo) for c, s, n in zip(corner, side, shape)]
    block = latent[(slice(None), slice(None), *(slice(a, b) for a, b in zip(low, high)))]
    image = decode(network, block)
    keep = tuple(slice((c - a) * factor, (c - a + s) * factor)
                 for c, a, s in zip(corner, low, side))
    index = tuple(slice(c * factor, (c + s) * factor) for c, s in zip(corner, side))
    return image[(slice(None), slice(None), *keep)], index


def random_corner(shape: Sequence[int], side: Sequence[int], generator: torch.Generator
                  ) -> list[int]:
    """A uniformly drawn corner for a block of sides ``side`` inside ``shape``."""
    return [int(torch.randint(n - s + 1, (1,), generator=generator)) for n, s in zip(shape, side)]
