"""Guidance toward a source image: gradient ascent on the normalised cross-correlation.

BlindHarmony (Algorithm 1, per slice) and BlindHarmonyDiff (refinement, inside the brain)
both raise the NCC between their estimate and the source image. :func:`ncc_ascent_direction`
is the paper's gradient (a fixed step moves a voxel by step / sd²);
:func:`relative_ncc_step` scales it by the estimate's squared norm, so a step turns the
estimate by a set share of its angle to the source on any image.
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


def relative_ncc_step(
    x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, step: float,
    centred: bool = True,
) -> torch.Tensor:
    """One ascent step on the NCC of each image of a batch ``(B, ...)`` with its source,
    inside its ``mask``, of relative size ``step``.

    The gradient of the correlation is scaled by ``||x||²`` (norms over the mask), so a step
    turns ``x`` toward the source by about ``step`` of the angle between them whatever the
    image's size and contrast: a fixed-size gradient step diverges on images with little
    signal (small ``||x||``) and crawls on large ones. ``centred``: Pearson correlation
    (means removed inside the mask); otherwise the uncentred cosine. Voxels outside the
    mask are left as they are.
    """
    weight = mask.to(x.dtype)
    dims = tuple(range(1, x.dim()))
    count = weight.sum(dim=dims, keepdim=True).clamp_min(1.0)
    a, b = x * weight, source * weight
    if centred:
        a = (x - (a.sum(dim=dims, keepdim=True) / count)) * weight
        b = (source - (b.sum(dim=dims, keepdim=True) / count)) * weight
    norm_a = a.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(MIN_RMS)
    norm_b = b.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(MIN_RMS)
    correlation = (a * b).sum(dim=dims, keepdim=True) / (norm_a * norm_b)
    direction = norm_a * (b / norm_b - correlation * a / norm_a)
    return x + step * direction * weight
