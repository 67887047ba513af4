"""A hostile user's inputs, kills and parallel jobs, through the real CLI.

Every bad input must end in one line on stderr that names the file at fault, with the exit
code of its cause, no traceback, the input dataset untouched and no partial file in the
output. Most cases fail before any workflow starts and run in this process; the kill and
concurrency cases run real participant and group levels as separate processes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_harmony.cli.run import main
from bids_harmony.errors import ExitCode
from outputs import output_content

pytestmark = pytest.mark.slow

COMMON = ["--resolution", "2", "--nprocs", "1", "--suffix", "T1w"]
IMAGE = Path("sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz")
T2W = Path("sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz")


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".partial" in p.name
            or (p.parent.name == ".staging" and p.is_dir())]


# -- bad images: each one written here --------------------------------------------------------
def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None,
             dtype: type | None = None, header_edit: Callable | None = None) -> None:
    image = nb.load(path)
    data = np.asarray(image.dataobj) if data is None else data
    new = nb.Nifti1Image(data.astype(dtype or data.dtype), image.affine if affine is None
                         else affine)
    new.set_qform(new.affine, 1)
    new.set_sform(new.affine, 1)
    if header_edit is not None:
        header_edit(new)
    path.unlink()
    nb.save(new, path)


def _truncated(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 3])


def _gzip_corrupt(path: Path) -> None:
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle: middle + 64] = bytes(64)
    path.write_bytes(bytes(content))


def _unknown_datatype(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[70:72] = (999).to_bytes(2, "little")  # datatype code of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(raw)))


def _data(path: Path) -> np.ndarray:
    return np.asarray(nb.load(path).dataobj).astype(np.float32)


def _with_fraction(path: Path, value: float) -> None:
    data = _data(path)
    rng = np.random.default_rng(0)
    data.flat[rng.choice(data.size, data.size // 100, replace=False)] = value
    _rewrite(path, data)


def _overflowed(path: Path) -> None:
    data = _data(path)
    _rewrite(path, (data / data.max() * 90000).astype(np.int32).astype(np.int16))


def _zooms(path: Path, size: float) -> None:
    image = nb.load(path)
    _rewrite(path, affine=np.diag([size, size, size, 1.0]) @ np.diag(
        [1 / z for z in image.header.get_zooms()[:3]] + [1]) @ image.affine)


def _sheared(path: Path) -> None:
    affine = nb.load(path).affine.copy()
    affine[0, 1] = 1.0
    _rewrite(path, affine=affine)


def _singular(path: Path) -> None:
    """The third affine column zeroed in the raw header (nibabel refuses to write it)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[252:254] = (0).to_bytes(2, "little")  # qform_code 0: the sform is the affine
    raw[254:256] = (1).to_bytes(2, "little")
    for row in (280, 296, 312):  # srow_x, srow_y, srow_z: float32 x 4 each
        raw[row + 8: row + 12] = np.float32(0.0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _forms_disagree(path: Path) -> None:
    image = nb.load(path)
    shifted = image.affine.copy()
    shifted[:3, 3] += 30.0

    def edit(new: nb.Nifti1Image) -> None:
        new.set_sform(shifted, 1)
    _rewrite(path, header_edit=edit)


BAD_IMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "zero-byte": (lambda p: p.write_bytes(b""), "empty"),
    "truncated": (_truncated, "truncated|corrupt|cannot be read"),
    "gzip-corrupt": (_gzip_corrupt, "truncated|corrupt|cannot be read"),
    "not-nifti": (lambda p: p.write_bytes(gzip.compress(b"hello, not an image\n" * 40)),
                  "NIfTI|cannot be read"),
    "unknown-datatype": (_unknown_datatype, "datatype"),
    "4d": (lambda p: _rewrite(p, np.stack([_data(p)] * 3, axis=-1)), "4D"),
    "2d": (lambda p: _rewrite(p, _data(p)[:, :, 40]), "2D"),
    "all-zeros": (lambda p: _rewrite(p, np.zeros_like(_data(p))), "constant|zero"),
    "all-nan": (lambda p: _rewrite(p, np.full_like(_data(p), np.nan)), "NaN|finite"),
    "one-percent-nan": (lambda p: _with_fraction(p, np.nan), "NaN|finite"),
    "one-percent-inf": (lambda p: _with_fraction(p, np.inf), "Inf|finite"),
    "singular-affine": (_singular, "singular|affine"),
    "sheared-affine": (_sheared, "shear"),
    "sform-qform-disagree": (_forms_disagree, "sform|qform"),
    "int16-overflow": (_overflowed, "negative|overflow"),
    "voxels-0.1mm": (lambda p: _zooms(p, 0.1), "voxel"),
    "voxels-10mm": (lambda p: _zooms(p, 10.0), "voxel"),
    "fov-8x8x8": (lambda p: _rewrite(p, _data(p)[40:48, 50:58, 40:48]), "field of view"),
}


