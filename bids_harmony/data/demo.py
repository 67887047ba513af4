"""A small multi-site traveling-subject BIDS dataset, with its ground truth, made in seconds.

The app needs a dataset that exists on a fresh offline machine: the default input of the
README's main command and the fixture of the end-to-end tests. Every subject is "scanned" at
every simulated site (one session per site), so the anatomy is identical across a subject's
sessions and any difference between them is the site effect the harmonizers must remove.

Anatomy comes either from the MNI152 2009a-symmetric brain-extracted template and its GM/WM
probability maps that ship inside the nilearn wheel (``anatomy="mni"``; each subject is the
template under its own smooth random deformation and similarity transform), or from the real
IXI heads in ``/work/shared/data/ixi`` (``anatomy="ixi"``; one subject per head, skull kept).

A simulated scanner changes an image the way real scanners do, in this order:

1. a tissue-dependent monotone intensity transfer: each tissue (CSF, GM, WM, and "other" for
   non-brain voxels) gets its own gain, then a power-law (gamma) curve bends the whole range;
2. a global intensity scale (0-1000, 0-4000, 0-1 or 0-255 ranges, stored as int16, uint16,
   int16 with a NIfTI scl_slope as Philips exports are, or uint8);
3. blur: an anisotropic Gaussian along one axis for thick slices;
4. a smooth multiplicative bias field (second-order polynomial, site-specific shape);
5. Rician noise (magnitude of complex Gaussian noise);
6. storage orientation: one site writes LPS instead of RAS so reorientation is exercised;
7. for MNI anatomy only, a skull-stripped release: voxels outside the brain mask are set
   to 0, as shared datasets distribute brain-extracted images, so the
   pipeline's detection of skull-stripped input is exercised (IXI heads keep skull and noise).

Steps 1-2 alone give the per-session ground truth in ``derivatives/demo-truth``; the raw image
adds 3-6. Site parameters are fixed constants (not drawn from the seed) so a site means the
same scanner in every demo; the seed drives anatomy, ages, sexes and noise.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_harmony import __version__
from bids_harmony.errors import DataError, InputMissingError, OutputError, UsageError
from bids_harmony.fileio import atomic_directory, write_json, write_tsv

GENERATOR_NAME = "bids_harmony-demo"
BIDS_VERSION = "1.9.0"
TRUTH_PIPELINE = "demo-truth"
SEQUENCES = ("T1w", "T2w")
ANATOMIES = ("mni", "ixi")
MIN_SITES, MAX_SITES = 2, 4
DEFAULT_IXI_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "ixi"

TISSUES = ("CSF", "GM", "WM")
# Reference tissue intensities of the un-shifted anatomy (the "truth" contrast), WM-normalised
# so T1w WM sits near 0.85 as in the MNI template; T2w inverts the order (CSF brightest).
TRUTH_TISSUE_INTENSITY = {
    "T1w": (0.25, 0.60, 0.85),
    "T2w": (1.00, 0.55, 0.35),
}
# Mean intensity of the nilearn MNI T1 (scaled to [0, 1]) where CSF, GM, WM probability > 0.9.
MNI_TEMPLATE_TISSUE_MEANS = (0.28, 0.65, 0.87)
# MUSE ROI numbers of DLMUSE label maps. Label 1 is outside the MUSE list; its voxels lie on
# the brain surface at ventricle-like intensity, so it is counted as (sulcal) CSF.
MUSE_CSF_LABELS = frozenset({1, 4, 11, 49, 50, 51, 52})
MUSE_WM_LABELS = frozenset({40, 41, *range(81, 96)})
MUSE_MAX_SINGLE_LABEL = 300
# nilearn's 2 mm MNI grid is 99x117x95 from (-98, -134, -72) mm; these slices crop it to the
# 91x109x91 field of view of FSL's MNI152 2 mm grid (from (-90, -126, -72) mm), which holds
# the whole template brain and saves a fifth of the voxels to simulate and compress.
MNI_2MM_FIELD_OF_VIEW = (slice(4, 95), slice(4, 113), slice(0, 91))


@dataclass(frozen=True)
class SiteProfile:
    """One simulated scanner: its identity in the sidecars and the effects it applies.

    ``tissue_gains`` and ``gamma`` are per sequence; gains are (CSF, GM, WM) factors on the
    truth intensity (non-brain voxels get gain 1) chosen to keep the tissue order of each
    contrast, so the transfer is monotone within and across tissues. ``blur_sigma_voxels`` is
    the Gaussian sigma along each RAS axis (2 mm voxels), ``bias_coefficients`` the weights of
    the terms x, y, z, x², y², z², xy, xz, yz of the bias polynomial on [-1, 1]³. With
    ``rescaled`` the float intensities are stored as ``dtype`` through the NIfTI scl_slope
    (as Philips exports are); otherwise they are rounded to ``dtype``'s integers.
    """

    label: str
    manufacturer: str
    model: str
    field_strength_tesla: float
    institution: str
    station: str
    tissue_gains: Mapping[str, tuple[float, float, float]]
    gamma: Mapping[str, float]
    intensity_scale: float
    dtype: str
    rescaled: bool
    bias_amplitude: float
    bias_coefficients: tuple[float, ...]
    noise_fraction: float
    blur_sigma_voxels: tuple[float, float, float]
    orientation: str

    def sidecar(self) -> dict[str, object]:
        """Scanner fields of a BIDS sidecar, identical for every image of this site."""
        return {
            "Manufacturer": self.manufacturer,
            "ManufacturersModelName": self.model,
            "MagneticFieldStrength": self.field_strength_tesla,
            "InstitutionName": self.institution,
            "StationName": self.station,
        }


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        label="SiemensTrio3T",
        manufacturer="Siemens",
        model="TrioTim",
        field_strength_tesla=3.0,
        institution="Demo Hospital North",
        station="TRIO-NORTH",
        tissue_gains={"T1w": (1.10, 0.95, 1.05), "T2w": (0.95, 1.05, 1.00)},
        gamma={"T1w": 0.85, "T2w": 0.90},
        intensity_scale=1000.0,
        dtype="int16",
        rescaled=False,
        bias_amplitude=0.12,
        bias_coefficients=(0.6, -0.3, 0.8, 0.2, -0.4, 0.3, 0.1, 0.0, -0.2),
        noise_fraction=0.02,
        blur_sigma_voxels=(0.0, 0.0, 0.0),
        orientation="RAS",
    ),
    SiteProfile(
        label="GESignaHDxt15T",
        manufacturer="GE",
        model="Signa HDxt",
        field_strength_tesla=1.5,
        institution="Demo University Clinic",
        station="SIGNA-HDXT",
        tissue_gains={"T1w": (1.35, 1.10, 0.95), "T2w": (0.85, 1.10, 1.15)},
        gamma={"T1w": 1.25, "T2w": 1.40},
        intensity_scale=4000.0,
        dtype="uint16",
        rescaled=False,
        bias_amplitude=0.22,
        bias_coefficients=(-0.4, 0.7, 0.5, -0.5, 0.2, 0.6, 0.0, 0.3, 0.1),
        noise_fraction=0.04,
        blur_sigma_voxels=(0.0, 0.0, 1.0),
        orientation="LPS",
    ),
    SiteProfile(
        label="PhilipsAchieva3T",
        manufacturer="Philips",
        model="Achieva",
        field_strength_tesla=3.0,
        institution="Demo Research Centre",
        station="ACHIEVA-RC",
        tissue_gains={"T1w": (0.80, 0.90, 1.10), "T2w": (1.10, 0.95, 0.90)},
        gamma={"T1w": 0.70, "T2w": 0.80},
        intensity_scale=1.0,
        dtype="int16",
        rescaled=True,
        bias_amplitude=0.18,
        bias_coefficients=(0.3, 0.5, -0.7, 0.4, 0.3, -0.2, -0.3, 0.2, 0.0),
        noise_fraction=0.03,
        blur_sigma_voxels=(0.6, 0.0, 0.0),
        orientation="RAS",
    ),
    SiteProfile(
        label="SiemensPrisma3T",
        manufacturer="Siemens",
        model="Prisma",
        field_strength_tesla=3.0,
        institution="Demo Imaging Institute",
        station="PRISMA-II",
        tissue_gains={"T1w": (0.90, 1.00, 1.00), "T2w": (1.05, 0.90, 1.05)},
        gamma={"T1w": 1.10, "T2w": 1.05},
        intensity_scale=200.0,
        dtype="uint8",
        rescaled=False,
        bias_amplitude=0.10,
        bias_coefficients=(-0.2, -0.6, 0.3, 0.6, 0.5, 0.2, 0.2, -0.1, 0.3),
        noise_fraction=0.015,
        blur_sigma_voxels=(0.0, 0.0, 0.0),
        orientation="RAS",
    ),
)


@dataclass
class SubjectAnatomy:
    """One subject on the RAS 2 mm grid: tissue maps, mask and un-shifted rendered images.

    ``tissues`` stacks CSF, GM and WM probabilities (their sum is < 1 outside the brain, where
    the remainder counts as non-brain tissue); ``truth`` maps each sequence to its image
    before any site effect.
    """

    label: str
    affine: np.ndarray
    tissues: np.ndarray
    brain_mask: np.ndarray
    truth: dict[str, np.ndarray]
    age: float
    sex: str


def generate_demo_dataset(
    out_dir: str | os.PathLike[str],
    *,
    n_subjects: int = 4,
    n_sites: int = 3,
    seed: int = 0,
    sequences: Sequence[str] | None = None,
    anatomy: str = "mni",
    ixi_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the demo dataset to ``out_dir`` and return its resolved path.

    ``sequences`` defaults to T1w and T2w for MNI anatomy and to T1w for IXI (a T2w cannot be
    made credibly from a real T1w head with skull). The dataset is built in a hidden temporary
    directory next to ``out_dir`` and renamed into place, so a crash never leaves half a
    dataset; an existing ``out_dir`` must be empty or a previous demo (then it is replaced).
    """
    sequences = tuple(sequences) if sequences is not None else _default_sequences(anatomy)
    _check_arguments(n_subjects, n_sites, sequences, anatomy)
    target = Path(out_dir).expanduser().resolve()
    _check_target(target)
    if anatomy == "mni":
        subjects = _mni_subjects(n_subjects, seed)
    else:
        subjects = _ixi_subjects(n_subjects, Path(ixi_dir) if ixi_dir else DEFAULT_IXI_DIR)
    sites = SITE_PROFILES[:n_sites]

    try:
        with atomic_directory(target) as staging:
            _write_dataset(staging, subjects, sites, sequences, seed, anatomy)
    except OSError as error:
        raise OutputError(f"cannot write the demo to {target}: {error}") from error
    return target


