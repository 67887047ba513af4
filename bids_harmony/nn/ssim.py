"""SSIM's luminance, contrast and structure maps in torch, differentiable, for losses.

The same numbers as :func:`bids_harmony.metrics.similarity.ssim_components` (the evaluation's
measure), so that a model trained on these terms is trained on what it is judged by: a
separable Gaussian window of ``sigma`` voxels cut at 3.5 sigma, scipy's ``reflect`` border
(the edge voxel repeated, torch's ``reflect`` pad leaves it out, hence :func:`_pad_symmetric`),
population moments, C1 = (0.01 L)^2, C2 = (0.03 L)^2 and C3 = C2 / 2. Written here because
MONAI's ``SSIMLoss`` and torchmetrics give only the product, not the separate terms paper 002's
losses weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_K1, _K2 = 0.01, 0.03
_TRUNCATE = 3.5
#: Variance floor under the square roots: their gradient is infinite at 0 (flat background).
_VARIANCE_FLOOR = 1e-10
COMPONENTS = ("luminance", "contrast", "structure")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """scipy's 1-D Gaussian of ``gaussian_filter(sigma, truncate=3.5)``, summing to 1."""
    radius = window_radius(sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
              sigma: float = 1.5) -> dict[str, torch.Tensor]:
    """The luminance, contrast and structure maps of ``x`` and ``y`` (N, C, D, H, W).

    Every spatial side must exceed the window radius (5 voxels at sigma 1.5).
    """
    if x.shape != y.shape or x.dim() != 5:
        raise ValueError(f"ssim_maps needs two (N, C, D, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    kernel = gaussian_kernel(sigma).to(x)
    radius = kernel.numel() // 2
    if min(x.shape[2:]) <= radius:
        raise ValueError(f"every side must exceed the window radius {radius}, got "
                         f"{tuple(x.shape[2:])}")

    def smooth(volume: torch.Tensor) -> torch.Tensor:
        channels = volume.shape[1]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            weight = kernel.view(shape).expand(channels, 1, *shape[2:])
            volume = F.conv3d(_pad_symmetric(volume, 2 + axis, radius), weight,
                              groups=channels)
        return volume

    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    c3 = c2 / 2
    mu_x, mu_y = smooth(x), smooth(y)
    var_x = torch.clamp(smooth(x * x) - mu_x**2, min=_VARIANCE_FLOOR)
    var_y = torch.clamp(smooth(y * y) - mu_y**2, min=_VARIANCE_FLOOR)
    cov_xy = smooth(x * y) - mu_x * mu_y
    sd_x, sd_y = torch.sqrt(var_x), torch.sqrt(var_y)
    return {
        "luminance": (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1),
        "contrast": (2 * sd_x * sd_y + c2) / (var_x + var_y + c2),
        "structure": (cov_xy + c3) / (sd_x * sd_y + c3),
    }


def ssim_terms(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
               data_range: float = 1.0, sigma: float = 1.5,
               exponents: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Each map's mean over ``mask`` (every voxel without one), and ``ssim``: the mean of
    l^alpha c^beta s^gamma (paper 002, Eq. 1), which at exponents 1 is the usual SSIM map.

    Contrast and luminance lie in (0, 1] but structure in [-1, 1], so a non-integer gamma is
    taken on structure clamped at 0 (its power is undefined below).
    """
    maps = ssim_maps(x, y, data_range, sigma)
    alpha, beta, gamma = exponents
    structure = maps["structure"]
    if gamma != round(gamma):
        structure = torch.clamp(structure, min=0.0)
    product = maps["luminance"] ** alpha * maps["contrast"] ** beta * structure ** gamma
    terms = {**maps, "ssim": product}
    if mask is None:
        return {name: value.mean() for name, value in terms.items()}
    weight = mask.to(x.dtype).expand_as(product)
    total = torch.clamp(weight.sum(), min=1.0)
    return {name: (value * weight).sum() / total for name, value in terms.items()}


def _pad_symmetric(volume: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """``radius`` voxels mirrored onto both ends of ``dim``, the edge voxel included."""
    side = volume.shape[dim]
    low = volume.narrow(dim, 0, radius).flip(dim)
    high = volume.narrow(dim, side - radius, radius).flip(dim)
    return torch.cat([low, volume, high], dim=dim)


def window_radius(sigma: float = 1.5) -> int:
    """Voxels the window reaches on each side (5 at sigma 1.5)."""
    return int(_TRUNCATE * sigma + 0.5)
