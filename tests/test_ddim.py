"""The diffusion core and the differentiable statistics of SGCD (nn.ddim, nn.histogram)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from bids_harmony.nn.ddim import (
    add_noise,
    alphas_cumprod,
    estimate_clean,
    invert,
    reverse,
    reverse_last_k,
    timestep_grid,
)
from bids_harmony.nn.histogram import (
    EmaRecord,
    gradient_map,
    histogram_wasserstein,
    soft_histogram,
)


def _oracle(x0: torch.Tensor, abar: torch.Tensor, first_noise: torch.Tensor):
    """The noise estimate of a model that knows the clean image ``x0`` exactly."""

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        if torch.equal(x, x0):  # the clean image itself: any noise is consistent
            return first_noise
        return (x - abar[t].sqrt() * x0) / (1.0 - abar[t]).sqrt()

    return eps


@pytest.mark.parametrize("forward_steps, reverse_steps", [(5, 5), (7, 3), (2, 9)])
def test_invert_then_reverse_returns_the_image_with_an_oracle(forward_steps, reverse_steps):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((1, 1, 6, 5, 4), generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    abar = alphas_cumprod()
    t_stop = 100
    eps = _oracle(x0, abar, noise)
    noisy = invert(eps, x0, timestep_grid(t_stop, forward_steps), abar)
    # The inversion lands at exactly alpha-bar(t_stop) between the image and the noise.
    expected = abar[t_stop].sqrt() * x0 + (1 - abar[t_stop]).sqrt() * noise
    torch.testing.assert_close(noisy, expected, atol=1e-10, rtol=0)
    back = reverse(eps, noisy, timestep_grid(t_stop, reverse_steps), abar)
    assert float((back - x0).abs().max()) < 1e-5


def test_grid_schedule_and_one_step_estimate():
    grid = timestep_grid(100, 8)
    assert grid[0] == 0 and grid[-1] == 100 and len(grid) == 9 and np.all(np.diff(grid) > 0)
    with pytest.raises(ValueError):
        timestep_grid(5, 6)
    linear = alphas_cumprod("linear")
    assert float(linear[0]) == 1.0 and abs(float(linear[100]) - 0.78703) < 1e-4
    assert float(alphas_cumprod("scaled_linear")[100]) > float(linear[100])
    x0 = torch.randn((2, 1, 4, 4, 4), dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 400])
    noisy = add_noise(x0, noise, t, linear)
    torch.testing.assert_close(estimate_clean(noisy, noise, t, linear), x0)


def test_reverse_last_k_yields_graphs_only_for_the_last_steps():
    network = torch.nn.Conv3d(1, 1, 3, padding=1, dtype=torch.float64)
    calls = []

    def eps(x, t):
        calls.append((t, torch.is_grad_enabled()))
        return network(x)

    x = torch.randn((1, 1, 5, 5, 5), dtype=torch.float64)
    estimates = list(reverse_last_k(eps, x, timestep_grid(50, 5), alphas_cumprod(), 2))
    assert len(estimates) == 2 and all(e.requires_grad for e in estimates)
    assert [grad for _, grad in calls] == [False, False, False, True, True]
    assert [t for t, _ in calls] == [50, 40, 30, 20, 10]


def test_gradient_map_is_the_mean_forward_difference():
    image = np.random.default_rng(0).random((5, 6, 7))
    expected = np.zeros_like(image)
    expected[:-1] += np.diff(image, axis=0)
    expected[:, :-1] += np.diff(image, axis=1)
    expected[:, :, :-1] += np.diff(image, axis=2)
    out = gradient_map(torch.from_numpy(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(out, expected / 3.0, atol=1e-12)


def test_soft_histogram_matches_numpy_and_has_a_gradient():
    values = torch.rand(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values.requires_grad_(True)
    bins = 20
    histogram = soft_histogram(values, bins=bins, sigma=1e-4, low=0.025, high=0.975)
    assert abs(float(histogram.detach().sum()) - 1.0) < 1e-6
    counts, _ = np.histogram(values.detach().numpy(), bins=bins, range=(0.0, 1.0))
    # With sigma -> 0 each value falls on its nearest centre: the plain histogram.
    wide = soft_histogram(values, bins=bins, sigma=0.2, low=0.025, high=0.975)
    narrow = soft_histogram(values, bins=bins, sigma=0.01, low=0.025, high=0.975)
    reference = torch.from_numpy(counts / counts.sum())
    assert float((narrow - reference).abs().sum()) < float((wide - reference).abs().sum())
    assert float((narrow - reference).abs().sum()) < 0.05
    narrow[3].backward()
    assert torch.isfinite(values.grad).all() and float(values.grad.abs().sum()) > 0


def test_histogram_wasserstein_is_scipy_up_to_the_bin_spacing():
    rng = np.random.default_rng(2)
    bins = 50
    centres = np.linspace(0.0, 1.0, bins)
    first, second = rng.random(bins), rng.random(bins)
    first, second = first / first.sum(), second / second.sum()
    ours = float(histogram_wasserstein(torch.from_numpy(first), torch.from_numpy(second)))
    theirs = scipy.stats.wasserstein_distance(centres, centres, first, second)
    spacing = 1.0 / (bins - 1)
    np.testing.assert_allclose(ours * bins * spacing, theirs, rtol=1e-6)


def _f64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def test_ema_record_arithmetic_and_state_round_trip():
    record = EmaRecord(sequences=2, bins=4, decay=0.2)
    first = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    second = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    record.update(1, first, _f64(0.5), _f64(0.1))
    record.update(1, second, _f64(0.7), _f64(0.3))
    torch.testing.assert_close(record.histogram[1], 0.2 * first + 0.8 * second)
    assert abs(float(record.mean[1]) - (0.2 * 0.5 + 0.8 * 0.7)) < 1e-12
    assert not bool(record.started[0]) and float(record.histogram[0].abs().sum()) == 0
    copy = EmaRecord(sequences=2, bins=4, decay=0.2)
    copy.load_state_dict(record.state_dict())
    for name in ("histogram", "mean", "std", "started"):
        assert torch.equal(getattr(copy, name), getattr(record, name))
    # Eq. 8 is zero at the record itself and grows away from it.
    at_record = record.loss(1, record.histogram[1], record.mean[1], record.std[1])
    away = record.loss(1, first, _f64(0.5), _f64(0.1))
    assert float(at_record) == 0.0 and float(away) > 0.0
