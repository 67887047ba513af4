"""Deterministic DDIM on an explicit timestep grid: forward noising, the one-step estimate,
inversion and reverse diffusion (SGCD, paper 001 Eqs. 1, 4, 9, 10; UMH reuses it in latents).

Only the noise schedule comes from MONAI (``DDPMScheduler.alphas_cumprod``). MONAI 1.6.1's
``DDIMScheduler`` is not used: its ``set_timesteps`` grid (``linspace(N-1, 0, n).round()``)
and the ``t -/+ N // n`` neighbour its ``step``/``reversed_step`` assume disagree by one to two
steps at N = 1000, the grid starts at t = 999 where the signal is gone, and ``DiffusionInferer``
has no inversion. Here the caller names every timestep.

Conventions: ``t = 0`` is the clean image (alpha-bar 1); ``t = 1 .. T`` are the training
schedule's steps (MONAI's index ``t - 1``). The networks are trained on ``t >= 1``; a query at
``t = 0`` is sent as ``t = 1``, whose alpha-bar (0.9985) differs from 1 by less than any
noise the grid adds. ``eps_fn(x, t)`` returns the network's noise estimate for a batch ``x``
at the integer timestep ``t`` (the caller binds the conditions: gradient map, sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

#: The training schedule's length (both papers).
TRAINING_STEPS = 1000
#: ``linear``: the papers' betas; ``scaled_linear``: the public code's (linear in sqrt beta).
BETA_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta"}
#: The papers' beta range.
BETA_START, BETA_END = 0.0015, 0.0195

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def alphas_cumprod(
    schedule: str = "linear", beta_start: float = BETA_START, beta_end: float = BETA_END,
    steps: int = TRAINING_STEPS,
) -> torch.Tensor:
    """alpha-bar for ``t = 0 .. steps`` (float64), ``t = 0`` the clean image."""
    from monai.networks.schedulers import DDPMScheduler

    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")
    scheduler = DDPMScheduler(
        num_train_timesteps=steps, schedule=BETA_SCHEDULES[schedule],
        beta_start=beta_start, beta_end=beta_end,
    )
    return torch.cat([torch.ones(1, dtype=torch.float64),
                      scheduler.alphas_cumprod.to(torch.float64)])


def timestep_grid(t_stop: int, steps: int) -> list[int]:
    """``steps + 1`` distinct integer timesteps ``0 = t_0 < ... < t_n = t_stop``, evenly
    spaced (rounded)."""
    if not 1 <= steps <= t_stop:
        raise ValueError(f"need 1 <= steps <= t_stop, got steps={steps}, t_stop={t_stop}")
    grid = np.round(np.linspace(0, t_stop, steps + 1)).astype(int)
    return [int(t) for t in grid]


def _coefficients(abar: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t), shaped to broadcast over ``like``."""
    value = abar.to(like.device)[t].to(like.dtype)
    if value.ndim:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))
    return value.sqrt(), (1.0 - value).sqrt()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              abar: torch.Tensor) -> torch.Tensor:
    """The forward process (Eq. 1): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` per sample."""
    signal, spread = _coefficients(abar, t, x0)
    return signal * x0 + spread * noise


def estimate_clean(x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
                   abar: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of the clean image (Eq. 4).

    The paper writes ``1 / sqrt(alpha_t)``; the estimate that inverts Eq. 1 divides by
    ``sqrt(alpha-bar_t)``, as the public code's scheduler does (``pred_original_sample``).
    """
    signal, spread = _coefficients(abar, t, x_t)
    return (x_t - spread * eps) / signal


def _query(t: int) -> int:
    return max(int(t), 1)


def invert(eps_fn: EpsFn, x0: torch.Tensor, grid: Sequence[int],
           abar: torch.Tensor) -> torch.Tensor:
    """DDIM inversion of ``x0`` to ``grid[-1]`` with the model's own noise (Eq. 10).

    Each step puts the fixed clean image in the signal slot and the network's noise
    estimate at the current state in the noise slot, so the result lies at exactly
    alpha-bar(t_stop) between ``x0`` and the model's noise: the "CDM-generated noise" the
    paper adds instead of random noise.
    """
    x = x0
    for t, t_next in zip(grid[:-1], grid[1:]):
        signal, spread = _coefficients(abar, t_next, x0)
        x = signal * x0 + spread * eps_fn(x, _query(t))
    return x


def reverse_step(eps_fn: EpsFn, x: torch.Tensor, t: int, t_prev: int, abar: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step from ``t`` to ``t_prev`` (Eq. 9): the next state and the
    one-step clean estimate it was built from."""
    eps = eps_fn(x, _query(t))
    clean = estimate_clean(x, eps, _query(t), abar)
    signal, spread = _coefficients(abar, t_prev, x)
    return signal * clean + spread * eps, clean


def reverse(eps_fn: EpsFn, x: torch.Tensor, grid: Sequence[int],
            abar: torch.Tensor) -> torch.Tensor:
    """Reverse diffusion from ``grid[-1]`` down to ``grid[0]`` with Eq. 9.

    Eq. 9 re-estimates the clean image at every step. The paper's stage-2 Eq. 11 (and
    Algorithm 2, line 18) puts the fixed stage-1 image in that slot instead; at ``t_0 = 0``
    that returns the fixed image itself whatever the network says, so fine-tuning could not
    change the output, and it is not used.
    """
    for t, t_prev in zip(reversed(grid[1:]), reversed(grid[:-1])):
        x, _ = reverse_step(eps_fn, x, t, t_prev, abar)
    return x


def reverse_last_k(eps_fn: EpsFn, x: torch.Tensor, grid: Sequence[int], abar: torch.Tensor,
                   last_k: int) -> Iterator[torch.Tensor]:
    """Reverse diffusion for training: without gradients down to ``grid[last_k]``, then one
    step at a time, yielding each of the last ``last_k`` steps' clean estimate with its graph.

    The caller takes a loss and an optimiser step on each yielded estimate before the next
    step runs, so each of those steps is its own update, made with the weights the previous
    update left (the public code's ``last_k`` mode); the state between steps is detached,
    which bounds the memory to one network evaluation.
    """
    last_k = min(max(int(last_k), 1), len(grid) - 1)
    with torch.no_grad():
        x = reverse(eps_fn, x, grid[last_k:], abar)
    for k in range(last_k, 0, -1):
        x_prev, clean = reverse_step(eps_fn, x.detach(), grid[k], grid[k - 1], abar)
        yield clean
        x = x_prev.detach()
