"""The group level's evaluation and HTML reports, from real derivative files on disk.

A small traveling-subject set of phantom images (3 participants x 3 sites, template-space
``desc-preproc`` images, brain and edge masks written where the participant level writes
them) goes through the real ``fit_group`` and ``write_group_outputs``: fit, QC, evaluation, pages.
"""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage
from test_anatomy import render, tissue_phantom

from bids_harmony.bids.layout import AnatImage
from bids_harmony.config import AnalysisLevel, RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.bids.paths import derivative_path, mask_desc
from bids_harmony.reports import write_group_outputs
from bids_harmony.reports.group import write_group_report
from bids_harmony.workflows.citations import compose_methods
from bids_harmony.workflows.group import fit_group
from bids_harmony.workflows.harmonize import harmonization_desc

CHROMIUM = Path("/usr/bin/chromium")
TEMPLATE = "MNI152NLin2009aSym"
# Site -> gamma curve and noise level of the simulated scanner.
SITES = {"SiteA": (1.0, 0.02), "SiteB": (1.6, 0.03), "SiteC": (0.6, 0.05)}
AGES = {"01": 25.0, "02": 47.5, "03": 71.0}


def _save(data: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)


@pytest.fixture(scope="module")
def group_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reports")
    bids, out = root / "bids", root / "out"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "participant_id\tage\n" + "".join(f"sub-{s}\t{a}\n" for s, a in AGES.items()))
    template = TemplateFiles(TEMPLATE, 2, root / "brain.nii.gz", root / "mask.nii.gz", "bundled")
    images = []
    for subject_index, subject in enumerate(AGES):
        truth, mask = tissue_phantom(shift=subject_index - 1)
        for session_index, (site, (gamma, noise)) in enumerate(SITES.items(), start=1):
            session = f"{session_index:02d}"
            path = bids / f"sub-{subject}" / f"ses-{session}" / "anat" / \
                f"sub-{subject}_ses-{session}_T1w.nii.gz"
            image = AnatImage(path, subject, session, "T1w", site, "sessions.tsv")
            rng = np.random.default_rng([subject_index, session_index])
            data = render(truth, "T1w", noise=0.0, seed=0) ** gamma
            data = np.clip(np.where(mask, data + rng.normal(0, noise, data.shape), 0), 0, 1)
            edges = ndimage.morphological_gradient(truth, size=2) > 0
            _save(data.astype(np.float32), derivative_path(out, image, TEMPLATE, "preproc"))
            for kind, values in (("brain", mask), ("edges", edges & mask)):
                _save(values.astype(np.uint8),
                      derivative_path(out, image, TEMPLATE, mask_desc(kind, image), "mask"))
            images.append(image)
    config = RunConfig(bids_dir=bids, output_dir=out, analysis_level=AnalysisLevel.GROUP,
                       work_dir=root / "work", run_id="test", method="histmatch",
                       target_site="SiteA")
    methods = compose_methods([
        "Images were registered with antspyx [@antspyx].\n\n",
        harmonization_desc("histmatch", "SiteA", fitted_on="9 images from 3 sites"),
    ])
    write_group_outputs(out, bids, fit_group(config, images, template), methods)
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        if tag == "a":
            self.links.append(values["href"] or "")


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def test_group_report_shows_every_measure(group_run: Path) -> None:
    report = group_run / "group_report.html"
    text = report.read_text()
    for heading in ("Intensity distributions per site", "Site distances", "Site classification",
                    "Brain age", "Traveling subjects", "Anatomy kept", "Every image"):
        assert heading in text
    links = _parse(report)
    assert "group_T1w_histograms.png" in links.images
    assert "figures/group_T1w_site_heatmaps.png" in links.images
    for src in links.images:
        assert (group_run / src).stat().st_size > 5_000, src
    pages = {link.split("#")[0] for link in links.links if link.startswith("sub-")}
    assert pages == {f"sub-{s}.html" for s in AGES}
    assert text.count('class="sortable"') == 1
    assert "chance level" in text and "Before harmonization the site is predicted" in text


