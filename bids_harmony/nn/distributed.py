"""Group-level training on several processes (GPUs) started by ``torchrun``.

PyTorch does the work: ``torchrun --nproc-per-node N`` starts N copies of the command with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set, :func:`start` joins them in a process group
(NCCL on GPUs, gloo on CPUs), and :func:`replicate` wraps a network in
``DistributedDataParallel``, which broadcasts rank 0's weights once and averages the
gradients of every backward pass across the processes, so every rank takes the same
optimiser step and holds the same weights. This module only says who is who and keeps the
few things DDP does not cover (the loss for the record, statistics kept outside the
networks, the generator states of a checkpoint) the same on every rank.

The distributed sampler: our trainers draw random crops, slices and pairs with
replacement from a ``torch.Generator``, not epochs over an index list, so torch's
``DistributedSampler`` (which shards an epoch's permutation) has nothing to shard. Each rank
draws from its own stream instead (:func:`rank_stream`: the run's seed plus a stride per
rank; rank 0 keeps the single-process stream), so N ranks see N independent batches per
step: N times the batch of one process, as DDP intends.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function is a no-op and training is
the single-process training, bit for bit.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

#: Seed offset between two ranks' random streams (a prime, far from the seeds users give).
RANK_SEED_STRIDE = 1_000_003
#: How long a rank waits for the others at a collective: the group level's ranks meet after
#: their preprocessing, which one of them may still be finishing.
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Whether ``torchrun`` (or any launcher that sets ``WORLD_SIZE``) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 writes the model, the card, the checkpoints and the reports."""
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the ``torchrun`` process group (nothing without one): NCCL when the learned
    harmonizers run on CUDA, each rank on the GPU of its ``LOCAL_RANK``; gloo on CPUs."""
    if not launched() or active():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def stop() -> None:
    if active():
        dist.destroy_process_group()


class _MethodAsForward(torch.nn.Module):
    """``module.<method>`` as ``forward``: DDP synchronises what goes through ``forward``,
    and a flow trains through ``log_prob``, a style encoder through ``embed_slices``."""

    def __init__(self, module: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


def replicate(module: torch.nn.Module, method: str | None = None) -> torch.nn.Module:
    """What a training step must call instead of ``module`` (or ``module.<method>``): a
    ``DistributedDataParallel`` replica under ``torchrun``, the module itself otherwise.

    Build it once, after the module is on its device and before the first step; the
    optimiser keeps the module's own parameters, and checkpoints and models save the module.
    """
    target = module if method is None else _MethodAsForward(module, method)
    if world_size() == 1:
        return target
    parameter = next(module.parameters())
    device_ids = [parameter.device.index] if parameter.device.type == "cuda" else None
    return DistributedDataParallel(target, device_ids=device_ids)


def rank_stream(generator: torch.Generator) -> torch.Generator:
    """Re-seed ``generator`` for this rank (see the module docstring); rank 0 is unchanged."""
    if rank() > 0:
        generator.manual_seed(generator.initial_seed() + RANK_SEED_STRIDE * rank())
    return generator


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (the loss a step records)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor) / world_size()


def average_buffers(module: torch.nn.Module) -> None:
    """Replace ``module``'s floating-point buffers by their mean over the ranks: running
    statistics a step updates from its own batch (e.g. SGCD's EMA histograms), which DDP
    leaves alone, stay the same on every rank."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size()


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, between ``backward`` and the
    optimiser step: what DDP does, for a step that calls its networks several times per
    backward pass (a translation cycle through one generator), which a DDP wrapper refuses."""
    if world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size()


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (the generator states of a checkpoint)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def parameters_agree(module: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights (the check that a trainer called
    :func:`replicate`): compares each rank's sum and sum of squares with rank 0's."""
    if world_size() == 1:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        moments = torch.stack([flat.sum(), flat.square().sum()]).to(_collective_device())
    reference = moments.clone()
    dist.broadcast(reference, src=0)
    agree = torch.tensor([float(torch.allclose(moments, reference, rtol=1e-6, atol=1e-8))],
                         device=_collective_device())
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item())


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
