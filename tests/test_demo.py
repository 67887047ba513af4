"""The built-in demo dataset: layout, BIDS validity, determinism and a real site effect."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from bids_harmony import __version__
from bids_harmony.cli.demo import main
from bids_harmony.data.demo import DEFAULT_IXI_DIR, generate_demo_dataset
from bids_harmony.errors import UsageError

SUBJECTS = ["01", "02", "03", "04"]
SESSIONS = ["01", "02", "03"]
SEQUENCES = ["T1w", "T2w"]
SCANNER_FIELDS = (
    "Manufacturer",
    "ManufacturersModelName",
    "MagneticFieldStrength",
    "InstitutionName",
    "StationName",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo (4 subjects x 3 sites x T1w/T2w), built once for the module."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "bids")


def _truth_dir(root: Path) -> Path:
    return root / "derivatives" / "demo-truth"


def _ras_data(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(), dtype=np.float64)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _session_sites(root: Path, subject: str) -> dict[str, str]:
    rows = _read_tsv(root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv")
    return {row["session_id"].removeprefix("ses-"): row["site"] for row in rows}


def _raw_path(root: Path, subject: str, session: str, sequence: str) -> Path:
    return (
        root
        / f"sub-{subject}"
        / f"ses-{session}"
        / "anat"
        / f"sub-{subject}_ses-{session}_{sequence}.nii.gz"
    )


def _all_image_arrays(root: Path) -> dict[str, np.ndarray]:
    return {
        str(path.relative_to(root)): np.asarray(nib.load(path).dataobj)
        for path in sorted(root.rglob("*.nii.gz"))
    }


def test_expected_files_exist(demo: Path) -> None:
    description = json.loads((demo / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0"
    assert description["DatasetType"] == "raw"
    assert description["License"]
    assert description["GeneratedBy"][0] == {
        "Name": "bids_harmony-demo",
        "Version": __version__,
        "Description": "seed=0, anatomy=mni, sites=3",
    }
    assert (demo / "README").read_text().strip()
    assert json.loads((demo / "participants.json").read_text()).keys() == {"age", "sex"}
    participants = _read_tsv(demo / "participants.tsv")
    assert [row["participant_id"] for row in participants] == [f"sub-{s}" for s in SUBJECTS]
    assert all(18 <= float(row["age"]) <= 90 and row["sex"] in {"F", "M"} for row in participants)

    truth = _truth_dir(demo)
    derivative_description = json.loads((truth / "dataset_description.json").read_text())
    assert derivative_description["DatasetType"] == "derivative"
    assert set(json.loads((truth / "sites.json").read_text())["sites"]) == set(
        _session_sites(demo, "01").values()
    )
    for subject in SUBJECTS:
        anat = truth / f"sub-{subject}" / "anat"
        assert (anat / f"sub-{subject}_desc-brain_mask.nii.gz").is_file()
        for tissue in ("CSF", "GM", "WM"):
            assert (anat / f"sub-{subject}_label-{tissue}_probseg.nii.gz").is_file()
        for sequence in SEQUENCES:
            assert (anat / f"sub-{subject}_desc-truth_{sequence}.nii.gz").is_file()
            for session in SESSIONS:
                raw = _raw_path(demo, subject, session, sequence)
                assert raw.is_file()
                assert raw.with_name(raw.name.replace(".nii.gz", ".json")).is_file()
                name = f"sub-{subject}_ses-{session}_desc-truth_{sequence}.nii.gz"
                assert (truth / f"sub-{subject}" / f"ses-{session}" / "anat" / name).is_file()
    assert not [path for path in demo.parent.iterdir() if path.name.startswith(".")]


def test_pybids_validates_and_indexes(demo: Path) -> None:
    from bids import BIDSLayout

    layout = BIDSLayout(demo, validate=True)
    assert layout.get_subjects() == SUBJECTS
    assert layout.get_sessions() == SESSIONS
    images = layout.get(extension=".nii.gz")
    assert len(images) == len(SUBJECTS) * len(SESSIONS) * len(SEQUENCES)
    assert {image.entities["suffix"] for image in images} == set(SEQUENCES)
    assert set(images[0].get_metadata()) >= set(SCANNER_FIELDS)


def test_sessions_site_matches_sidecar_scanner(demo: Path) -> None:
    scanner_of_site: dict[str, set[tuple[object, ...]]] = {}
    for subject in SUBJECTS:
        sites = _session_sites(demo, subject)
        assert sorted(sites) == SESSIONS
        assert len(set(sites.values())) == len(SESSIONS), "each subject visits every site once"
        for session, site in sites.items():
            for sequence in SEQUENCES:
                raw = _raw_path(demo, subject, session, sequence)
                sidecar = json.loads(
                    raw.with_name(raw.name.replace(".nii.gz", ".json")).read_text()
                )
                scanner = tuple(sidecar[field] for field in SCANNER_FIELDS)
                scanner_of_site.setdefault(site, set()).add(scanner)
    assert all(len(scanners) == 1 for scanners in scanner_of_site.values())
    assert len({scanners.pop() for scanners in scanner_of_site.values()}) == len(SESSIONS)
    first_sessions = {_session_sites(demo, subject)["01"] for subject in SUBJECTS}
    assert len(first_sessions) > 1, "session labels must not stand for sites"


def test_same_seed_reproduces_and_other_seed_differs(tmp_path: Path) -> None:
    options = {"n_subjects": 1, "n_sites": 2, "sequences": ("T1w",)}
    first = _all_image_arrays(generate_demo_dataset(tmp_path / "a", seed=7, **options))
    again = _all_image_arrays(generate_demo_dataset(tmp_path / "b", seed=7, **options))
    other = _all_image_arrays(generate_demo_dataset(tmp_path / "c", seed=8, **options))
    assert first.keys() == again.keys() == other.keys()
    for name, data in first.items():
        assert data.dtype == again[name].dtype and np.array_equal(data, again[name]), name
    raw_name = "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
    anatomy_name = "derivatives/demo-truth/sub-01/anat/sub-01_desc-truth_T1w.nii.gz"
    assert not np.array_equal(first[raw_name], other[raw_name])
    assert not np.array_equal(first[anatomy_name], other[anatomy_name])


def test_traveling_subject_has_one_anatomy_across_sessions(demo: Path) -> None:
    """Each session truth is the subject's truth under its site's documented transfer only."""
    truth = _truth_dir(demo)
    sites = json.loads((truth / "sites.json").read_text())["sites"]
    for subject in ("01", "02"):
        anat = truth / f"sub-{subject}" / "anat"
        tissues = np.stack(
            [
                _ras_data(anat / f"sub-{subject}_label-{t}_probseg.nii.gz")
                for t in ("CSF", "GM", "WM")
            ]
        )
        non_brain = np.clip(1.0 - tissues.sum(axis=0), 0.0, 1.0)
        for sequence in SEQUENCES:
            anatomy = _ras_data(anat / f"sub-{subject}_desc-truth_{sequence}.nii.gz")
            for session, site_label in _session_sites(demo, subject).items():
                site = sites[site_label]
                gain = np.tensordot(site["tissue_gains"][sequence], tissues, axes=1) + non_brain
                expected = site["intensity_scale"] * (anatomy * gain) ** site["gamma"][sequence]
                name = f"sub-{subject}_ses-{session}_desc-truth_{sequence}.nii.gz"
                observed = _ras_data(truth / f"sub-{subject}" / f"ses-{session}" / "anat" / name)
                assert np.abs(observed - expected).max() < 0.01 * site["intensity_scale"]
    mask_01 = _ras_data(truth / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    mask_02 = _ras_data(truth / "sub-02/anat/sub-02_desc-brain_mask.nii.gz")
    assert (mask_01 != mask_02).mean() > 0.005, "subjects must differ in shape"


def test_site_effect_dwarfs_subject_differences(demo: Path) -> None:
    """Percentile-normalised brain histograms: sites of one subject differ, subjects do not."""
    truth = _truth_dir(demo)

    def brain_values(path: Path, subject: str) -> np.ndarray:
        mask = _ras_data(truth / f"sub-{subject}/anat/sub-{subject}_desc-brain_mask.nii.gz") > 0
        values = _ras_data(path)[mask]
        return values / np.percentile(values, 99)

    for sequence in SEQUENCES:
        sessions = {
            session: brain_values(_raw_path(demo, "01", session, sequence), "01")
            for session in SESSIONS
        }
        between_sites = [
            wasserstein_distance(sessions[a], sessions[b])
            for a, b in (("01", "02"), ("01", "03"), ("02", "03"))
        ]
        anatomies = {
            subject: brain_values(
                truth / f"sub-{subject}/anat/sub-{subject}_desc-truth_{sequence}.nii.gz", subject
            )
            for subject in SUBJECTS
        }
        between_subjects = [
            wasserstein_distance(anatomies["01"], anatomies[s]) for s in SUBJECTS[1:]
        ]
        assert min(between_sites) > 3 * max(between_subjects), (
            sequence,
            between_sites,
            between_subjects,
        )


def test_one_site_is_stored_non_ras(demo: Path) -> None:
    sites = json.loads((_truth_dir(demo) / "sites.json").read_text())["sites"]
    non_ras_sites = {label for label, site in sites.items() if site["orientation"] != "RAS"}
    assert len(non_ras_sites) == 1
    truth_image = nib.load(_truth_dir(demo) / "sub-01/anat/sub-01_desc-truth_T1w.nii.gz")
    for session, site in _session_sites(demo, "01").items():
        raw = nib.load(_raw_path(demo, "01", session, "T1w"))
        codes = "".join(nib.aff2axcodes(raw.affine))
        assert (codes != "RAS") == (site in non_ras_sites)
        assert codes == sites[site]["orientation"]
        canonical = nib.as_closest_canonical(raw)
        assert canonical.shape == truth_image.shape
        assert np.allclose(canonical.affine, truth_image.affine)


def test_ixi_anatomy(tmp_path: Path) -> None:
    if not (DEFAULT_IXI_DIR / "nifti").is_dir():
        pytest.skip(f"IXI data not found in {DEFAULT_IXI_DIR}")
    root = generate_demo_dataset(tmp_path / "ixi", n_subjects=2, n_sites=2, anatomy="ixi")
    participants = _read_tsv(root / "participants.tsv")
    demographics = {
        row["MRID"].split("-")[0]: row
        for row in _read_tsv_comma(DEFAULT_IXI_DIR / "demographics.csv")
    }
    assert len(participants) == 2
    for row in participants:
        source = demographics[row["participant_id"].removeprefix("sub-")]
        assert float(row["age"]) == pytest.approx(float(source["Age"]))
        assert row["sex"] == source["Sex"]
    subject = participants[0]["participant_id"].removeprefix("sub-")
    assert not list(root.rglob("*_T2w.nii.gz"))
    mask = (
        _ras_data(_truth_dir(root) / f"sub-{subject}/anat/sub-{subject}_desc-brain_mask.nii.gz") > 0
    )
    raw = _ras_data(_raw_path(root, subject, "01", "T1w"))
    assert raw.shape == mask.shape
    outside = raw[~mask]
    assert np.percentile(outside, 99) > 0.5 * np.median(raw[mask]), "the skull must be kept"
    with pytest.raises(UsageError):
        generate_demo_dataset(tmp_path / "t2", anatomy="ixi", sequences=("T1w", "T2w"))


def _read_tsv_comma(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_replaces_and_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bids"
    small = ["--subjects", "1", "--sites", "2", "--sequences", "T1w"]
    assert main([str(out), *small]) == 0
    assert (out / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_T1w.nii.gz").is_file()
    assert main([str(out), *small, "--seed", "3"]) == 0, "a previous demo is replaced"
    assert "seed=3" in (out / "dataset_description.json").read_text()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([str(foreign), *small]) == 73
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(foreign) in error
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_cli_writes_a_templateflow_home_the_app_uses(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``--templateflow-home`` holds the bundled template at 1 and 2 mm, which a run with
    that home takes without writing one in its work directory."""
    from bids_harmony.data.templates import BUNDLED_TEMPLATE, resolve_template

    home = tmp_path / "templateflow"
    assert main([str(tmp_path / "bids"), "--subjects", "1", "--sites", "2", "--sequences",
                 "T1w", "--templateflow-home", str(home)]) == 0
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    for resolution in (1, 2):
        template = resolve_template(None, resolution, tmp_path / "work")
        assert template.name == BUNDLED_TEMPLATE and template.brain.parent.parent == home
        assert template.brain.stat().st_size > 0 and template.mask.stat().st_size > 0
    assert not (tmp_path / "work").exists()


