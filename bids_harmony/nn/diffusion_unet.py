"""The conditional noise-prediction network of SGCD: MONAI's ``DiffusionModelUNet``, optionally
behind a space-to-channel rearrangement.

The paper's U-Net (channels {32, 64, 256, 256}, 62 M parameters) takes ~114 CPU-s per step on
the 2 mm brain box; on a CPU the cost follows the voxel count, so the ``cpu`` preset moves
2x2x2 voxel blocks into channels first (``space_to_channel=2``: 8x fewer voxels for the
U-Net, every loss still on the full grid) and shuffles them back at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn

SPATIAL_DIMS = 3


class ConditionalDiffusionUNet(nn.Module):
    """epsilon(x_t, t, condition, class): the noisy image and its condition map (SGCD: the
    gradient map; UMH: IN of the clean latent) as input channels, ``image_channels`` each,
    the sequence as MONAI's class embedding."""

    def __init__(
        self,
        channels: Sequence[int],
        attention: Sequence[bool],
        res_blocks: int,
        norm_groups: int,
        head_channels: int,
        classes: int,
        space_to_channel: int = 1,
        image_channels: int = 1,
    ) -> None:
        super().__init__()
        self.space_to_channel = int(space_to_channel)
        voxels_per_block = self.space_to_channel**SPATIAL_DIMS
        self.unet = DiffusionModelUNet(
            spatial_dims=SPATIAL_DIMS,
            in_channels=2 * image_channels * voxels_per_block,
            out_channels=image_channels * voxels_per_block,
            num_res_blocks=res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention),
            norm_num_groups=norm_groups,
            num_head_channels=head_channels,
            num_class_embeds=classes,
            use_flash_attention=True,
        )
        #: Each side of the input must be a multiple of this.
        self.divisor = self.space_to_channel * 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                classes: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([x, condition], dim=1)
        if self.space_to_channel > 1:
            inputs = torch.cat([
                pixelunshuffle(part, SPATIAL_DIMS, self.space_to_channel)
                for part in (x, condition)
            ], dim=1)
        out = self.unet(inputs, timesteps=timesteps, class_labels=classes)
        if self.space_to_channel > 1:
            out = pixelshuffle(out, SPATIAL_DIMS, self.space_to_channel)
        return out


def eps_function(network: ConditionalDiffusionUNet, condition: torch.Tensor, label: int
                 ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The network as :mod:`bids_harmony.nn.ddim` calls it, condition and sequence bound."""
    classes = torch.tensor([label], device=condition.device)

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return network(x, torch.tensor([t], device=x.device), condition, classes)

    return eps
