"""Rectified flow (Liu et al. 2023): its training objective and its ODE sampler.

Time runs from noise (t = 0) to data (t = 1) on the straight path ``t x1 + (1 - t) x0``; the
network predicts, from the state, the time and its condition channels, either the velocity
``x1 - x0`` (``prediction='velocity'``, the paper) or the clean image ``x1``
(``prediction='x1'``), whose velocity is ``(x1_hat - x_t) / (1 - t)``. Predicting ``x1`` spares
a small network the exact ``-x_t`` path the velocity needs and trains several times faster at
a small budget; with one Euler step the sample is then ``x1_hat`` itself. Written here
rather than taken from MONAI's ``RFlowScheduler``: that scheduler works on discrete,
reversed timesteps and its ``step`` is an Euler step only, while BlindHarmonyDiff
integrates continuous time with the midpoint method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SOLVERS = ("euler", "midpoint")
PREDICTIONS = ("velocity", "x1")
#: Floor of ``1 - t`` when an x1 prediction is turned into a velocity near t = 1.
MIN_REMAINING_TIME = 1e-3

#: Called after ODE step ``k`` (1-based) with the state at that step; returns the new state.
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]


def rectified_flow_loss(
    network: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator,
    prediction: str = "velocity",
) -> torch.Tensor:
    """The flow-matching loss at t ~ U(0, 1), x0 ~ N(0, I), x_t = t x1 + (1 - t) x0.

    ``velocity``: ``||(x1 - x0) - v(x_t, t; c)||²``; ``x1``: ``||x1 - x1_hat(x_t, t; c)||²``
    (the velocity loss weighted by ``(1 - t)²``, finite at t = 1). ``batch`` holds the data
    ``x1`` in channel 0 and the condition ``c`` in the others; noise and times come from
    ``generator`` (on the CPU, so a run repeats on any device).
    """
    _check_prediction(prediction)
    target, condition = batch[:, :1], batch[:, 1:]
    noise = torch.randn(target.shape, generator=generator).to(batch.device)
    times = torch.rand(batch.shape[0], generator=generator).to(batch.device)
    t = times[:, None, None, None, None]
    noisy = t * target + (1.0 - t) * noise
    output = network(torch.cat([noisy, condition], dim=1), times)
    wanted = target if prediction == "x1" else target - noise
    return torch.mean((wanted - output) ** 2)


def velocity(
    network: torch.nn.Module, x: torch.Tensor, t: float, condition: torch.Tensor,
    dtype: torch.dtype | None = None, prediction: str = "velocity",
) -> torch.Tensor:
    """The velocity at state ``x`` and time ``t`` (one value for the batch), the network
    evaluated under autocast to ``dtype`` unless it is ``None``, returned in ``x``'s dtype."""
    times = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        output = network(torch.cat([x, condition], dim=1), times).to(x.dtype)
    if prediction == "x1":
        return (output - x) / max(1.0 - t, MIN_REMAINING_TIME)
    return output


def ode_step(
    network: torch.nn.Module, x: torch.Tensor, t: float, h: float, condition: torch.Tensor,
    solver: str, dtype: torch.dtype | None = None, prediction: str = "velocity",
) -> torch.Tensor:
    """One Euler or explicit-midpoint step of size ``h`` from time ``t``."""
    if solver == "euler":
        return x + h * velocity(network, x, t, condition, dtype, prediction)
    if solver != "midpoint":
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    half = x + 0.5 * h * velocity(network, x, t, condition, dtype, prediction)
    return x + h * velocity(network, half, t + 0.5 * h, condition, dtype, prediction)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}"
        )


@torch.no_grad()
def integrate(
    network: torch.nn.Module,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int,
    solver: str,
    dtype: torch.dtype | None = None,
    after_step: AfterStep | None = None,
    prediction: str = "velocity",
) -> torch.Tensor:
    """The ODE from ``noise`` at t = 0 to t = 1 in ``steps`` equal steps.

    ``after_step`` lets a caller guide the trajectory between steps (e.g. toward a source
    image); the state ``x`` keeps ``noise``'s dtype whatever ``dtype`` the network runs in.
    """
    _check_prediction(prediction)
    network.eval()
    h = 1.0 / steps
    x = noise
    for k in range(steps):
        x = ode_step(network, x, k * h, h, condition, solver, dtype, prediction)
        if after_step is not None:
            x = after_step(k + 1, x)
    return x
