"""Nipype's execution plugins: which ones the app offers, what each is given, and how the
heavy steps' resource estimates reach a batch scheduler.

Scaling out is Nipype's job (its MultiProc, SLURM, SGE, PBS, LSF, Condor, OAR and graph
plugins); this module only chooses the plugin's arguments. Each heavy node carries
``n_procs`` and ``mem_gb`` (:data:`NODE_RESOURCES`, measured by
``benchmarks/participant_cost.py``): MultiProc packs nodes into ``--nprocs``/``--mem-gb`` with
them, and for ``SLURM``/``SLURMGraph`` they become each job's ``--cpus-per-task`` and
``--mem``, so the scheduler packs the jobs the same way. Other schedulers spell memory
requests per site (SGE's ``h_vmem`` is per slot, PBS Pro and Torque differ): give them in
``--plugin-args`` (``qsub_args``, ``bsub_args``).

Imports nothing heavy: the command-line parser reads :data:`NIPYPE_PLUGINS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: The plugins ``--plugin`` accepts, with Nipype's names.
NIPYPE_PLUGINS = (
    "Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph",
    "LSF", "Condor", "DAGMan", "OAR",
)
#: Plugins that submit the whole graph as dependent jobs and return before any has run.
SUBMIT_AND_RETURN = frozenset({"SLURMGraph", "SGEGraph", "PBSGraph", "DAGMan"})
#: Plugins that run every node on this machine.
LOCAL_PLUGINS = frozenset({"Linear", "MultiProc"})
#: Seconds between two looks at the workers: a local process is seen at once, while every
#: look of a batch plugin runs ``squeue``/``qstat`` once per job (2 s is Nipype's default).
POLL_SECONDS = {"local": 0.05, "batch": 2.0}

#: Memory (GB) to ask for the heavy steps at 1 mm: the peak resident memory of the process
#: that ran each step (Python and its libraries included) in
#: ``benchmarks/results/participant_cost.md``, real 1 mm heads with skull, rounded up by a
#: quarter or more for larger fields of view (the peaks varied by up to a fifth between
#: runs). ``register`` also takes ``--omp-nthreads`` processors.
#: ``harmonize`` is sized for the learned methods (a network, torch and a sampler's state;
#: ``histmatch`` peaked at 0.78 GB); ``to_native`` as the other resampling steps.
NODE_RESOURCES: Mapping[str, float] = {
    "n4": 0.5,
    "skullstrip": 1.5,
    "register": 1.25,
    "warp_brain": 1.0,
    "warp_mask": 1.0,
    "normalize": 1.0,
    "edges": 1.25,
    "preprocessing_qc": 1.25,
    "harmonize": 3.0,
    "to_native": 1.0,
}


def default_plugin(nprocs: int) -> str:
    """MultiProc when more than one process is allowed, else Linear."""
    return "MultiProc" if nprocs > 1 else "Linear"


def plugin_arguments(plugin: str, nprocs: int, mem_gb: float | None,
                     given: Mapping[str, Any]) -> dict[str, Any]:
    """What ``workflow.run(plugin_args=...)`` receives; ``given`` (``--plugin-args``)
    overrides key by key.

    MultiProc gets ``--nprocs`` and ``--mem-gb`` (a node asking for more than exists still
    runs, alone). SLURMGraph gets ``dont_resubmit_completed_jobs``, so a resubmission skips
    the steps whose results are cached (Nipype 1.x also fails without the key).
    """
    arguments: dict[str, Any] = {}
    if plugin == "MultiProc":
        arguments = {"n_procs": nprocs, "raise_insufficient": False}
        if mem_gb:
            arguments["memory_gb"] = mem_gb
    elif plugin == "SLURMGraph":
        arguments = {"dont_resubmit_completed_jobs": True}
    arguments.update(given)
    return arguments


def poll_seconds(plugin: str) -> float:
    """Nipype's ``poll_sleep_duration`` for ``plugin``."""
    return POLL_SECONDS["local" if plugin in LOCAL_PLUGINS else "batch"]


def scale_for_resolution(mem_gb: float, resolution: int) -> float:
    """A 1 mm estimate at ``resolution`` mm: the template grid has ``resolution**3`` fewer
    voxels, but the process, its libraries and the native image do not shrink; the
    benchmark's 2 mm peaks were 0.75-1.0 times the 1 mm ones (this gives 0.78)."""
    return mem_gb * (0.75 + 0.25 / resolution**3)


def node_resources(name: str, resolution: int, omp_nthreads: int) -> dict[str, Any]:
    """``n_procs``/``mem_gb`` keyword arguments for the node ``name`` (empty for a light
    node, which keeps Nipype's defaults of 1 processor and 0.2 GB)."""
    if name not in NODE_RESOURCES:
        return {}
    return {
        "mem_gb": round(scale_for_resolution(NODE_RESOURCES[name], resolution), 2),
        "n_procs": omp_nthreads if name == "register" else 1,
    }


def request_resources(workflow: Any, plugin: str, given: Mapping[str, Any]) -> None:
    """Give each node of ``workflow`` its scheduler request: for SLURM plugins,
    ``--cpus-per-task`` and ``--mem`` from the node's ``n_procs`` and ``mem_gb``.

    Nipype appends a node's ``sbatch_args`` to those of ``--plugin-args`` (``given``), and
    sbatch takes the last of a repeated option, so a request the user spelled out there
    (``--mem``, ``--cpus-per-task``, ``-c``) is left out rather than overridden.
    """
    if plugin not in ("SLURM", "SLURMGraph"):
        return
    user = str(given.get("sbatch_args", "")).split()
    user_sets = {option: any(arg in aliases or arg.startswith(option + "=") for arg in user)
                 for option, aliases in (("--cpus-per-task", ("--cpus-per-task", "-c")),
                                         ("--mem", ("--mem",)))}
    for node in workflow._get_all_nodes():
        request = []
        if not user_sets["--cpus-per-task"]:
            request.append(f"--cpus-per-task={node.n_procs}")
        if not user_sets["--mem"]:
            request.append(f"--mem={math.ceil(float(node.mem_gb) * 1024)}M")
        if request:
            # The leading space keeps SLURMGraph's plain concatenation apart.
            node.plugin_args = {**node.plugin_args, "sbatch_args": " " + " ".join(request)}