def _case_dataset(small_bids: Path, tmp_path: Path) -> Path:
    bids = tmp_path / "bids"
    shutil.copytree(small_bids, bids)
    return bids


def _run_main(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def _assert_clean_failure(code: int, output: str, expected: int, names: str, bids: Path,
                          before: str, out: Path) -> None:
    assert code == expected, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("bids_harmony: error")]
    assert len(errors) == 1, output[-2000:]
    assert names in errors[0], errors[0]
    assert _tree_digest(bids) == before
    assert not _partials(out) if out.exists() else True


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_a_bad_image_fails_fast_naming_the_file(kind: str, small_bids: Path, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    import re

    bids = _case_dataset(small_bids, tmp_path)
    damage, expected_words = BAD_IMAGES[kind]
    damage(bids / IMAGE)
    before = _tree_digest(bids)
    started = time.monotonic()
    code, output = _run_main(capfd, bids, tmp_path / "out", "participant", *COMMON,
                             "--skip-bids-validation")
    _assert_clean_failure(code, output, ExitCode.DATA_ERROR, IMAGE.name, bids, before,
                          tmp_path / "out")
    assert re.search(expected_words, output, re.IGNORECASE), output[-1000:]
    assert time.monotonic() - started < 20, "checked before the workflow"
    assert not list((tmp_path / "out").glob("sub-*/ses-*/anat/*")), "nothing processed"


def test_every_bad_image_is_reported_at_once(small_bids: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    bids = _case_dataset(small_bids, tmp_path)
    other = next(bids.glob("sub-02/ses-*/anat/*_T1w.nii.gz"))
    BAD_IMAGES["4d"][0](bids / IMAGE)
    BAD_IMAGES["all-zeros"][0](other)
    before = _tree_digest(bids)
    code, output = _run_main(capfd, bids, tmp_path / "out", "participant", *COMMON)
    _assert_clean_failure(code, output, ExitCode.DATA_ERROR, IMAGE.name, bids, before,
                          tmp_path / "out")
    assert other.name in output and "--skip-image-checks" in output


# -- bad datasets, tables and options ---------------------------------------------------------
def _edit(relative: str, text: str | bytes) -> Callable[[Path], None]:
    def apply(bids: Path) -> None:
        target = bids / relative
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    return apply


def _participants_site(rows: str) -> Callable[[Path], None]:
    return _edit("participants.tsv", "participant_id\tsite\n" + rows)


DATASET_CASES: dict[str, tuple[Callable[[Path], None], list[str], int, str]] = {
    "description-is-a-list": (_edit("dataset_description.json", "[1, 2]"), [],
                              ExitCode.VALIDATION_FAILED, "dataset_description.json"),
    "description-is-empty-object": (_edit("dataset_description.json", "{}"), [],
                                    ExitCode.VALIDATION_FAILED, "dataset_description.json"),
    "description-missing": (lambda b: (b / "dataset_description.json").unlink(), [],
                            ExitCode.VALIDATION_FAILED, "dataset_description.json"),
    "invalid-sidecar-json": (_edit(str(IMAGE).replace(".nii.gz", ".json"), "{oops"),
                             ["--skip-bids-validation"], ExitCode.DATA_ERROR,
                             "sub-01_ses-01_T1w.json"),
    "sidecar-not-an-object": (_edit(str(IMAGE).replace(".nii.gz", ".json"), '"text"'),
                              [], ExitCode.DATA_ERROR, "sub-01_ses-01_T1w.json"),
    "participant-twice-two-sites": (_participants_site("sub-01\tA\nsub-02\tB\nsub-01\tC\n"),
                                    [], ExitCode.DATA_ERROR, "participants.tsv"),
    "participant-twice-same-site": (_participants_site("sub-01\tA\nsub-01\tA\nsub-02\tB\n"),
                                    [], ExitCode.DATA_ERROR, "participants.tsv"),
    "row-with-extra-cells": (_participants_site("sub-01\tA\textra\nsub-02\tB\n"), [],
                             ExitCode.DATA_ERROR, "participants.tsv"),
    "site-column-nowhere": (lambda b: None, ["--site-column", "scanner_site"], ExitCode.USAGE,
                            "scanner_site"),
    "site-map-duplicates": (_edit("../sitemap.tsv", "participant_id\tsite\nsub-01\tA\n"
                                  "sub-01\tB\n"), ["--site-map", "SITEMAP"],
                            ExitCode.DATA_ERROR, "sitemap.tsv"),
    "mem-gb-negative": (lambda b: None, ["--mem-gb", "-4"], ExitCode.USAGE, "--mem-gb"),
    "nprocs-zero": (lambda b: None, ["--nprocs", "0"], ExitCode.USAGE, "--nprocs"),
    "unknown-participant": (lambda b: None, ["--participant-label", "99"],
                            ExitCode.INPUT_MISSING, "sub-99"),
    "unknown-target-site": (lambda b: None, ["--target-site", "Mars"], ExitCode.DATA_ERROR,
                            "Mars"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_a_bad_dataset_or_option_fails_with_one_line(case: str, small_bids: Path,
                                                     tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    bids = _case_dataset(small_bids, tmp_path)
    damage, extra, expected, names = DATASET_CASES[case]
    damage(bids)
    extra = [str(tmp_path / "sitemap.tsv") if a == "SITEMAP" else a for a in extra]
    before = _tree_digest(bids)
    argv = [bids, tmp_path / "out", "participant", *COMMON, *extra]
    if case == "nprocs-zero" or case == "mem-gb-negative":
        with pytest.raises(SystemExit) as stopped:
            main([str(a) for a in argv])
        captured = capfd.readouterr()
        code, output = int(stopped.value.code), captured.out + captured.err
        assert code == expected and names in output and "Traceback" not in output
        return
    code, output = _run_main(capfd, *argv)
    _assert_clean_failure(code, output, expected, names, bids, before, tmp_path / "out")


def test_a_gpu_that_is_not_there_is_refused_at_once(small_bids: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bids = _case_dataset(small_bids, tmp_path)
    before = _tree_digest(bids)
    code, output = _run_main(capfd, bids, tmp_path / "out", "group", *COMMON,
                             "--method", "blindharmony", "--device", "cuda")
    _assert_clean_failure(code, output, ExitCode.USAGE, "--device cuda", bids, before,
                          tmp_path / "out")


def test_tables_are_read_strictly_but_kindly(small_bids: Path, tmp_path: Path) -> None:
    """A byte-order mark, padded headers and cells, and CRLF line ends still name the
    sites (they hid the site column before, and sites silently came from sidecars)."""
    from bids_harmony.bids.layout import build_layout, collect_images

    bids = _case_dataset(small_bids, tmp_path)
    for table in bids.glob("sub-*/sub-*_sessions.tsv"):
        table.unlink()
    (bids / "participants.tsv").write_bytes(
        "\ufeffparticipant_id\t site \r\nsub-01\t SiteA \r\nsub-02\tSiteB\r\n".encode())
    images = collect_images(build_layout(bids, tmp_path / "work"), suffixes=["T1w"])
    assert {(im.subject, im.site, im.site_source) for im in images} == {
        ("01", "SiteA", "participants.tsv"), ("02", "SiteB", "participants.tsv")}


# -- models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real z-score model fitted on T1w phantoms (the checks run before preprocessing)."""
    from bids_harmony.harmonizers import HARMONIZERS
    from phantoms import ellipsoid_phantom

    volumes = [ellipsoid_phantom((24, 24, 20), subject=k) for k in range(4)]
    harmonizer = HARMONIZERS["zscore"]().fit(volumes, ["A", "A", "B", "B"], ["T1w"] * 4,
                                             target="A")
    return harmonizer.save(tmp_path_factory.mktemp("model") / "zscore_A")


def _truncate_card(model: Path) -> None:
    card = model / "model_card.json"
    card.write_text(card.read_text()[:40])


def _tamper_state(model: Path) -> None:
    state = model / "state.npz"
    content = bytearray(state.read_bytes())
    content[len(content) // 2] ^= 0xFF
    state.write_bytes(bytes(content))


MODEL_CASES: dict[str, tuple[Callable[[Path], None], list[str], int, str]] = {
    "truncated-card": (_truncate_card, [], ExitCode.DATA_ERROR, "model_card.json"),
    "tampered-state": (_tamper_state, [], ExitCode.DATA_ERROR, "state.npz"),
    "other-method": (lambda m: None, ["--method", "histmatch"], ExitCode.USAGE, "zscore"),
    "t1w-model-on-t2w": (lambda m: None, ["--suffix", "T2w"], ExitCode.DATA_ERROR, "T2w"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_model_is_verified_before_preprocessing(case: str, saved_model: Path,
                                                  small_bids: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "zscore_A"
    shutil.copytree(saved_model, model)
    damage, extra, expected, names = MODEL_CASES[case]
    damage(model)
    bids = _case_dataset(small_bids, tmp_path)
    before = _tree_digest(bids)
    argv = [bids, tmp_path / "out", "participant", "--resolution", "2", "--model", model]
    argv += extra if "--method" in extra else ["--method", "zscore", *extra]
    if "--suffix" not in extra:
        argv += ["--suffix", "T1w"]
    code, output = _run_main(capfd, *argv)
    _assert_clean_failure(code, output, expected, names, bids, before, tmp_path / "out")
    assert not list((tmp_path / "out").glob("sub-*/ses-*/anat/*")), "nothing processed"


# -- failures inside a step, kills and parallel jobs (real workflows, own processes) ---------
def _cli(*args: str | Path, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bids_harmony", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def _finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def _kill_when(process: subprocess.Popen[str], ready: Callable[[], bool],
               timeout: float = 300) -> None:
    """SIGKILL the whole process group (Nipype's workers too) once ``ready()``."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def parallel_run(small_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two participant jobs at once on one output, as a SLURM array runs them."""
    out = tmp_path_factory.mktemp("parallel") / "out"
    jobs = [_cli(small_bids, out, "participant", *COMMON, "--participant-label", label)
            for label in ("01", "02")]
    results = [_finish(job) for job in jobs]
    for code, output in results:
        assert code == 0, output[-3000:]
    return out


def test_parallel_participant_jobs_share_one_output(parallel_run: Path) -> None:
    sites = parallel_run / "sites.tsv"
    rows = [line.split("\t") for line in sites.read_text().splitlines()[1:]]
    assert len({row[0] for row in rows}) == 2, sites.read_text()  # both jobs' sites
    assert [row[2] for row in rows] == ["1", "1"], sites.read_text()
    images = sorted(parallel_run.glob("sub-*/ses-*/anat/*desc-preproc_T1w.nii.gz"))
    assert [p.name.split("_")[0] for p in images] == ["sub-01", "sub-02"]
    assert not _partials(parallel_run)


def test_the_same_participant_twice_at_once(small_bids: Path, parallel_run: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = [_cli(small_bids, out, "participant", *COMMON, "--participant-label", "01")
            for _ in range(2)]
    for code, output in (_finish(job) for job in jobs):
        assert code == 0, output[-3000:]
    reference = {k: v for k, v in output_content(parallel_run).items() if "sub-02" not in k}
    assert output_content(out) == reference
    assert not _partials(out)


@pytest.mark.parametrize("kill_point", ["preprocessing", "writing outputs"])
def test_sigkill_in_the_participant_level_then_rerun(kill_point: str, small_bids: Path,
                                                     parallel_run: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _tree_digest(small_bids)
    args = [small_bids, out, "participant", *COMMON]
    if kill_point == "preprocessing":
        ready = lambda: any(out.glob(".bids_harmony_work/bids_harmony_wf/anat_*/n4/*.pklz"))
    else:
        ready = lambda: any(out.glob(".staging/*/**/*.nii*")) or any(
            out.glob("sub-*/ses-*/anat/*.nii.gz"))
    _kill_when(_cli(*args), ready)
    code, output = _finish(_cli(*args))
    assert code == 0, output[-3000:]
    assert output_content(out) == output_content(parallel_run)
    assert not _partials(out)
    assert _tree_digest(small_bids) == before


def test_sigkill_in_the_group_level_then_rerun(small_bids: Path, parallel_run: Path,
                                               tmp_path: Path) -> None:
    group = [*COMMON, "--method", "histmatch", "--target-site", "auto"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(parallel_run, reference)
    shutil.copytree(parallel_run, killed)
    code, output = _finish(_cli(small_bids, reference, "group", *group))
    assert code == 0, output[-3000:]
    _kill_when(_cli(small_bids, killed, "group", *group),
               lambda: any((killed / "models").glob("*")))
    code, output = _finish(_cli(small_bids, killed, "group", *group))
    assert code == 0, output[-3000:]
    assert not _partials(killed)
    expected, got = output_content(reference), output_content(killed)
    assert sorted(expected) == sorted(got)
    for key in expected:
        if "models/" in key or key.endswith((".tsv", "_T1w.json")):
            assert got[key] == expected[key], key


def test_a_full_disk_during_the_run_is_73(small_bids: Path, tmp_path: Path) -> None:
    """A file-size limit makes every large write fail as on a full disk, inside Nipype."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    from bids_harmony.data.templates import bundled_template

    bids = tmp_path / "bids"
    shutil.copytree(small_bids, bids)
    before = _tree_digest(bids)
    bundled_template(2, tmp_path / "out" / ".bids_harmony_work" / "templateflow")
    code, output = _finish(_cli(bids, tmp_path / "out", "participant", *COMMON,
                                "--participant-label", "01", preexec_fn=limit))
    assert code == ExitCode.CANNOT_CREATE_OUTPUT, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("bids_harmony: error")]
    assert len(errors) == 1 and "sub-01_ses-01_T1w" in errors[0], errors
    assert _tree_digest(bids) == before


def test_a_file_name_with_a_space_is_refused(small_bids: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    """Its derivatives would be named without what follows the space, so reruns would never
    find them: the name is refused before anything runs."""
    bids = _case_dataset(small_bids, tmp_path)
    spaced = (bids / IMAGE).with_name("sub-01_ses-01_acq-my scan_T1w.nii.gz")
    (bids / IMAGE).rename(spaced)
    before = _tree_digest(bids)
    code, output = _run_main(capfd, bids, tmp_path / "out", "participant", *COMMON,
                             "--skip-bids-validation")
    _assert_clean_failure(code, output, ExitCode.DATA_ERROR, spaced.name, bids, before,
                          tmp_path / "out")


def test_a_non_brain_passes_the_checks_but_preprocessing_qc_flags_it(
        small_bids: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A noisy sphere is a valid image; only QC against the template sees it is no brain.
    The group level then has no image of that site to learn from, unless --keep-flagged."""
    bids = _case_dataset(small_bids, tmp_path)
    phantom = next(bids.glob("sub-02/ses-*/anat/*_T1w.nii.gz"))
    image = nb.load(phantom)
    grid = np.indices(image.shape, dtype=np.float32)
    centre = (np.asarray(image.shape, dtype=np.float32)[:, None, None, None] - 1) / 2
    radius_mm = np.sqrt((((grid - centre) * 2.0) ** 2).sum(axis=0))
    noise = np.random.default_rng(0).normal(0.0, 40.0, image.shape)
    _rewrite(phantom, np.clip(np.where(radius_mm < 65, 800.0, 100.0) + noise, 0, None)
             .astype(np.int16))
    out = tmp_path / "out"
    code, output = _run_main(capfd, bids, out, "participant", *COMMON)
    assert code == 0, output[-3000:]
    sidecars = {path.name.split("_")[0]: json.loads(path.read_text()) for path in
                out.glob("sub-*/ses-*/anat/*desc-preproc_T1w.json")}
    assert sidecars["sub-01"]["QCFlags"] == [], sidecars["sub-01"]["PreprocessingQC"]
    assert "not_brain_like" in sidecars["sub-02"]["QCFlags"], sidecars["sub-02"]
    group = [bids, out, "group", *COMMON, "--method", "histmatch", "--target-site", "auto"]
    code, output = _run_main(capfd, *group)
    _assert_clean_failure(code, output, ExitCode.DATA_ERROR, phantom.name.split(".")[0],
                          bids, _tree_digest(bids), out)
    assert "--keep-flagged" in output
    code, output = _run_main(capfd, *group, "--keep-flagged")
    assert code == 0, output[-3000:]
    rows = (out / "group_T1w.tsv").read_text()
    assert "not_brain_like" in rows
    assert "Preprocessing QC flagged this image" in (out / "sub-02.html").read_text()
