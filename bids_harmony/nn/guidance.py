"""Guidance toward a source image: gradient ascent on the normalised cross-correlation.

BlindHarmony (Algorithm 1, per slice) and BlindHarmonyDiff (refinement, inside the brain)
both raise the NCC between their estimate and the source image; both take the same
gradient from :func:`ncc_ascent_direction` and differ only in where it is taken and how it
is scaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Floor of the intensity RMS, so a flat image gives a finite (zero-signal) direction.
MIN_RMS = 1e-6


def ncc_ascent_direction(
    x: torch.Tensor, source: torch.Tensor, dims: int | Sequence[int]
) -> torch.Tensor:
    """The gradient of the voxel-sum NCC of ``x`` with ``source`` over ``dims``.

    ``b / (sa sb) - ncc * a / sa²`` with ``a``, ``b`` the centred intensities and ``sa``,
    ``sb`` their RMS over ``dims``: the number of voxels times the gradient of the Pearson
    correlation, so its size per voxel does not depend on how many voxels there are.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    a = x - x.mean(dim=dims, keepdim=True)
    b = source - source.mean(dim=dims, keepdim=True)
    sd_a = a.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(MIN_RMS)
    sd_b = b.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(MIN_RMS)
    correlation = (a * b).mean(dim=dims, keepdim=True) / (sd_a * sd_b)
    return b / (sd_a * sd_b) - correlation * a / sd_a**2


def pearson_ncc_gradient(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Gradient of the Pearson NCC of each image of a batch ``(B, ...)`` with its source."""
    dims = tuple(range(1, x.dim()))
    return ncc_ascent_direction(x, source, dims) / x[0].numel()


def masked_ncc_ascent_step(
    x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, step_size: float
) -> torch.Tensor:
    """One step of ``step_size`` along :func:`ncc_ascent_direction` over the ``mask`` voxels
    (all images of the batch together); voxels outside ``mask`` are left as they are."""
    out = x.clone()
    out[mask] = x[mask] + step_size * ncc_ascent_direction(x[mask], source[mask], 0)
    return out
