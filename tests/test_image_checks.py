"""The image checks pass every real head and demo image and stop at each limit they document."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_harmony.errors import ExitCode
from bids_harmony.imaging.checks import (
    FOV_RANGE_MM,
    ImageCheckError,
    check_images,
    image_problems,
)

IXI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi" / "nifti"


def _head(shape: tuple[int, ...] = (40, 48, 40), zoom: float = 2.0,
          dtype: type = np.int16) -> np.ndarray:
    grid = np.indices(shape[:3], dtype=np.float32) - (np.asarray(shape[:3])[:, None, None, None]
                                                        - 1) / 2
    radius = np.sqrt((grid ** 2).sum(axis=0))
    data = np.clip(1000 - 40 * radius, 0, None)
    return data.reshape(shape).astype(dtype) if len(shape) == 3 else data.astype(dtype)


def _save(path: Path, data: np.ndarray, zoom: float = 2.0, first_zoom: float | None = None
          ) -> Path:
    image = nb.Nifti1Image(data, np.diag([first_zoom or zoom, zoom, zoom, 1.0]))
    image.set_qform(image.affine, 1)
    nb.save(image, path)
    return path


def test_every_real_ixi_head_passes() -> None:
    heads = sorted(IXI.glob("*.nii.gz"))
    if not heads:
        pytest.skip("the IXI heads are not in ../shared/data/ixi")
    assert {str(head): image_problems(head) for head in heads} == {str(h): [] for h in heads}


def test_philips_scaled_int16_and_a_singleton_fourth_axis_pass(tmp_path: Path) -> None:
    scaled = nb.Nifti1Image(_head().astype(np.float32) / 1000.0, np.diag([2.0, 2, 2, 1]))
    scaled.set_data_dtype(np.int16)  # nibabel picks scl_slope/inter: stored values go negative
    nb.save(scaled, tmp_path / "scaled.nii.gz")
    assert np.asanyarray(nb.load(tmp_path / "scaled.nii.gz").dataobj.get_unscaled()).min() < 0
    singleton = _save(tmp_path / "singleton.nii.gz", _head()[..., None])
    check_images([tmp_path / "scaled.nii.gz", singleton])


@pytest.mark.parametrize(("zoom", "ok"), [(0.15, False), (0.25, True), (5.9, True),
                                          (6.5, False)])
def test_voxel_sizes_outside_the_documented_range_are_refused(tmp_path: Path, zoom: float,
                                                              ok: bool) -> None:
    """Along the first axis only, with a 100 mm field of view on every axis."""
    path = _save(tmp_path / "head.nii.gz", _head((int(np.ceil(100 / zoom)), 50, 50)), 2.0,
                 first_zoom=zoom)
    problems = image_problems(path)
    assert (problems == []) is ok, problems
    assert ok or "voxel sizes" in problems[0].problem


def test_a_field_of_view_just_under_the_limit_is_refused(tmp_path: Path) -> None:
    voxels = int(FOV_RANGE_MM[0] / 2) - 1
    path = _save(tmp_path / "crop.nii.gz", _head((voxels, 48, 40)))
    [problem] = image_problems(path)
    assert "field of view" in problem.problem and "58" in problem.problem


def test_all_problems_of_all_images_are_one_line_with_exit_65(tmp_path: Path) -> None:
    data = _head().astype(np.float32)
    data[0, 0, 0] = np.nan
    nan_file = _save(tmp_path / "nan.nii.gz", data)
    four_d = _save(tmp_path / "four.nii.gz", np.stack([_head()] * 2, axis=-1))
    wrapped = _save(tmp_path / "wrapped.nii.gz", (_head().astype(np.int32) * 90)
                    .astype(np.int16))
    good = _save(tmp_path / "good.nii.gz", _head())
    with pytest.raises(ImageCheckError) as raised:
        check_images([nan_file, four_d, wrapped, good])
    message = str(raised.value)
    assert raised.value.exit_code == ExitCode.DATA_ERROR and "\n" not in message
    assert message.startswith("3 of 4 images cannot be processed")
    assert {p.path for p in raised.value.problems} == {nan_file, four_d, wrapped}
    assert "NaN" in message and "4D" in message and "negative" in message
    assert "good.nii.gz" not in message and message.endswith("--skip-image-checks")
