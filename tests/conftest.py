"""Shared fixtures: an offline environment and small real BIDS datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

IXI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi"


@pytest.fixture(autouse=True, scope="session")
def _offline_templateflow(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point TemplateFlow at a home of the bundled template only, as the container's, so no
    test reads or fills the user's cache and no run indexes TemplateFlow's 2,540-file
    skeleton (10 s in every process that imports niworkflows' sink)."""
    from bids_harmony.data.templates import bundled_template

    home = tmp_path_factory.mktemp("templateflow_home")
    for resolution in (1, 2):
        bundled_template(resolution, home)
    os.environ["TEMPLATEFLOW_HOME"] = str(home)


@pytest.fixture(scope="session")
def demo_bids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small traveling-subject dataset: 2 subjects x 3 sites, T1w and T2w (read-only use)."""
    from bids_harmony.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "bids"
    return generate_demo_dataset(root, n_subjects=2, n_sites=3, seed=1)


@pytest.fixture
def ixi_dir() -> Path:
    if not (IXI_DIR / "nifti").is_dir():
        pytest.skip(f"real IXI heads not found at {IXI_DIR}")
    return IXI_DIR


@pytest.fixture(scope="session")
def small_bids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo subjects, one real-looking session each at its own site: sub-01 T1w (and a
    T2w, for the wrong-sequence case) at site 1, sub-02 T1w at site 2."""
    from bids_harmony.data.demo import generate_demo_dataset

    root = generate_demo_dataset(tmp_path_factory.mktemp("robust") / "bids", n_subjects=2,
                                 n_sites=2, seed=3)
    shutil.rmtree(root / "derivatives", ignore_errors=True)
    sites = {subject: dict(line.split("\t") for line in
                           (root / subject / f"{subject}_sessions.tsv").read_text()
                           .splitlines()[1:]) for subject in ("sub-01", "sub-02")}
    second = next(ses for ses, site in sites["sub-02"].items()
                  if site != sites["sub-01"]["ses-01"])
    keep = {"sub-01": "ses-01", "sub-02": second}
    for subject, session in keep.items():
        for other in sites[subject]:
            if other != session:
                shutil.rmtree(root / subject / other)
        table = root / subject / f"{subject}_sessions.tsv"
        lines = table.read_text().splitlines()
        table.write_text("\n".join([lines[0], *[ln for ln in lines[1:]
                                                 if ln.startswith(session)]]) + "\n")
    for path in root.glob("sub-02/ses-*/anat/*T2w*"):
        path.unlink()
    return root
