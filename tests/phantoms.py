"""Synthetic brains for the harmonizer tests (imported by plain name: pytest puts ``tests/``
on the path).

The multi-site phantom follows BlindHarmony's simulated experiment: one anatomy per subject,
rendered at each "site" through a different monotone intensity transfer (identity, exp-like,
log-like, gamma 0.7), plus noise, then the pipeline's 1st-99th percentile min-max to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from bids_harmony.volume import Volume

SHAPE = (32, 32, 24)
SITE_TRANSFERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "siteA": lambda g: g,
    "siteB": lambda g: np.expm1(3.0 * g) / np.expm1(3.0),
    "siteC": lambda g: np.log1p(9.0 * g) / np.log(10.0),
    "siteD": lambda g: g**0.7,
}
# Brain radii as fractions of the grid's sides (13, 13.5 and 10 voxels on :data:`SHAPE`).
RADIUS_FRACTIONS = np.array([13.0 / 32, 13.5 / 32, 10.0 / 24])


def anatomy(
    subject: int, t2_like: bool = False, shape: tuple[int, int, int] = SHAPE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth tissue image in [0, 1], brain mask and white-matter mask of one subject.

    Nested ellipsoids: ventricle CSF, white matter (the largest tissue, as in adults),
    grey-matter ribbon, outer CSF, with smooth texture; subjects differ in sizes.
    """
    rng = np.random.default_rng(1000 + subject)
    radii = RADIUS_FRACTIONS * np.array(shape) * rng.uniform(0.9, 1.0, 3)
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2.0 + rng.uniform(-1, 1, 3)
    r = np.sqrt(sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)))
    mask = r <= 1.0
    ventricle, wm_edge, gm_edge = 0.2 + 0.05 * rng.random(), 0.78 + 0.04 * rng.random(), 0.93
    csf, gm, wm = (0.9, 0.35, 0.15) if t2_like else (0.12, 0.5, 0.82)
    tissue = np.select([r < ventricle, r < wm_edge, r < gm_edge], [csf, wm, gm], default=csf)
    texture = gaussian_filter(rng.standard_normal(shape), 1.5)
    tissue = tissue + 0.04 * texture / texture.std()
    white_matter = (r >= ventricle) & (r < wm_edge)
    return np.clip(tissue, 0.0, 1.0) * mask, mask, white_matter


def render(
    subject: int, site: str, t2_like: bool = False, seed: int = 0,
    shape: tuple[int, int, int] = SHAPE,
) -> Volume:
    """One subject scanned at one site, after the pipeline's percentile min-max."""
    tissue, mask, _ = anatomy(subject, t2_like, shape)
    rng = np.random.default_rng([subject, list(SITE_TRANSFERS).index(site), t2_like, seed])
    signal = SITE_TRANSFERS[site](tissue) + 0.02 * rng.standard_normal(shape)
    low, high = np.percentile(signal[mask], [1, 99])
    data = np.clip((signal - low) / (high - low), 0.0, 1.0) * mask
    return Volume(data.astype(np.float32), mask)


def ellipsoid_phantom(shape: tuple[int, int, int], subject: int, gamma: float = 1.0) -> Volume:
    """A textured ellipsoid 'brain' in [0, 1]; ``gamma`` plays a site's contrast."""
    rng = np.random.default_rng(subject)
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2.0
    r = np.sqrt(sum(((grid[i] - centre[i]) / (0.42 * shape[i])) ** 2 for i in range(3)))
    mask = r <= 1.0
    texture = gaussian_filter(rng.standard_normal(shape), 1.5)
    data = np.clip(0.3 + 0.5 * (r < 0.7) + 0.15 * texture / texture.std(), 0.0, 1.0) ** gamma
    return Volume((data * mask).astype(np.float32), mask)
