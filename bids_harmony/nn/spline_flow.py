"""The Glow-like multiscale Neural Spline Flow that BlindHarmony uses as its image prior.

Built from nflows (the Neural Spline Flow authors' library), which has every layer the paper
names: rational-quadratic spline couplings with linear tails, actnorm, LU-parameterised
invertible 1x1 convolutions, squeeze and the multiscale factor-out. Only the assembly is
ours; it follows BlindHarmony Sec. 4.2 and its public configuration: each level squeezes,
then runs ``steps_per_level`` steps of actnorm -> 1x1 conv -> RQ coupling (mid-split mask, a
residual conv net with batch norm predicting the spline parameters) and ends with one more
1x1 conv; half of the channels leave at each level. Images enter in [0, 1] and are shifted to
[-0.5, 0.5] (the public code's ``glow`` preprocessing).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from nflows import transforms
from nflows.nn.nets import ConvResidualNet
from nflows.utils import create_mid_split_binary_mask

#: Spline settings of the paper's configuration: 8 bins on [-3, 3], linear tails beyond.
NUM_BINS = 8
TAIL_BOUND = 3.0
MIN_BIN_SIZE = 1e-3


@dataclass(frozen=True)
class FlowArchitecture:
    """Shape of the flow: ``levels`` x ``steps_per_level`` coupling steps (paper: 4 x 7)."""

    levels: int
    steps_per_level: int
    hidden_channels: int
    residual_blocks: int

    @property
    def divisor(self) -> int:
        """Image sides must be multiples of this (one 2x squeeze per level)."""
        return 2**self.levels


class SplineFlow(torch.nn.Module):
    """f: image -> latent with a standard-normal base density, and its exact inverse."""

    def __init__(self, transform: transforms.Transform) -> None:
        super().__init__()
        self.transform = transform

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(f(x); 0, I) + log|det df/dx|, one value per image (nats)."""
        latents, log_det = self.transform(images)
        dims = latents.shape[1]
        return -0.5 * latents.pow(2).sum(dim=1) - 0.5 * dims * math.log(2 * math.pi) + log_det

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """f(x): (B, 1, H, W) images to (B, H*W) latents."""
        return self.transform(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """f^-1(z): (B, H*W) latents back to (B, 1, H, W) images.

        nflows' inverse LU 1x1 convolution calls ``torch.triangular_solve``, which torch marks
        deprecated but still provides; that warning says nothing a user can act on, so it is
        silenced here, for this call only.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.triangular_solve is deprecated")
            return self.transform.inverse(latents)[0]


def build_spline_flow(
    architecture: FlowArchitecture, height: int, width: int, seed: int = 0
) -> SplineFlow:
    """A flow over (1, height, width) images with weights and permutations from ``seed``."""
    if height % architecture.divisor or width % architecture.divisor:
        raise ValueError(
            f"flow input {height}x{width} is not a multiple of {architecture.divisor}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        multiscale = transforms.MultiscaleCompositeTransform(num_transforms=architecture.levels)
        channels, h, w = 1, height, width
        for _ in range(architecture.levels):
            squeeze = transforms.SqueezeTransform()
            channels, h, w = squeeze.get_output_shape(channels, h, w)
            level = transforms.CompositeTransform(
                [squeeze]
                + [_coupling_step(channels, architecture)
                   for _ in range(architecture.steps_per_level)]
                + [transforms.OneByOneConvolution(channels)]
            )
            factored = multiscale.add_transform(level, (channels, h, w))
            if factored:
                channels, h, w = factored
        shift_to_centre = transforms.PointwiseAffineTransform(shift=-0.5)
        return SplineFlow(transforms.CompositeTransform([shift_to_centre, multiscale]))


def _coupling_step(channels: int, architecture: FlowArchitecture) -> transforms.Transform:
    """actnorm -> invertible 1x1 conv -> rational-quadratic spline coupling."""

    def parameter_net(in_channels: int, out_channels: int) -> torch.nn.Module:
        return ConvResidualNet(
            in_channels=in_channels,
            out_channels=out_channels,
            hidden_channels=architecture.hidden_channels,
            num_blocks=architecture.residual_blocks,
            use_batch_norm=True,
        )

    coupling = transforms.PiecewiseRationalQuadraticCouplingTransform(
        mask=create_mid_split_binary_mask(channels),
        transform_net_create_fn=parameter_net,
        tails="linear",
        tail_bound=TAIL_BOUND,
        num_bins=NUM_BINS,
        min_bin_width=MIN_BIN_SIZE,
        min_bin_height=MIN_BIN_SIZE,
        min_derivative=MIN_BIN_SIZE,
    )
    return transforms.CompositeTransform(
        [transforms.ActNorm(channels), transforms.OneByOneConvolution(channels), coupling]
    )

