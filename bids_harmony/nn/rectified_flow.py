"""Rectified flow (Liu et al. 2023): its training objective and its ODE sampler.

Time runs from noise (t = 0) to data (t = 1) on the straight path ``t x1 + (1 - t) x0``; the
network predicts the velocity ``x1 - x0`` from the state, the time and its condition
channels. Written here rather than taken from MONAI's ``RFlowScheduler``: that scheduler
works on discrete, reversed timesteps and its ``step`` is an Euler step only, while
BlindHarmonyDiff integrates continuous time with the midpoint method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SOLVERS = ("euler", "midpoint")

#: Called after ODE step ``k`` (1-based) with the state at that step; returns the new state.
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]


def rectified_flow_loss(
    network: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``||(x1 - x0) - v(t x1 + (1 - t) x0, t; c)||²`` with t ~ U(0, 1), x0 ~ N(0, I).

    ``batch`` holds the data ``x1`` in channel 0 and the condition ``c`` in the others;
    noise and times come from ``generator`` (on the CPU, so a run repeats on any device).
    """
    target, condition = batch[:, :1], batch[:, 1:]
    noise = torch.randn(target.shape, generator=generator).to(batch.device)
    times = torch.rand(batch.shape[0], generator=generator).to(batch.device)
    t = times[:, None, None, None, None]
    noisy = t * target + (1.0 - t) * noise
    velocity = network(torch.cat([noisy, condition], dim=1), times)
    return torch.mean((target - noise - velocity) ** 2)


def velocity(
    network: torch.nn.Module, x: torch.Tensor, t: float, condition: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The network's velocity at state ``x`` and time ``t`` (one value for the batch),
    evaluated under autocast to ``dtype`` unless it is ``None``, returned in ``x``'s dtype."""
    times = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return network(torch.cat([x, condition], dim=1), times).to(x.dtype)


def ode_step(
    network: torch.nn.Module, x: torch.Tensor, t: float, h: float, condition: torch.Tensor,
    solver: str, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One Euler or explicit-midpoint step of size ``h`` from time ``t``."""
    if solver == "euler":
        return x + h * velocity(network, x, t, condition, dtype)
    if solver != "midpoint":
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    half = x + 0.5 * h * velocity(network, x, t, condition, dtype)
    return x + h * velocity(network, half, t + 0.5 * h, condition, dtype)


@torch.no_grad()
def integrate(
    network: torch.nn.Module,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int,
    solver: str,
    dtype: torch.dtype | None = None,
    after_step: AfterStep | None = None,
) -> torch.Tensor:
    """The ODE from ``noise`` at t = 0 to t = 1 in ``steps`` equal steps.

    ``after_step`` lets a caller guide the trajectory between steps (e.g. toward a source
    image); the state ``x`` keeps ``noise``'s dtype whatever ``dtype`` the network runs in.
    """
    network.eval()
    h = 1.0 / steps
    x = noise
    for k in range(steps):
        x = ode_step(network, x, k * h, h, condition, solver, dtype)
        if after_step is not None:
            x = after_step(k + 1, x)
    return x
