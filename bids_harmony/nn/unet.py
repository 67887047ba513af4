"""The 3D U-Net velocity field of BlindHarmonyDiff (supplement S3.1).

Base channels times multipliers {1, 2, 4, 8}; every block has two 3D convolutions with RMS
normalisation and SiLU; downsampling moves 2x2x2 voxel blocks into channels; upsampling is
nearest neighbour followed by a convolution; skip connections join encoder and decoder; the
flow time enters every block as a scale and shift of its first normalised features.

MONAI supplies the sinusoidal time embedding (``get_timestep_embedding``), the space-to-channel
rearrangement (``pixelunshuffle``) and the nearest-neighbour upsampling (``UpSample``).
MONAI's ``DiffusionModelUNet`` is not used: it normalises with GroupNorm and downsamples with
strided convolutions, where the paper asks for RMS norm and space-to-channel, so the blocks
around those pieces are written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UpSample
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.networks.utils import pixelunshuffle
from torch import nn

SPATIAL_DIMS = 3
#: Flow times in [0, 1] are multiplied by this before the sinusoidal embedding, so that its
#: frequencies (made for integer diffusion steps up to ~1000) resolve small time differences.
TIME_SCALE = 1000.0


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over the channels of each voxel, with a learned gain per channel.

    ``torch.nn.RMSNorm`` normalises the trailing dimensions, i.e. the spatial ones of a
    ``(B, C, X, Y, Z)`` tensor; the paper's blocks normalise features, so this works on dim 1.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1, 1))
        self.scale = channels**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) * self.gain * self.scale


class ConvBlock(nn.Module):
    """Two 3x3x3 convolutions, each followed by RMS norm and SiLU, plus a residual path.

    The time embedding scales and shifts the first convolution's normalised features
    (as in the lucidrains U-Net the public code builds on); the residual is a 1x1x1
    convolution when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = ChannelRMSNorm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.time_to_scale_shift = nn.Sequential(
            nn.SiLU(), nn.Linear(time_channels, 2 * out_channels)
        )
        self.residual = (
            nn.Conv3d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_to_scale_shift(time_embedding)[..., None, None, None].chunk(2, 1)
        h = self.act(self.norm1(self.conv1(x)) * (1.0 + scale) + shift)
        h = self.act(self.norm2(self.conv2(h)))
        return h + self.residual(x)


class SpaceToChannelDown(nn.Module):
    """Halve each side by moving 2x2x2 voxel blocks into channels, then a 1x1x1 projection.

    Unlike strided convolution or pooling it discards nothing before the projection.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv3d(in_channels * 2**SPATIAL_DIMS, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(pixelunshuffle(x, SPATIAL_DIMS, 2))


class VelocityUNet(nn.Module):
    """Velocity ``v(x_t, t; e, i, j, k)`` from the noisy image, edge map and coordinates.

    Each level has one :class:`ConvBlock` on the way down and one on the way up (the supplement
    says "two convs per block" but not how many blocks per level; one keeps the paper-scale
    model at ~69 M parameters). Sides must be multiples of :attr:`divisor`.
    """

    def __init__(
        self,
        in_channels: int = 5,
        out_channels: int = 1,
        base_channels: int = 64,
        multipliers: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__()
        channels = [base_channels * m for m in multipliers]
        self.base_channels = base_channels
        self.divisor = 2 ** (len(channels) - 1)
        time_channels = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_channels),
            nn.SiLU(),
            nn.Linear(time_channels, time_channels),
        )
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ConvBlock(c, c, time_channels) for c in channels
        )
        self.downsamples = nn.ModuleList(
            SpaceToChannelDown(c, c_next) for c, c_next in zip(channels[:-1], channels[1:])
        )
        self.middle = ConvBlock(channels[-1], channels[-1], time_channels)
        self.up_blocks = nn.ModuleList(
            ConvBlock(2 * c, c, time_channels) for c in reversed(channels)
        )
        self.upsamples = nn.ModuleList(
            UpSample(
                SPATIAL_DIMS, c, c, scale_factor=2, mode="nontrainable",
                interp_mode="nearest", align_corners=None, pre_conv=None,
                post_conv=nn.Conv3d(c, c_next, 3, padding=1),
            )
            for c, c_next in zip(reversed(channels[1:]), reversed(channels[:-1]))
        )
        # PyTorch's default initialisation, as in the public code: a zero head (as in DDPM
        # U-Nets) cannot reach the unit-scale output within a CPU budget of Adam steps.
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``x``: (B, in_channels, X, Y, Z); ``times``: (B,) flow times in [0, 1]."""
        if any(side % self.divisor for side in x.shape[2:]):
            raise ValueError(
                f"VelocityUNet needs sides that are multiples of {self.divisor}, "
                f"got {tuple(x.shape[2:])}"
            )
        embedding = self.time_mlp(
            get_timestep_embedding(times * TIME_SCALE, self.base_channels).to(x.dtype)
        )
        h = self.stem(x)
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = block(h, embedding)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        h = self.middle(h, embedding)
        for level, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)
        return self.head(h)
