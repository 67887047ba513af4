"""Preprocessing QC: the template scores 1, a real head passes, a misplaced head and a
sphere phantom are flagged, and the group level leaves flagged images out of fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from bids_harmony.bids.layout import AnatImage
from bids_harmony.data.templates import BUNDLED_TEMPLATE, bundled_template
from bids_harmony.errors import DataError
from bids_harmony.metrics.preprocessing import (
    NOT_BRAIN_LIKE,
    REGISTRATION,
    preprocessing_qc,
)
from bids_harmony.volume import Volume, load_volume
from bids_harmony.workflows.group import _images_to_fit


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    files = bundled_template(2, tmp_path_factory.mktemp("templates"))
    assert files.name == BUNDLED_TEMPLATE
    return load_volume(files.brain, files.mask)


def _on_grid(template: Volume, data: np.ndarray, mask: np.ndarray) -> Volume:
    return Volume(data.astype(np.float32), mask.astype(bool), template.spacing, {})


def test_the_template_against_itself_scores_one_and_passes(template: Volume) -> None:
    measures, flags = preprocessing_qc(template, template)
    assert flags == []
    assert all(value == pytest.approx(1.0) for value in measures.values()), measures


def test_a_contrast_inverted_brain_still_passes(template: Volume) -> None:
    """T2w-like: the template is a T1w, so only the magnitude of its correlation counts."""
    inverted = np.where(template.mask, template.data.max() - template.data, 0.0)
    measures, flags = preprocessing_qc(_on_grid(template, inverted, template.mask), template)
    assert measures["template_ncc"] < -0.4 and flags == [], measures


def test_a_head_shifted_off_the_template_is_a_registration_failure(template: Volume) -> None:
    shifted = [np.roll(a, 12, axis=1) for a in (template.data, template.mask)]
    measures, flags = preprocessing_qc(_on_grid(template, *shifted), template)
    assert REGISTRATION in flags, measures


def test_a_uniform_sphere_of_brain_size_is_not_brain_like(template: Volume) -> None:
    centre = np.array(ndimage.center_of_mass(template.mask))
    grid = np.indices(template.mask.shape).astype(float)
    radius = np.sqrt((((grid.T - centre) * 2.0) ** 2).sum(axis=-1)).T  # mm, 2 mm voxels
    sphere = radius < 62.0
    measures, flags = preprocessing_qc(_on_grid(template, sphere * 1.0, sphere), template)
    assert NOT_BRAIN_LIKE in flags, measures
    assert measures["structure_ncc"] < 0.1


def test_grids_that_differ_are_refused(template: Volume) -> None:
    small = _on_grid(template, template.data[:-1], template.mask[:-1])
    with pytest.raises(DataError, match="template grid"):
        preprocessing_qc(small, template)


def _image(subject: str, site: str) -> AnatImage:
    return AnatImage(path=Path(f"sub-{subject}_T1w.nii.gz"), subject=subject, session=None,
                     suffix="T1w", site=site, site_source="test")


def test_flagged_images_are_left_out_unless_kept() -> None:
    images = [_image("01", "A"), _image("02", "A"), _image("03", "B")]
    flags = [[], [REGISTRATION], []]
    assert _images_to_fit(images, flags, keep_flagged=False) == [True, False, True]
    assert _images_to_fit(images, flags, keep_flagged=True) == [True, True, True]
    with pytest.raises(DataError, match="every image of site B.*sub-03.*--keep-flagged"):
        _images_to_fit(images, [[], [], [NOT_BRAIN_LIKE]], keep_flagged=False)
