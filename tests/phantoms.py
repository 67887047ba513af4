"""Synthetic brains for the learned-harmonizer tests (imported by plain name: pytest puts
``tests/`` on the path)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from bids_harmony.volume import Volume


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