def is_demo_dataset(path: Path) -> bool:
    """Whether ``path`` holds a dataset this generator wrote (safe to replace)."""
    description = path / "dataset_description.json"
    try:
        generated_by = json.loads(description.read_text()).get("GeneratedBy", [])
    except (OSError, ValueError, AttributeError):
        return False
    return any(
        isinstance(entry, dict) and entry.get("Name") == GENERATOR_NAME for entry in generated_by
    )


def _default_sequences(anatomy: str) -> tuple[str, ...]:
    return ("T1w",) if anatomy == "ixi" else SEQUENCES


def _check_arguments(
    n_subjects: int, n_sites: int, sequences: tuple[str, ...], anatomy: str
) -> None:
    if anatomy not in ANATOMIES:
        raise UsageError(f"--anatomy must be one of {', '.join(ANATOMIES)}, not {anatomy!r}")
    if n_subjects < 1:
        raise UsageError(f"--subjects must be at least 1, not {n_subjects}")
    if not MIN_SITES <= n_sites <= MAX_SITES:
        raise UsageError(f"--sites must be between {MIN_SITES} and {MAX_SITES}, not {n_sites}")
    if set(sequences) - set(SEQUENCES) or not sequences or len(set(sequences)) != len(sequences):
        raise UsageError(f"--sequences takes distinct values among {' '.join(SEQUENCES)}")
    if anatomy == "ixi" and "T2w" in sequences:
        raise UsageError("--anatomy ixi renders T1w only (the IXI heads are T1w); drop T2w")


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{target} exists and is not a directory; choose another output")
    if any(target.iterdir()) and not is_demo_dataset(target):
        raise OutputError(
            f"{target} is not empty and not a previous demo; choose an empty or new directory"
        )


