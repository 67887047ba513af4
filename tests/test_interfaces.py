"""Interfaces run for real on NIfTI files: phantoms, nilearn's MNI152 brain and IXI heads."""

from __future__ import annotations

# ruff: noqa: E402  (nipype must see NIPYPE_NO_ET before its first import)
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype import Node
from scipy import ndimage

from bids_harmony.errors import DataError
from bids_harmony.interfaces.brainmask import BrainExtraction, is_skull_stripped
from bids_harmony.imaging.edges import canny_edges, canny_edges_at_ratio
from bids_harmony.interfaces.canny import CannyEdges
from bids_harmony.interfaces.n4 import N4BiasCorrection
from bids_harmony.interfaces.normalize import PercentileNormalize, percentile_normalize
from bids_harmony.interfaces.registration import ApplyTransforms, RegisterToTemplate

IXI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi"


def _save(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> str:
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    nib.Nifti1Image(np.asarray(data), affine).to_filename(path)
    return str(path)


def _load(path: str) -> np.ndarray:
    return nib.load(path).get_fdata()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def mni_brain() -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    data = template.get_fdata(dtype=np.float32)
    data[data < 1e-3] = 0.0  # nilearn's resampled template carries denormals in its background
    return nib.Nifti1Image(data, template.affine)


def _ixi_pairs() -> list[tuple[Path, Path]]:
    heads = sorted((IXI_DIR / "nifti").glob("IXI*-T1_ds.nii.gz"))
    return [
        (head, IXI_DIR / "dlmuse" / head.name.replace(".nii.gz", "_DLMUSE.nii.gz"))
        for head in heads
    ]


# --- N4 -------------------------------------------------------------------------------------


def test_n4_removes_a_known_bias_field(tmp_path):
    grid = np.indices((48, 48, 48)).astype(float) - 23.5
    radius = np.sqrt((grid**2).sum(axis=0))
    core, shell = radius < 10, (radius >= 10) & (radius < 20)
    phantom = np.where(core, 100.0, 0.0) + np.where(shell, 60.0, 0.0)
    bias = np.exp(0.012 * grid[0] - 0.008 * grid[2] + 0.0004 * grid[1] ** 2)
    noise = np.random.default_rng(0).normal(0.0, 0.5, phantom.shape) * (phantom > 0)
    affine = np.array([[2.0, 0, 0, -48], [0, 2.0, 0, -50], [0, 0, 2.0, -40], [0, 0, 0, 1]])
    in_file = _save((phantom * bias + noise).astype(np.float32), tmp_path / "biased.nii.gz", affine)

    result = N4BiasCorrection(in_file=in_file, shrink_factor=2).run(cwd=str(tmp_path))

    corrected = nib.load(result.outputs.out_file)
    np.testing.assert_allclose(corrected.affine, affine)
    assert corrected.get_data_dtype() == np.float32
    assert Path(result.outputs.bias_field).exists()
    before, after = _load(in_file), corrected.get_fdata()
    for tissue in (ndimage.binary_erosion(core), ndimage.binary_erosion(shell)):
        cv_before = before[tissue].std() / before[tissue].mean()
        cv_after = after[tissue].std() / after[tissue].mean()
        assert cv_after < 0.5 * cv_before


# --- Brain extraction -----------------------------------------------------------------------


def test_stripped_brain_passes_through_unchanged(tmp_path):
    if not IXI_DIR.is_dir():
        pytest.skip(f"IXI data not found at {IXI_DIR}")
    head_file, labels_file = _ixi_pairs()[0]
    head = nib.load(head_file)
    brain = (np.asanyarray(nib.load(labels_file).dataobj) > 0) * head.get_fdata()
    assert not is_skull_stripped(head.get_fdata(), head.header.get_zooms())
    stripped_file = _save(brain.astype(np.float32), tmp_path / "stripped.nii.gz", head.affine)

    node = Node(BrainExtraction(in_file=stripped_file), name="bet", base_dir=str(tmp_path))
    outputs = node.run().outputs

    assert outputs.was_skull_stripped
    np.testing.assert_array_equal(_load(outputs.out_file), _load(stripped_file))
    assert nib.load(outputs.out_mask).get_data_dtype() == np.uint8
    assert _dice(_load(outputs.out_mask) > 0, brain > 0) > 0.99


def test_mni_template_is_detected_as_stripped():
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)  # raw, denormals in the background included
    assert is_skull_stripped(template.get_fdata(), template.header.get_zooms())


