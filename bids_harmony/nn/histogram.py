"""Differentiable intensity statistics of SGCD's stage 1 (paper 001 Eqs. 2, 5-8): the gradient
map, the soft histogram, the Wasserstein distance between histograms and the per-sequence EMA
record they are compared with.

Written by hand: MONAI and torch have neither a kernel-density histogram with a gradient
(``torch.histc`` has none) nor a CDF distance between histograms.
"""

from __future__ import annotations

import torch
from torch import nn

#: The paper's histogram: K = 100 bins on [0, 1].
HISTOGRAM_BINS = 100
#: Keeps Eq. 6's normaliser away from zero.
HISTOGRAM_DELTA = 1e-8


def gradient_map(image: torch.Tensor) -> torch.Tensor:
    """Eq. 2 before normalisation: the mean of the forward differences along the three
    spatial axes, zero-padded at each axis's high end, for (B, C, X, Y, Z) images."""
    total = torch.zeros_like(image)
    for axis in (2, 3, 4):
        difference = torch.diff(image, dim=axis)
        pad = [0, 0] * (4 - axis) + [0, 1]  # F.pad lists the last axis first
        total = total + nn.functional.pad(difference, pad)
    return total / 3.0


def gradient_scale(gradient: torch.Tensor) -> torch.Tensor:
    """Per sample, the largest |gradient|: dividing by it puts a map in [-1, 1] (the paper's
    normalisation)."""
    scale = gradient.abs().flatten(1).amax(dim=1).clamp_min(1e-6)
    return scale.reshape(-1, *([1] * (gradient.ndim - 1)))


def soft_histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS, sigma: float = 0.01,
                   low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Eqs. 5-6: a Gaussian-kernel histogram of a 1-D tensor, ``bins`` centres from ``low``
    to ``high``, normalised to sum to 1; differentiable in the values."""
    centres = torch.linspace(low, high, bins, dtype=values.dtype, device=values.device)
    weights = torch.exp(-0.5 * ((values[:, None] - centres[None, :]) / sigma) ** 2)
    counts = weights.sum(dim=0)
    return counts / (counts.sum() + HISTOGRAM_DELTA)


def histogram_wasserstein(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The paper's differentiable WD: the mean absolute difference of the two CDFs.

    It is the 1-D Wasserstein distance divided by ``bins * spacing`` (the sum over bins of
    |CDF difference| times the bin spacing is the distance; this takes the mean instead).
    """
    return (torch.cumsum(first, -1) - torch.cumsum(second, -1)).abs().mean(-1)


class EmaRecord(nn.Module):
    """Per sequence, the running soft histogram, mean and std of the one-step estimates
    (Eq. 7): buffers, so checkpoints and the saved model carry them.

    The first update of a sequence sets its record (the paper does not say how the record
    starts; decaying from zeros would pull the first estimates toward black). Updates use
    detached statistics, as the record is a target, not a path for gradients.
    """

    def __init__(self, sequences: int, bins: int = HISTOGRAM_BINS, decay: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("histogram", torch.zeros(sequences, bins, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(sequences, dtype=torch.float64))
        self.register_buffer("std", torch.zeros(sequences, dtype=torch.float64))
        self.register_buffer("started", torch.zeros(sequences, dtype=torch.bool))

    @torch.no_grad()
    def update(self, sequence: int, histogram: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor) -> None:
        """``record = decay * record + (1 - decay) * value`` for each statistic."""
        keep = self.decay if bool(self.started[sequence]) else 0.0
        for record, value in ((self.histogram, histogram), (self.mean, mean), (self.std, std)):
            record[sequence] = keep * record[sequence] + (1.0 - keep) * value.detach().double()
        self.started[sequence] = True

    def loss(self, sequence: int, histogram: torch.Tensor, mean: torch.Tensor,
             std: torch.Tensor) -> torch.Tensor:
        """Eq. 8: WD to the record's histogram plus the squared mean and std differences."""
        dtype = histogram.dtype
        return (
            histogram_wasserstein(self.histogram[sequence].to(dtype), histogram)
            + (self.mean[sequence].to(dtype) - mean) ** 2
            + (self.std[sequence].to(dtype) - std) ** 2
        )