# --------------------------------------------------------------------------- anatomy


def _mni_subjects(n_subjects: int, seed: int) -> list[SubjectAnatomy]:
    """Deformed copies of the nilearn MNI152 2009a template, one per subject."""
    affine, (template, grey, white, brain) = _mni_source()
    demographics_rng = np.random.default_rng([seed, 2])
    subjects = []
    for index in range(n_subjects):
        coordinates = _random_warp_coordinates(
            template.shape, np.random.default_rng([seed, 0, index])
        )
        warped_brain, warped_grey, warped_white, warped_template = (
            np.clip(ndimage.map_coordinates(volume, coordinates, order=1), 0.0, 1.0)
            for volume in (brain, grey, white, template)
        )
        brain_mask = warped_brain >= 0.5
        overflow = np.maximum(warped_grey + warped_white, 1.0)  # GM+WM > 1 in a few voxels
        grey_p, white_p = warped_grey / overflow, warped_white / overflow
        csf_p = np.clip(warped_brain - grey_p - white_p, 0.0, 1.0)
        tissues = np.stack([csf_p, grey_p, white_p]).astype(np.float32)
        texture = warped_template * warped_brain
        subjects.append(
            SubjectAnatomy(
                label=f"{index + 1:02d}",
                affine=affine.copy(),
                tissues=tissues,
                brain_mask=brain_mask,
                truth=_render_mni_truth(tissues, texture),
                age=round(float(demographics_rng.uniform(20.0, 80.0)), 1),
                sex=str(demographics_rng.choice(["F", "M"])),
            )
        )
    return subjects


