"""Indexing by site and sequence with pybids, on real generated BIDS datasets."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bids_harmony.bids.layout import (
    AnatImage,
    build_layout,
    collect_images,
    sanitize_label,
    site_table,
    traveling_pairs,
    traveling_subjects,
)
from bids_harmony.data.templates import BUNDLED_TEMPLATE, resolve_template
from bids_harmony.errors import DataError, EmptySelectionError, TemplateNotFoundError


def _sessions_sites(root: Path) -> dict[tuple[str, str], str]:
    sites = {}
    for table in root.glob("sub-*/sub-*_sessions.tsv"):
        subject = table.parent.name[4:]
        with table.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                sites[(subject, row["session_id"][4:])] = row["site"]
    return sites


def test_sites_come_from_sessions_tsv(demo_bids: Path, tmp_path: Path) -> None:
    layout = build_layout(demo_bids, tmp_path)
    images = collect_images(layout)
    expected = _sessions_sites(demo_bids)
    assert len(images) == 2 * 3 * 2
    for image in images:
        assert image.site == expected[(image.subject, image.session)]
        assert image.site_source == "sessions.tsv"
    assert {im.suffix for im in images} == {"T1w", "T2w"}
    travelers = traveling_subjects(images)
    assert set(travelers) == {"01", "02"} and all(len(v) == 3 for v in travelers.values())
    rows = site_table(images)
    assert sum(r["count"] for r in rows) == 12 and {r["suffix"] for r in rows} == {"T1w", "T2w"}


def test_filters_and_prefixes(demo_bids: Path, tmp_path: Path) -> None:
    layout = build_layout(demo_bids, tmp_path)
    images = collect_images(layout, participants=["02"], sessions=["01"], suffixes=["T2w"])
    assert [(im.subject, im.session, im.suffix) for im in images] == [("02", "01", "T2w")]
    with pytest.raises(EmptySelectionError, match="FLAIR"):
        collect_images(layout, suffixes=["FLAIR"])


def test_site_map_overrides_tables(demo_bids: Path, tmp_path: Path) -> None:
    site_map = tmp_path / "sites.tsv"
    site_map.write_text("participant_id\tsession_id\tsite\nsub-01\tses-01\tMy Scanner 7T\n"
                        "sub-02\t\tlab two\n")
    images = collect_images(build_layout(demo_bids, tmp_path), site_map=site_map)
    by_key = {(im.subject, im.session): im for im in images}
    assert by_key[("01", "01")].site == "MyScanner7T"
    assert by_key[("01", "01")].site_source == "site-map"
    assert all(by_key[("02", s)].site == "LabTwo" for s in ("01", "02", "03"))
    assert by_key[("01", "02")].site_source == "sessions.tsv"


def test_sidecar_scanner_fields_and_missing_site(demo_bids: Path, tmp_path: Path) -> None:
    """Without site columns the sidecar names the scanner; without either, a clear error."""
    copy = tmp_path / "bids"
    shutil.copytree(demo_bids, copy, ignore=shutil.ignore_patterns("derivatives"))
    for table in copy.glob("sub-*/sub-*_sessions.tsv"):
        table.unlink()
    images = collect_images(build_layout(copy, tmp_path / "work1"))
    expected = _sessions_sites(demo_bids)
    groups: dict[str, set[str]] = {}
    for image in images:
        assert image.site_source == "sidecar"
        groups.setdefault(image.site, set()).add(expected[(image.subject, image.session)])
    # one sidecar-derived label per true site, and no two true sites merged
    assert all(len(true_sites) == 1 for true_sites in groups.values())
    assert len(groups) == 3

    sidecar = sorted(copy.glob("sub-01/ses-01/anat/*_T1w.json"))[0]
    meta = json.loads(sidecar.read_text())
    for key in ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength",
                "InstitutionName", "StationName"):
        meta.pop(key, None)
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="has no site") as error:
        collect_images(build_layout(copy, tmp_path / "work2"))
    message = str(error.value)
    assert "sub-01_ses-01_T1w.nii.gz" in message and "--site-map" in message
    assert "participants.tsv" in message and "\n" not in message


def test_sanitize_label() -> None:
    assert sanitize_label("Siemens TrioTim 3T") == "SiemensTrioTim3T"
    assert sanitize_label("GE_MEDICAL 1.5") == "GEMEDICAL1p5"


def test_bundled_template_is_named_honestly(tmp_path: Path) -> None:
    import nibabel as nb

    template = resolve_template(None, 2, tmp_path)
    assert template.name == BUNDLED_TEMPLATE and template.origin == "bundled"
    assert f"tpl-{BUNDLED_TEMPLATE}_res-02" in template.brain.name
    brain, mask = nb.load(template.brain), nb.load(template.mask)
    assert brain.shape == mask.shape == (99, 117, 95)
    assert brain.header.get_zooms() == (2.0, 2.0, 2.0)
    assert 0.15 < (mask.get_fdata() > 0).mean() < 0.5
    assert (template.brain.parent / "template_description.json").is_file()


def test_unavailable_template_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateNotFoundError, match="--template MNI152NLin2009aSym"):
        resolve_template("MNI305", 1, tmp_path, allow_download=False)


def test_traveling_pairs_match_subject_and_sequence_at_the_target() -> None:
    def image(subject: str, session: str, suffix: str, site: str) -> AnatImage:
        return AnatImage(Path(f"sub-{subject}_ses-{session}_{suffix}.nii.gz"), subject,
                         session, suffix, site, "sessions.tsv")

    images = [
        image("01", "1", "T1w", "A"), image("01", "2", "T1w", "B"),
        image("01", "2", "T2w", "B"),  # no T2w of sub-01 at A: unpaired
        image("02", "1", "T1w", "B"),  # sub-02 never at A: unpaired
        image("03", "1", "T1w", "A"), image("03", "2", "T1w", "C"),
    ]
    assert traveling_pairs(images, "A") == {1: 0, 5: 4}
    assert traveling_pairs(images, "B") == {0: 1}