def test_group_report_ends_with_the_methods_to_cite(group_run: Path) -> None:
    text = (group_run / "group_report.html").read_text()
    methods = text[text.index("<h2>Methods</h2>"):]
    assert "<p>Images were registered with antspyx [1].</p>" in methods
    assert "toward the style of site SiteA with histmatch [2]" in methods
    assert "fitted on 9 images from 3 sites" in methods
    assert methods.count("<li>") == 2 and "<li>Tustison NJ, Cook PA" in methods
    assert "CVPR, 2025" in methods  # the histogram-matching baseline's paper
    assert 'href="logs/CITATION.md"' in methods


def test_group_report_warns_when_the_model_learned_nothing(group_run: Path,
                                                           tmp_path: Path) -> None:
    evaluation = json.loads((group_run / "group_evaluation.json").read_text())
    assert evaluation["model_diagnostics"] == {}  # histmatch has nothing to learn
    assert "Model diagnostics" not in (group_run / "group_report.html").read_text()
    evaluation["model_diagnostics"] = {"T1w": {
        "history": [{"step": 40, "own_edge_psnr": 12.5}], "baselines": {"mean_image_psnr": 16.0},
        "scored_on": "held-out", "warnings": ["no better than the mean training image"],
        "learned": False}}
    methods = compose_methods(["Images were registered with antspyx [@antspyx].\n\n"])
    text = write_group_report(tmp_path, evaluation, methods).read_text()
    assert '<p class="warning"><b>T1w: the model did not learn.</b> no better than' in text
    assert "after step 40, on held-out target images: own_edge_psnr 12.5" in text


def test_evaluation_twins_and_site_effect(group_run: Path) -> None:
    evaluation = json.loads((group_run / "group_evaluation.json").read_text())
    result = evaluation["sequences"]["T1w"]
    classification = result["site_classification"]
    assert classification["before"]["balanced_accuracy"] > 0.8
    assert classification["before"]["chance_level"] == pytest.approx(1 / 3)
    assert "3-fold instead of 5-fold" in classification["before"]["validation"]["note"]
    wd = result["site_wasserstein"]
    assert wd["mean_after"] < wd["mean_before"]
    assert np.allclose(np.diag(wd["before"]), 0.0)
    lum = result["site_luminance_ssim"]
    assert lum["mean_after"] >= lum["mean_before"]
    assert set(result["traveling_subjects"]) == {"SiteB", "SiteC"}
    for values in result["traveling_subjects"].values():
        assert values["paired_wd_after"] < values["paired_wd_before"]
    tissues = result["tissues"]
    assert tissues["n_pairs"] == 6
    assert min(tissues["vs_source"][f"dice_{t}"] for t in ("CSF", "GM", "WM")) > 0.9
    assert result["brain_age"]["before"]["validation"]["n_splits"] == 3
    assert len(evaluation["images"]) == 9
    assert {row["flag"] for row in evaluation["images"]} <= {"green", "amber", "red"}
    tsv = (group_run / "group_site_classification.tsv").read_text().splitlines()
    assert tsv[0].startswith("suffix\tstage\tbalanced_accuracy")
    assert [line.split("\t")[1] for line in tsv[1:]] == ["before", "after"]


def test_participant_pages_hold_mosaics_and_flags(group_run: Path) -> None:
    for subject in AGES:
        page = group_run / f"sub-{subject}.html"
        text = page.read_text()
        links = _parse(page)
        assert len(links.images) == 3  # one mosaic per session
        for src in links.images:
            assert src.startswith("figures/") and (group_run / src).stat().st_size > 20_000
        for session in ("01", "02", "03"):
            assert f'id="sub-{subject}_ses-{session}_T1w"' in text
        assert "structural_ssim" in text and re.search(r"flag-(green|amber|red)", text)
        assert "group_report.html" in links.links


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian chromium is not installed")
def test_group_report_renders_in_headless_chromium(group_run: Path, tmp_path: Path) -> None:
    """The page loads without JavaScript errors, the sort script ran, and it is not blank."""
    common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
              "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (group_run / "group_report.html").as_uri()
    screenshot = tmp_path / "report.png"
    shot = subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1400,2000",
                           url], capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), shot.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    for log in (shot.stderr, dom.stderr):
        assert "Uncaught" not in log, log[-2000:]
    assert 'data-sortable-ready="true"' in dom.stdout
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels.std() > 0.05  # text, tables and figures, not a blank page