def test_forced_pass_through_and_empty_image(tmp_path, mni_brain):
    in_file = _save(mni_brain.get_fdata(), tmp_path / "mni.nii.gz", mni_brain.affine)
    outputs = BrainExtraction(in_file=in_file, skull_stripped="yes").run(cwd=str(tmp_path)).outputs
    assert outputs.was_skull_stripped
    empty_file = _save(np.zeros((10, 10, 10), np.float32), tmp_path / "empty.nii.gz")
    with pytest.raises(DataError, match="empty.nii.gz"):
        BrainExtraction(in_file=empty_file).run(cwd=str(tmp_path))


@pytest.mark.slow
def test_deepbet_matches_dlmuse_on_every_ixi_head(tmp_path):
    if not IXI_DIR.is_dir():
        pytest.skip(f"IXI data not found at {IXI_DIR}")
    pairs = _ixi_pairs()
    assert len(pairs) == 7
    report = []
    for head_file, labels_file in pairs:
        start = time.perf_counter()
        outputs = BrainExtraction(in_file=str(head_file)).run(cwd=str(tmp_path)).outputs
        seconds = time.perf_counter() - start
        dice = _dice(_load(outputs.out_mask) > 0, _load(str(labels_file)) > 0)
        report.append(f"{head_file.name}: Dice {dice:.3f}, {seconds:.1f} s")
        assert not outputs.was_skull_stripped
        assert dice >= 0.90, report[-1]
    print("\n".join(report))


# --- Registration ---------------------------------------------------------------------------