def test_cli_missing_ixi_dir_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-ixi"
    assert main([str(tmp_path / "out"), "--anatomy", "ixi", "--ixi-dir", str(missing)]) == 66
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(missing) in error
    assert not (tmp_path / "out").exists()


def test_cli_help_imports_nothing_heavy() -> None:
    probe = (
        "import sys; import bids_harmony.cli.demo; "
        "print(sorted({'numpy', 'nibabel', 'nilearn'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert result.stdout.strip() == "[]"


def test_mni_source_equals_nilearn_two_millimetre_templates() -> None:
    """Guards the documented shortcut: 1 mm templates at every other voxel == resolution=2."""
    from nilearn import datasets

    from bids_harmony.data.demo import MNI_2MM_FIELD_OF_VIEW, _mni_source

    affine, volumes = _mni_source()
    loaders = (
        datasets.load_mni152_template,
        datasets.load_mni152_gm_template,
        datasets.load_mni152_wm_template,
        datasets.load_mni152_brain_mask,
    )
    for loader, volume in zip(loaders, volumes, strict=True):
        reference = loader(resolution=2)
        expected = np.asarray(reference.dataobj, dtype=np.float32)[MNI_2MM_FIELD_OF_VIEW]
        assert np.allclose(volume, expected, atol=1e-6), loader.__name__
    corner = [field.start for field in MNI_2MM_FIELD_OF_VIEW]
    assert np.allclose(affine[:3, 3], nib.affines.apply_affine(reference.affine, corner))
    assert np.allclose(affine[:3, :3], reference.affine[:3, :3])