@functools.lru_cache(maxsize=1)
def _mni_source() -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Affine and (T1, GM, WM, brain mask) of the cropped 2 mm MNI grid, read-only.

    nilearn's ``resolution=2`` images sample the 1 mm ones at every other voxel (same origin,
    so the spline passes through the samples): taking ``[::2, ::2, ::2]`` of ``resolution=1``
    gives the same arrays (checked to 1e-15) without nilearn's 2 s of resampling. Cached
    because tests and end-to-end fixtures build several demos in one process.
    """
    from nilearn import datasets  # heavy import, needed only here

    template_img = datasets.load_mni152_template(resolution=1)
    affine = template_img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    corner = [field.start for field in MNI_2MM_FIELD_OF_VIEW]
    affine[:3, 3] = nib.affines.apply_affine(affine, corner)
    volumes = tuple(
        np.asarray(image.dataobj, dtype=np.float32)[::2, ::2, ::2][MNI_2MM_FIELD_OF_VIEW].copy()
        for image in (
            template_img,
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
            datasets.load_mni152_brain_mask(resolution=1),
        )
    )
    for array in (affine, *volumes):
        array.flags.writeable = False
    return affine, volumes


def _random_warp_coordinates(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Voxel coordinates to sample for one subject's deformed anatomy.

    A similarity transform about the grid centre (rotation up to 4° per axis, isotropic scale
    0.95-1.05 with up to 2 % extra per axis, i.e. brain volumes within about ±20 % of the
    template's, as in healthy adults; shift up to 3 mm) plus a smooth displacement:
    Gaussian noise on a 4x coarser grid, smoothed with sigma 1.5 coarse voxels (12 mm),
    upsampled trilinearly and rescaled to a 3 mm (1.5 voxel) maximum, so gyri move but
    topology is kept. Smoothing on the coarse grid is what keeps this fast.
    """
    angles = np.deg2rad(rng.uniform(-4.0, 4.0, size=3))
    scales = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, size=3)
    shift_voxels = rng.uniform(-1.5, 1.5, size=3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rotation = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    sampling_matrix = rotation @ np.diag(1.0 / scales)
    centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    coordinates = (sampling_matrix @ grid) + centre[:, None] + shift_voxels[:, None]

    coarse_shape = tuple(-(-n // 4) + 1 for n in shape)
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    displacement = np.stack(
        [
            ndimage.zoom(
                ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=1.5),
                zoom,
                order=1,
                grid_mode=True,
                mode="nearest",
            )
            for _ in range(3)
        ]
    )
    displacement *= 1.5 / np.abs(displacement).max()
    return (coordinates.reshape(3, *shape) + displacement).astype(np.float32)


def _render_mni_truth(tissues: np.ndarray, texture: np.ndarray) -> dict[str, np.ndarray]:
    """Un-shifted T1w and T2w from tissue maps, textured by the warped MNI T1.

    T1w is the mean of the tissue-mixture image and the template intensities, so it keeps the
    template's real texture. T2w takes the template's deviation from its own tissue means and
    subtracts it (T2 contrast runs opposite to T1), scaled by 0.8 to the wider T2w range.
    """
    t1_mixture = np.tensordot(TRUTH_TISSUE_INTENSITY["T1w"], tissues, axes=1)
    t2_mixture = np.tensordot(TRUTH_TISSUE_INTENSITY["T2w"], tissues, axes=1)
    template_tissue_means = np.tensordot(MNI_TEMPLATE_TISSUE_MEANS, tissues, axes=1)
    texture_residual = texture - template_tissue_means
    return {
        "T1w": np.clip(0.5 * t1_mixture + 0.5 * texture, 0.0, None).astype(np.float32),
        "T2w": np.clip(t2_mixture - 0.8 * texture_residual, 0.0, None).astype(np.float32),
    }


def _ixi_subjects(n_subjects: int, ixi_dir: Path) -> list[SubjectAnatomy]:
    """The first ``n_subjects`` IXI heads by ID (all, if fewer), reoriented to RAS, skull kept.

    The T1w is divided by its WM median and multiplied by the truth WM level (0.85) so site
    scales mean the same in both anatomies. Tissue maps are the DLMUSE classes smoothed with
    sigma 0.7 voxel, a stand-in for partial volume so tissue gains change smoothly at edges.
    """
    if not ixi_dir.is_dir():
        raise InputMissingError(f"IXI directory {ixi_dir} does not exist; pass --ixi-dir")
    images = sorted((ixi_dir / "nifti").glob("IXI*-T1_ds.nii.gz"))
    if not images:
        raise InputMissingError(f"no IXI heads (nifti/IXI*-T1_ds.nii.gz) found in {ixi_dir}")
    demographics = _read_ixi_demographics(ixi_dir / "demographics.csv")
    subjects = []
    for image_path in images[:n_subjects]:
        subject_id = image_path.name.removesuffix("-T1_ds.nii.gz")
        label_path = ixi_dir / "dlmuse" / f"{subject_id}-T1_ds_DLMUSE.nii.gz"
        if not label_path.is_file():
            raise InputMissingError(f"IXI label map {label_path} is missing")
        if subject_id not in demographics:
            raise DataError(f"{subject_id} has no row in {ixi_dir / 'demographics.csv'}")
        head_img = nib.as_closest_canonical(nib.load(image_path))
        labels_img = nib.as_closest_canonical(nib.load(label_path))
        head = np.asarray(head_img.dataobj, dtype=np.float32)
        labels = np.asarray(labels_img.dataobj).astype(np.int32)
        classes = np.stack(
            [
                np.isin(labels, list(MUSE_CSF_LABELS)),
                (labels > 0)
                & (labels < MUSE_MAX_SINGLE_LABEL)
                & ~np.isin(labels, list(MUSE_CSF_LABELS | MUSE_WM_LABELS)),
                np.isin(labels, list(MUSE_WM_LABELS)),
            ]
        ).astype(np.float32)
        tissues = np.stack([ndimage.gaussian_filter(c, sigma=0.7) for c in classes])
        white_median = float(np.median(head[classes[2] > 0]))
        truth = head * (TRUTH_TISSUE_INTENSITY["T1w"][2] / white_median)
        age, sex = demographics[subject_id]
        subjects.append(
            SubjectAnatomy(
                label=subject_id.split("-")[0],
                affine=head_img.affine.copy(),
                tissues=tissues.astype(np.float32),
                brain_mask=labels > 0,
                truth={"T1w": truth.astype(np.float32)},
                age=age,
                sex=sex,
            )
        )
    return subjects


def _read_ixi_demographics(path: Path) -> dict[str, tuple[float, str]]:
    if not path.is_file():
        raise InputMissingError(f"IXI demographics {path} is missing")
    with path.open(newline="") as handle:
        return {row["MRID"]: (float(row["Age"]), row["Sex"]) for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------- site effects


def _site_truth(
    truth: np.ndarray, tissues: np.ndarray, site: SiteProfile, sequence: str
) -> np.ndarray:
    """Tissue gains, gamma curve and scale: the site image without blur, bias or noise."""
    gains = np.asarray(site.tissue_gains[sequence], dtype=np.float32)
    non_brain = np.clip(1.0 - tissues.sum(axis=0), 0.0, 1.0)
    gain_map = np.tensordot(gains, tissues, axes=1) + non_brain
    transferred = np.power(np.clip(truth * gain_map, 0.0, None), site.gamma[sequence])
    return (site.intensity_scale * transferred).astype(np.float32)


def _bias_field(shape: tuple[int, ...], brain_mask: np.ndarray, site: SiteProfile) -> np.ndarray:
    """1 + amplitude·P/max|P| for the site's quadratic P, so it spans ±amplitude in the brain."""
    x, y, z = np.meshgrid(
        *(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape), indexing="ij"
    )
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    polynomial = sum(
        weight * term for weight, term in zip(site.bias_coefficients, terms, strict=True)
    )
    polynomial -= polynomial[brain_mask].mean()
    return 1.0 + site.bias_amplitude * polynomial / np.abs(polynomial[brain_mask]).max()


def _acquire(
    site_truth: np.ndarray, brain_mask: np.ndarray, site: SiteProfile, rng: np.random.Generator
) -> np.ndarray:
    """Blur, bias field and Rician noise applied to a site truth, in the site's number type."""
    image = site_truth
    if any(site.blur_sigma_voxels):
        image = ndimage.gaussian_filter(image, sigma=site.blur_sigma_voxels)
    image = image * _bias_field(image.shape, brain_mask, site)
    sigma = site.noise_fraction * site.intensity_scale
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    image = np.hypot(real, imaginary)
    if site.rescaled:
        return image.astype(np.float32)
    dtype = np.dtype(site.dtype)
    return np.clip(np.rint(image), 0, np.iinfo(dtype).max).astype(dtype)


def _reorient(
    data: np.ndarray, affine: np.ndarray, orientation: str
) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine of a RAS image stored with axis codes ``orientation`` (same world)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(orientation))
    )
    stored = nib.orientations.apply_orientation(data, transform)
    stored_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(stored), stored_affine


# --------------------------------------------------------------------------- writing


def _write_dataset(
    root: Path,
    subjects: list[SubjectAnatomy],
    sites: Sequence[SiteProfile],
    sequences: tuple[str, ...],
    seed: int,
    anatomy: str,
) -> None:
    """Raw BIDS tree plus ``derivatives/demo-truth``.

    Subject ``i`` visits the sites in rotated order (session ``j`` is at site ``(i + j) mod
    K``), as traveling subjects do, so a pipeline cannot mistake session for site. Truth
    images are stored as int16 and probabilities as uint8 through the NIfTI scl_slope
    (relative precision ~3e-5 and 1/255), which keeps the demo small and fast to write.
    """
    truth_root = root / "derivatives" / TRUTH_PIPELINE
    _write_descriptions(root, truth_root, subjects, sites, sequences, seed, anatomy)
    _write_participants(root, subjects)
    for subject_index, subject in enumerate(subjects):
        prefix = f"sub-{subject.label}"
        truth_anat = truth_root / prefix / "anat"
        _save_nifti(
            subject.brain_mask.astype(np.uint8),
            subject.affine,
            truth_anat / f"{prefix}_desc-brain_mask.nii.gz",
        )
        for tissue, probability in zip(TISSUES, subject.tissues, strict=True):
            path = truth_anat / f"{prefix}_label-{tissue}_probseg.nii.gz"
            _save_nifti(probability, subject.affine, path, storage_dtype=np.uint8)
        for sequence in sequences:
            path = truth_anat / f"{prefix}_desc-truth_{sequence}.nii.gz"
            _save_nifti(subject.truth[sequence], subject.affine, path, storage_dtype=np.int16)

        session_rows = []
        for session_index in range(len(sites)):
            site_index = (subject_index + session_index) % len(sites)
            site = sites[site_index]
            session = f"ses-{session_index + 1:02d}"
            session_rows.append({"session_id": session, "site": site.label})
            for sequence_index, sequence in enumerate(sequences):
                name = f"{prefix}_{session}_{sequence}"
                site_truth = _site_truth(subject.truth[sequence], subject.tissues, site, sequence)
                truth_path = (
                    truth_root
                    / prefix
                    / session
                    / "anat"
                    / f"{prefix}_{session}_desc-truth_{sequence}.nii.gz"
                )
                _save_nifti(site_truth, subject.affine, truth_path, storage_dtype=np.int16)

                noise_rng = np.random.default_rng(
                    [seed, 1, subject_index, site_index, sequence_index]
                )
                acquired = _acquire(site_truth, subject.brain_mask, site, noise_rng)
                if anatomy == "mni":
                    acquired = np.where(subject.brain_mask, acquired, 0).astype(acquired.dtype)
                stored, stored_affine = _reorient(acquired, subject.affine, site.orientation)
                raw_anat = root / prefix / session / "anat"
                _save_nifti(
                    stored, stored_affine, raw_anat / f"{name}.nii.gz", storage_dtype=site.dtype
                )
                write_json(raw_anat / f"{name}.json", site.sidecar())
        write_tsv(root / prefix / f"{prefix}_sessions.tsv", session_rows, ["session_id", "site"])


def _write_descriptions(
    root: Path,
    truth_root: Path,
    subjects: list[SubjectAnatomy],
    sites: Sequence[SiteProfile],
    sequences: tuple[str, ...],
    seed: int,
    anatomy: str,
) -> None:
    generated_by = [
        {
            "Name": GENERATOR_NAME,
            "Version": __version__,
            "Description": f"seed={seed}, anatomy={anatomy}, sites={len(sites)}",
        }
    ]
    if anatomy == "mni":
        license_text = (
            "Derived from the ICBM 2009a template (c) McConnell Brain Imaging Centre; "
            "free use with attribution"
        )
        source = "the MNI152 ICBM 2009a symmetric template shipped with nilearn"
    else:
        license_text = "CC-BY-SA-3.0"
        source = "real IXI T1w heads (brain-development.org/ixi-dataset, CC BY-SA 3.0)"
    write_json(
        root / "dataset_description.json",
        {
            "Name": (
                f"bids_harmony demo: {len(subjects)} traveling subjects "
                f"at {len(sites)} simulated sites"
            ),
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": license_text,
            "GeneratedBy": generated_by,
        },
    )
    (root / "README").write_text(
        "bids_harmony demo dataset\n\n"
        f"Simulated traveling-subject study: {len(subjects)} subjects, each scanned at every "
        f"one of {len(sites)} simulated scanners (one session per scanner; the site of each "
        "session is in sub-*/sub-*_sessions.tsv and in the scanner fields of every JSON sidecar).\n"
        f"Anatomy: {source}. Sequences: {', '.join(sequences)}.\n"
        "Ground truth (images before site effects, brain masks, tissue maps and the simulated "
        f"site parameters) is in derivatives/{TRUTH_PIPELINE}.\n"
        "Generated by bids_harmony-demo; do not use for anything but testing.\n"
    )
    write_json(
        truth_root / "dataset_description.json",
        {
            "Name": "bids_harmony demo ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        },
    )
    write_json(
        truth_root / "sites.json",
        {
            "steps": [
                "site_truth = intensity_scale * (truth * gain)^gamma, gain = tissue-weighted "
                "(CSF, GM, WM) gains, 1 outside the brain",
                "raw = Rician(blur(site_truth) * bias, noise_fraction * intensity_scale), "
                "cast to dtype",
                "bias = 1 + bias_amplitude * P / max|P| in brain, P = quadratic with "
                "bias_coefficients on terms x, y, z, x^2, y^2, z^2, xy, xz, yz "
                "over [-1, 1]^3 (RAS axes)",
            ],
            "sites": {site.label: asdict(site) for site in sites},
        },
    )


def _write_participants(root: Path, subjects: list[SubjectAnatomy]) -> None:
    rows = [
        {"participant_id": f"sub-{s.label}", "age": f"{s.age:g}", "sex": s.sex} for s in subjects
    ]
    write_tsv(root / "participants.tsv", rows, ["participant_id", "age", "sex"])
    write_json(
        root / "participants.json",
        {
            "age": {"Description": "age at the (simulated) scans", "Units": "year"},
            "sex": {
                "Description": "sex of the participant",
                "Levels": {"F": "female", "M": "male"},
            },
        },
    )


def _save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: Path,
    storage_dtype: np.typing.DTypeLike | None = None,
) -> None:
    """Save with scanner-space qform/sform; float data to an integer dtype gets scl_slope."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    if storage_dtype is not None:
        image.set_data_dtype(storage_dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