def _moved_copy(fixed: nib.Nifti1Image) -> np.ndarray:
    """The fixed brain under a known affine: 10° rotation, 4-voxel (8 mm) shift, scale 1.05."""
    angle = np.deg2rad(10.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    matrix = rotation / 1.05
    centre = (np.array(fixed.shape) - 1) / 2
    offset = centre - matrix @ centre + np.array([4.0, -2.0, 0.0])
    return ndimage.affine_transform(fixed.get_fdata(), matrix, offset=offset, order=1)


@pytest.fixture(scope="module")
def registration_case(tmp_path_factory, mni_brain):
    folder = tmp_path_factory.mktemp("registration")
    fixed_file = _save(mni_brain.get_fdata(), folder / "fixed.nii.gz", mni_brain.affine)
    moving = _moved_copy(mni_brain)
    moving_file = _save(moving.astype(np.float32), folder / "moving.nii.gz", mni_brain.affine)
    outputs = RegisterToTemplate(
        moving_file=moving_file, fixed_file=fixed_file, transform_type="affine"
    ).run(cwd=str(folder)).outputs
    return fixed_file, moving_file, outputs


def test_affine_registration_recovers_a_known_transform(registration_case):
    fixed_file, _, outputs = registration_case
    warped, fixed = nib.load(outputs.warped_file), nib.load(fixed_file)
    np.testing.assert_allclose(warped.affine, fixed.affine)
    assert _correlation(warped.get_fdata(), fixed.get_fdata()) > 0.95
    assert _dice(warped.get_fdata() > 0.1, fixed.get_fdata() > 0.1) > 0.9
    assert [Path(f).name for f in outputs.forward_transforms] == ["xfm_0GenericAffine.mat"]
    assert outputs.inverse_invert_flags == [True]


def test_inverse_transforms_map_back_to_the_native_grid(registration_case, tmp_path):
    fixed_file, moving_file, outputs = registration_case
    back = ApplyTransforms(
        in_file=fixed_file,
        reference_file=moving_file,
        transforms=outputs.inverse_transforms,
        invert_flags=outputs.inverse_invert_flags,
    ).run(cwd=str(tmp_path)).outputs
    assert _correlation(_load(back.out_file), _load(moving_file)) > 0.9

    mask_file = _save((_load(fixed_file) > 0.1).astype(np.uint8), tmp_path / "mask.nii.gz",
                      nib.load(fixed_file).affine)
    labels = ApplyTransforms(
        in_file=mask_file,
        reference_file=moving_file,
        transforms=outputs.inverse_transforms,
        invert_flags=outputs.inverse_invert_flags,
        interpolation="nearestNeighbor",
    ).run(cwd=str(tmp_path)).outputs
    assert nib.load(labels.out_file).get_data_dtype() == np.uint8
    assert _dice(_load(labels.out_file) > 0, _load(moving_file) > 0.1) > 0.9


def test_cross_modal_registration_with_mutual_information(tmp_path, mni_brain):
    fixed_file = _save(mni_brain.get_fdata(), tmp_path / "fixed.nii.gz", mni_brain.affine)
    moving = _moved_copy(mni_brain)
    inverted = np.where(moving > 0.05, 1.2 - moving, 0.0)  # T2-like: dark white matter
    moving_file = _save(inverted.astype(np.float32), tmp_path / "moving.nii.gz", mni_brain.affine)
    outputs = RegisterToTemplate(
        moving_file=moving_file, fixed_file=fixed_file, transform_type="affine", metric="mattes"
    ).run(cwd=str(tmp_path)).outputs
    back_in_fixed = ApplyTransforms(
        in_file=_save(moving.astype(np.float32), tmp_path / "t1.nii.gz", mni_brain.affine),
        reference_file=fixed_file,
        transforms=outputs.forward_transforms,
    ).run(cwd=str(tmp_path)).outputs
    assert _correlation(_load(back_in_fixed.out_file), mni_brain.get_fdata()) > 0.95


# --- Percentile normalization ---------------------------------------------------------------


def test_percentile_normalize_by_hand():
    data = np.arange(1.0, 12.0).reshape(11, 1, 1)  # 1 .. 11
    mask = np.ones_like(data)
    mask[-1] = 0  # 11 lies outside the brain
    normalized, low, high = percentile_normalize(data, mask, lower=10.0, upper=90.0)
    assert (low, high) == pytest.approx((1.9, 9.1))  # numpy's linear percentiles of 1..10
    expected = np.clip((data[:10, 0, 0] - 1.9) / 7.2, 0.0, 1.0)
    np.testing.assert_allclose(normalized[:10, 0, 0], expected, rtol=1e-6)
    assert normalized[0, 0, 0] == 0.0 and normalized[9, 0, 0] == 1.0  # clipped
    assert normalized[10, 0, 0] == 0.0  # outside the mask
    assert normalized.dtype == np.float32


def test_percentile_normalize_interface_and_errors(tmp_path):
    data = np.random.default_rng(1).uniform(10, 20, (8, 8, 8)).astype(np.float32)
    mask = np.zeros(data.shape, np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    in_file = _save(data, tmp_path / "t1.nii.gz")
    outputs = PercentileNormalize(
        in_file=in_file, mask_file=_save(mask, tmp_path / "mask.nii.gz")
    ).run(cwd=str(tmp_path)).outputs
    result = _load(outputs.out_file)
    assert result[mask == 0].max() == 0.0 and 0.0 <= result.min() and result.max() <= 1.0
    assert outputs.lower_value == pytest.approx(np.percentile(data[mask > 0], 1.0), rel=1e-5)

    empty_mask = _save(np.zeros(data.shape, np.uint8), tmp_path / "empty_mask.nii.gz")
    with pytest.raises(DataError, match="t1.nii.gz"):
        PercentileNormalize(in_file=in_file, mask_file=empty_mask).run(cwd=str(tmp_path))
    flat = _save(np.full(data.shape, 5.0, np.float32), tmp_path / "flat.nii.gz")
    with pytest.raises(DataError, match="flat.nii.gz"):
        PercentileNormalize(in_file=flat, mask_file=_save(mask, tmp_path / "m.nii.gz")).run(
            cwd=str(tmp_path)
        )


# --- Canny ----------------------------------------------------------------------------------


def _distance_to_sphere(grid: np.ndarray, radius: float) -> np.ndarray:
    return np.abs(np.sqrt((grid**2).sum(axis=0)) - radius)


def _distance_to_cube(grid: np.ndarray, half_side: float) -> np.ndarray:
    excess = np.abs(grid) - half_side
    outside = np.sqrt((np.clip(excess, 0, None) ** 2).sum(axis=0))
    inside = np.clip(-excess.max(axis=0), 0, None)
    return np.where(excess.max(axis=0) > 0, outside, inside)


@pytest.mark.parametrize("shape", ["sphere", "cube"])
def test_canny_edges_lie_on_the_true_boundary(shape):
    grid = np.indices((64, 64, 64)).astype(float) - 31.5
    if shape == "sphere":
        inside = np.sqrt((grid**2).sum(axis=0)) <= 20.0
        distance = _distance_to_sphere(grid, 20.0)
    else:
        inside = np.abs(grid).max(axis=0) <= 15.0
        distance = _distance_to_cube(grid, 15.0)
    edges = canny_edges(inside.astype(np.float32), upper=0.1, variance=1.0)
    assert edges.sum() > 1000
    assert np.mean(distance[edges] <= 1.5) >= 0.9


@pytest.fixture(scope="module")
def brain_volumes(mni_brain) -> dict[str, np.ndarray]:
    data = mni_brain.get_fdata(dtype=np.float32)
    corner_low = np.argwhere(data > 0).min(axis=0)
    corner_high = np.argwhere(data > 0).max(axis=0) + 1
    cropped = data[tuple(slice(a, b) for a, b in zip(corner_low, corner_high))]
    return {"whole": data, "cropped": cropped}


@pytest.mark.parametrize(("volume", "ratio"), [("cropped", 0.08), ("whole", 0.03)])
def test_canny_threshold_search_reaches_the_ratio(brain_volumes, volume, ratio):
    edges, threshold = canny_edges_at_ratio(brain_volumes[volume], ratio, spacing=(2.0,) * 3)
    assert edges.dtype == np.uint8
    assert threshold > 0
    assert abs(edges.mean() - ratio) <= 0.005


def test_canny_edge_count_falls_as_the_threshold_rises(brain_volumes):
    counts = [
        int(canny_edges(brain_volumes["whole"], upper, spacing=(2.0,) * 3).sum())
        for upper in (0.05, 0.1, 0.2, 0.3, 0.4)
    ]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_canny_interface_with_mask_denominator(tmp_path, mni_brain):
    data = mni_brain.get_fdata(dtype=np.float32)
    in_file = _save(data, tmp_path / "brain.nii.gz", mni_brain.affine)
    mask_file = _save((data > 0).astype(np.uint8), tmp_path / "mask.nii.gz", mni_brain.affine)
    outputs = CannyEdges(
        in_file=in_file, mask_file=mask_file, edge_ratio=0.15, denominator="mask"
    ).run(cwd=str(tmp_path)).outputs
    edges = nib.load(outputs.out_file)
    assert edges.get_data_dtype() == np.uint8
    assert abs(outputs.achieved_ratio - 0.15) <= 0.005
    assert edges.get_fdata()[data == 0].sum() == 0
    assert outputs.achieved_ratio == pytest.approx(edges.get_fdata().sum() / (data > 0).sum())


def test_canny_reports_an_unreachable_ratio():
    cube = np.zeros((32, 32, 32), np.float32)
    cube[8:24, 8:24, 8:24] = 1.0
    edges, threshold = canny_edges_at_ratio(cube, ratio=0.5)
    assert threshold == 0.0 and edges.mean() < 0.5


def test_canny_prefers_a_non_empty_map_across_a_cliff() -> None:
    """A noise-free cube has one edge strength: its edges are all there or all gone, and a
    ratio in between must not return an empty map."""
    cube = np.zeros((32, 32, 32), dtype=np.float32)
    cube[8:24, 8:24, 8:24] = 1.0
    all_edges, _ = canny_edges_at_ratio(cube, ratio=0.5)
    full_ratio = all_edges.mean()
    edges, threshold = canny_edges_at_ratio(cube, ratio=full_ratio / 10)
    assert edges.sum() > 0  # the cube's faces (4 % of voxels), not the empty map above them
    assert threshold > 0 and edges.mean() < full_ratio
