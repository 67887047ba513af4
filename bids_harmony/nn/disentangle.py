"""The networks of the SSIM-guided disentanglement (paper 002): a structure encoder E_b, a
style encoder E_s, a generator G that takes the structure code and a style s = (n, l) as
per-channel modulations, an image discriminator with a site-classification head, and
a structure-code discriminator that predicts the site from the code.

The paper states no sizes and its code is not public; the shapes follow DISARM++ (the
paper's ref. 12, luca2245/DISARMpp_Harmonization: a structure code at half resolution from
residual blocks, a pooled style vector, a generator that upsamples once) at a ``width`` of our
choosing, and the style enters G as in MUNIT/AGUIT, by per-channel scales and shifts that an
MLP computes from s.

No layer normalises by statistics over space (DISARM++ and MUNIT use instance normalisation,
AdaIN in G): those statistics change with the extent of the input, so a net trained on 48^3
crops rendered the whole brain box with a grey background and another contrast (a pilot run,
100 steps). Without them every network but the pooled E_s and classification heads is a
local function of its input, and the whole box renders as the crops did; the style enters as
a modulation (1 + g) x + b of unnormalised features, the separation of style from anatomy
comes from the losses (the code's site adversary, the cycle, the classification of
translations).

The style encoder and the image critic's site head also read the brain-intensity quantiles of
their input (:func:`intensity_quantiles`). Sites differ here by global intensity curves that
shift the quantiles by 0.02-0.06, while a 48^3 crop's content varies far more with its
position: pooled convolution features alone stayed at chance (BCE 0.64, accuracy 0.25-0.5 over
2,000 steps on the IXI benchmark's crops; the quantile features reached accuracy 0.73 in 600).
Box sides must be even (one stride-2 level). MONAI provides the convolution
units; the modulation and the style MLP are written here because MONAI has no
style-modulated generator.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})
#: Quantile levels of :func:`intensity_quantiles`.
QUANTILE_LEVELS = 16
#: Scale of the quantile features, so that site differences of a few hundredths reach the
#: MLP heads at a tenth or more.
QUANTILE_SCALE = 10.0


def intensity_quantiles(image: torch.Tensor, mask: torch.Tensor,
                        levels: int = QUANTILE_LEVELS) -> torch.Tensor:
    """(N, 2 levels - 1): each image's brain-intensity quantiles at 2 % .. 98 % and the gaps
    between them, times :data:`QUANTILE_SCALE`; zeros for an image with (almost) no brain.
    Differentiable in ``image`` (``torch.quantile`` interpolates sorted values)."""
    points = torch.linspace(0.02, 0.98, levels, device=image.device, dtype=image.dtype)
    rows = []
    for volume, brain in zip(image, mask):
        values = volume[brain.bool()]
        rows.append(torch.quantile(values, points) if values.numel() > levels
                    else torch.zeros(levels, device=image.device, dtype=image.dtype))
    quantiles = torch.stack(rows)
    return QUANTILE_SCALE * torch.cat([quantiles, quantiles[:, 1:] - quantiles[:, :-1]], dim=1)


def _head(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, outputs))


def _unit(in_channels: int, out_channels: int, stride: int = 1) -> Convolution:
    return Convolution(3, in_channels, out_channels, strides=stride, kernel_size=3,
                       act=LEAKY, norm=None)


class StructureEncoder(nn.Module):
    """E_b: the image to a ``2 * width``-channel structure code at half resolution."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _unit(1, width), _unit(width, 2 * width, stride=2),
            *(ResidualUnit(3, 2 * width, 2 * width, act=LEAKY, norm=None)
              for _ in range(blocks)),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class StyleEncoder(nn.Module):
    """E_s: the image (and its brain mask) to its style noise n (``noise_size``) and
    site-label logits (``sites``).

    Three stride-2 units and global average pooling, beside the brain-intensity quantiles;
    a two-layer head.
    """

    def __init__(self, width: int, noise_size: int, sites: int) -> None:
        super().__init__()
        self.noise_size = noise_size
        self.layers = nn.Sequential(
            _unit(1, width, 2), _unit(width, 2 * width, 2), _unit(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )
        self.head = _head(4 * width + 2 * QUANTILE_LEVELS - 1, 4 * width, noise_size + sites)

    def forward(self, image: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(torch.cat([self.layers(image), intensity_quantiles(image, mask)], 1))
        return out[:, :self.noise_size], out[:, self.noise_size:]


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The style's per-channel scale and shift of features: (1 + g) x + b."""
    return x * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]


class StyledResidualBlock(nn.Module):
    """Two 3^3 convolutions, each followed by the style's modulation (and the first by
    LeakyReLU), plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = nn.Conv3d(channels, channels, 3, padding=1)
        self.second = nn.Conv3d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        s1, b1, s2, b2 = params.chunk(4, dim=1)
        out = self.act(modulate(self.first(x), s1, b1))
        return x + modulate(self.second(out), s2, b2)


class Generator(nn.Module):
    """G: structure code and style (n, l) to an image at twice the code's resolution.

    An MLP turns s into the modulations of ``blocks`` styled residual blocks and of the
    up-sampling unit; the last convolution is linear (intensities are clamped to [0, 1] at
    inference, not squashed in training).
    """

    def __init__(self, width: int, noise_size: int, sites: int, blocks: int) -> None:
        super().__init__()
        code = 2 * width
        self.blocks = nn.ModuleList([StyledResidualBlock(code) for _ in range(blocks)])
        self.sizes = [4 * code] * blocks + [2 * width]
        self.style = nn.Sequential(
            nn.Linear(noise_size + sites, 4 * width), nn.LeakyReLU(0.2),
            nn.Linear(4 * width, 4 * width), nn.LeakyReLU(0.2),
            nn.Linear(4 * width, sum(self.sizes)),
        )
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear",
                                            align_corners=False),
                                nn.Conv3d(code, width, 3, padding=1))
        self.out = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv3d(width, 1, 3, padding=1))

    def forward(self, code: torch.Tensor, noise: torch.Tensor, label: torch.Tensor
                ) -> torch.Tensor:
        params = self.style(torch.cat([noise, label], dim=1)).split(self.sizes, dim=1)
        x = code
        for block, block_params in zip(self.blocks, params):
            x = block(x, block_params)
        scale, shift = params[-1].chunk(2, dim=1)
        return self.out(modulate(self.up(x), scale, shift))


class ImageDiscriminator(nn.Module):
    """D^x: a patch map of real-versus-generated scores and site-label logits.

    Three stride-2 units; the adversarial head scores each patch, the classification head
    reads the pooled features and the brain-intensity quantiles (any input size).
    """

    def __init__(self, width: int, sites: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _unit(1, width, 2), _unit(width, 2 * width, 2), _unit(2 * width, 4 * width, 2),
        )
        self.real = nn.Conv3d(4 * width, 1, 3, padding=1)
        self.site = _head(4 * width + 2 * QUANTILE_LEVELS - 1, 4 * width, sites)

    def forward(self, image: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.layers(image)
        summary = torch.cat([features.mean(dim=(2, 3, 4)), intensity_quantiles(image, mask)], 1)
        return self.real(features), self.site(summary)


class StructureDiscriminator(nn.Module):
    """D^b: site-label logits from a structure code; E_b is trained to leave it guessing."""

    def __init__(self, width: int, sites: int) -> None:
        super().__init__()
        code = 2 * width
        self.layers = nn.Sequential(
            _unit(code, code, 2), _unit(code, code, 2),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(code, sites),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.layers(code)


class Disentangler(nn.Module):
    """The four networks of the generator side and the two discriminators, in one module so
    they are seeded, saved and moved together; the two optimisers take :meth:`generator_side`
    and :meth:`discriminator_side`."""

    def __init__(self, width: int, noise_size: int, sites: int, blocks: int) -> None:
        super().__init__()
        self.structure = StructureEncoder(width, blocks)
        self.style = StyleEncoder(width, noise_size, sites)
        self.generator = Generator(width, noise_size, sites, blocks)
        self.image_critic = ImageDiscriminator(width, sites)
        self.structure_critic = StructureDiscriminator(width, sites)

    def generator_side(self) -> list[nn.Parameter]:
        return [*self.structure.parameters(), *self.style.parameters(),
                *self.generator.parameters()]

    def discriminator_side(self) -> list[nn.Parameter]:
        return [*self.image_critic.parameters(), *self.structure_critic.parameters()]
