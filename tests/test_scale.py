"""Participants on a real (one-node, localhost) SLURM cluster, by both routes the README
documents: Nipype's ``SLURMGraph`` plugin and a job array of whole participant runs
(``examples/slurm``). Each must write exactly what a local MultiProc run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from outputs import content_differences, output_content
from slurm_cluster import local_cluster, missing_binaries, wait_for_jobs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--resolution", "2", "--suffix", "T1w"]
APP = [sys.executable, "-m", "bids_harmony"]
QUEUE_SECONDS = 900


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([*APP, *map(str, args)], capture_output=True, text=True,
                            timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing; .ci/run installs "
                    "Debian's slurm-wlm and munge)")
    # Daemons' sockets and state want a short path that every job can reach.
    with local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.fixture(scope="module")
def reference(small_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The three-step chain with MultiProc: what every scheduler must reproduce."""
    out = tmp_path_factory.mktemp("multiproc") / "out"
    _cli(small_bids, out, "participant", *COMMON, "--nprocs", "2")
    preprocessed = output_content(out)
    _cli(small_bids, out, "group", *COMMON, "--nprocs", "2")
    grouped = output_content(out)
    _cli(small_bids, out, "participant", *COMMON, "--nprocs", "2")
    return {"preprocessed": preprocessed, "grouped": grouped,
            "harmonized": output_content(out)}


def test_the_participant_level_through_slurm_graph(cluster: dict[str, str], small_bids: Path,
                                                   reference: dict[str, dict],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    _cli(small_bids, out, "participant", *COMMON, "--plugin", "SLURMGraph",
         "-w", tmp_path / "work", env=cluster)
    wait_for_jobs(cluster, QUEUE_SECONDS)
    batch = tmp_path / "work" / "bids_harmony_wf" / "batch"
    register = [line for line in (batch / "submit_jobs.sh").read_text().splitlines()
                if "_register=$(sbatch" in line]
    assert len(register) == 2 and all("--cpus-per-task=1 --mem=" in ln for ln in register)
    assert len(list(batch.glob("*.sh.o"))) > 20  # every node ran as a SLURM job
    differences = content_differences(output_content(out), reference["preprocessed"])
    assert not differences, "\n".join(differences)


def test_the_group_level_through_slurm(cluster: dict[str, str], small_bids: Path,
                                       reference: dict[str, dict], tmp_path: Path) -> None:
    """``--plugin SLURM`` submits each missing preprocessing step as a job and waits, so
    the group level fits on their results in the same command."""
    out = tmp_path / "out"
    _cli(small_bids, out, "group", *COMMON, "--plugin", "SLURM", "--plugin-args",
         '{"sbatch_args": "-p debug"}', "-w", tmp_path / "work", env=cluster)
    submitted = list((tmp_path / "work").rglob("batch/*.sh"))
    assert len(submitted) > 20, submitted  # one batch script per preprocessing step
    differences = content_differences(output_content(out), reference["grouped"])
    assert not differences, "\n".join(differences)


def test_the_job_array_route(cluster: dict[str, str], small_bids: Path,
                             reference: dict[str, dict], tmp_path: Path) -> None:
    """``examples/slurm/submit.sh``: a participant array, the group job, an apply array."""
    out = tmp_path / "out"
    env = {**cluster, "BIDS_HARMONY": " ".join(APP), "MAX_PARALLEL": "2", "PER_TASK": "1",
           "PARTICIPANT_SBATCH": "--cpus-per-task=1 --mem=2G",
           "GROUP_SBATCH": "--cpus-per-task=2 --mem=3G"}
    submitted = subprocess.run(["bash", ROOT / "examples" / "slurm" / "submit.sh", small_bids,
                                out, *COMMON], env=env, capture_output=True, text=True,
                               timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    wait_for_jobs(cluster, QUEUE_SECONDS)
    logs = sorted((out / "logs" / "slurm").glob("*.out"))
    assert [log.name.split("-")[0] for log in logs].count("participant") == 2, logs
    differences = content_differences(output_content(out), reference["harmonized"])
    assert not differences, "\n".join(differences)


@pytest.mark.parametrize(("task", "per_task", "labels"),
                         [("1", "1", "01"), ("2", "1", "02"), ("1", "2", "01 02"),
                          ("3", "1", None), ("2", "2", None)])
def test_array_tasks_take_their_lines_of_participants_tsv(
        task: str, per_task: str, labels: str | None, small_bids: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": task, "PER_TASK": per_task,
           "BIDS_HARMONY": "echo"}
    result = subprocess.run(["bash", ROOT / "examples" / "slurm" / "participant.sbatch",
                             small_bids, tmp_path / "out", "--suffix", "T1w"], env=env,
                            capture_output=True, text=True, timeout=60)
    if labels is None:
        assert result.returncode == 64
        assert f"participants.tsv has no line for array task {task}" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"participant --participant-label {labels} --nprocs 1 --suffix T1w" in (
            result.stdout)


def test_array_tasks_count_participants_as_submit_sh_does(tmp_path: Path) -> None:
    """Blank rows take no array task: task N is the N-th participant that submit.sh counted."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "participant_id\tsite\nsub-01\tA\n\nsub-02\tB\n\t\nsub-03\tA\n")
    env = {**os.environ, "PER_TASK": "1", "BIDS_HARMONY": "echo"}
    chosen = []
    for task in ("1", "2", "3", "4"):
        result = subprocess.run(
            ["bash", ROOT / "examples" / "slurm" / "participant.sbatch", bids, tmp_path / "out"],
            env={**env, "SLURM_ARRAY_TASK_ID": task}, capture_output=True, text=True,
            timeout=60)
        chosen.append(result.stdout.split("--participant-label ")[-1].split(" --")[0]
                      if result.returncode == 0 else result.returncode)
    assert chosen == ["01", "02", "03", 64]


def test_each_step_asks_slurm_for_its_memory_unless_the_user_did() -> None:
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from bids_harmony.workflows.plugins import node_resources, request_resources

    def _workflow() -> pe.Workflow:
        workflow = pe.Workflow(name="sized")
        workflow.add_nodes([
            pe.Node(niu.IdentityInterface(fields=["x"]), name="register",
                    **node_resources("register", 1, omp_nthreads=4)),
            pe.Node(niu.IdentityInterface(fields=["x"]), name="light",
                    **node_resources("light", 2, omp_nthreads=4)),
        ])
        return workflow

    workflow = _workflow()
    request_resources(workflow, "SLURMGraph", {})
    asked = {node.name: node.plugin_args["sbatch_args"] for node in workflow._get_all_nodes()}
    assert asked == {"register": " --cpus-per-task=4 --mem=1280M",
                     "light": " --cpus-per-task=1 --mem=205M"}  # Nipype's 0.2 GB default
    workflow = _workflow()
    request_resources(workflow, "SLURM", {"sbatch_args": "-p short --mem=6G"})
    assert {node.plugin_args["sbatch_args"] for node in workflow._get_all_nodes()} == {
        " --cpus-per-task=4", " --cpus-per-task=1"}
    workflow = _workflow()
    request_resources(workflow, "MultiProc", {})
    assert all(not node.plugin_args for node in workflow._get_all_nodes())
