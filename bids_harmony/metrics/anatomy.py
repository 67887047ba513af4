"""Was the anatomy kept? Tissue segmentation, Dice and the anatomical-preservation score.

The papers segment GM and WM (FreeSurfer in UMH) of source and harmonized images and compare
them. FreeSurfer is out of reach here. Measured on the demo's 2 mm template-space images (2
shared cores): ANTs Atropos (k-means init, MRF 0.1, 3 classes) takes ~3 s per image, so the
48 segmentations of the demo (source + harmonized) would cost 2.5 minutes; 3-class k-means of
the brain intensities (scikit-learn), which is Atropos's initialisation, takes ~0.03 s and its
class volumes are within ~7 % of Atropos's. :func:`segment_tissues` uses k-means. A Gaussian
mixture was tried and rejected: on histogram-matched images one component collapsed onto an
intensity spike and left GM empty. Being intensity-only, the segmentation measures what a
harmonizer could break: the tissue contrast.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bids_harmony.errors import DataError
from bids_harmony.volume import Volume

TISSUES = ("CSF", "GM", "WM")
# Tissue order from darkest to brightest per sequence; labels are 1 + index in TISSUES.
INTENSITY_ORDER: Mapping[str, tuple[str, str, str]] = {
    "T1w": ("CSF", "GM", "WM"),
    "T2w": ("WM", "GM", "CSF"),
    "PDw": ("WM", "GM", "CSF"),
    "FLAIR": ("CSF", "WM", "GM"),
}
# Voxels the centroids are fitted on: plenty for three 1-D centroids; every brain voxel is
# then labelled.
FIT_SAMPLE = 50_000


def segment_tissues(volume: Volume, sequence: str, seed: int = 0) -> np.ndarray:
    """CSF/GM/WM labels (1/2/3, 0 outside the brain mask) from 3-class intensity k-means.

    Classes are named by their centroid's rank using :data:`INTENSITY_ORDER`; k-means starts
    from the 10th, 50th and 90th brain percentiles, so runs are reproducible. The outer
    one-voxel rim of the mask is left unlabelled: it mixes brain with the zero background
    (partial volume) and, in a T2w, looks like white matter. On a demo session, leaving it
    out raised the T1w-vs-T2w tissue Dice from 0.23/0.65/0.81 to 0.75/0.72/0.85 (CSF/GM/WM).
    """
    from scipy import ndimage
    from sklearn.cluster import KMeans

    if sequence not in INTENSITY_ORDER:
        raise DataError(
            f"no tissue intensity order is known for {sequence}; tissue measures cover "
            f"{', '.join(INTENSITY_ORDER)} only"
        )
    mask = ndimage.binary_erosion(volume.mask.astype(bool), iterations=1)
    values = volume.data[mask].astype(np.float64).reshape(-1, 1)
    if len(values) < 3 * 10:
        raise DataError(f"the brain mask holds {len(values)} voxels; too few to segment")
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(len(values), size=min(FIT_SAMPLE, len(values)), replace=False)]
    kmeans = KMeans(n_clusters=3, init=np.quantile(sample, (0.1, 0.5, 0.9)).reshape(-1, 1),
                    n_init=1, random_state=seed).fit(sample)
    component = kmeans.predict(values)
    darkest_first = np.argsort(kmeans.cluster_centers_.ravel())
    label_of_component = np.empty(3, dtype=np.uint8)
    for rank, comp in enumerate(darkest_first):
        label_of_component[comp] = TISSUES.index(INTENSITY_ORDER[sequence][rank]) + 1
    labels = np.zeros(volume.data.shape, dtype=np.uint8)
    labels[mask] = label_of_component[component]
    return labels


def tissue_dice(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Dice overlap per tissue between two label maps (``nan`` when both lack the tissue)."""
    _check_shapes(reference, test)
    out = {}
    for index, tissue in enumerate(TISSUES, start=1):
        a, b = reference == index, test == index
        total = int(a.sum() + b.sum())
        out[tissue] = float(2.0 * (a & b).sum() / total) if total else float("nan")
    return out


def anatomical_preservation(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Anatomical-preservation score per tissue: ``1 - |V_test - V_ref| / V_ref``.

    Parida et al. (ISBI 2024) compare tissue volumes of the segmented input and harmonized
    images; we score one minus their relative volume difference, so 1 means the same volume
    (the ~0.99 values of UMH's Table 2 read this way). ``nan`` when the reference lacks it.
    """
    _check_shapes(reference, test)
    out = {}
    for index, tissue in enumerate(TISSUES, start=1):
        ref_volume = int((reference == index).sum())
        test_volume = int((test == index).sum())
        out[tissue] = (1.0 - abs(test_volume - ref_volume) / ref_volume
                       if ref_volume else float("nan"))
    return out


def _check_shapes(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape:
        raise DataError(
            f"label maps differ in shape: {reference.shape} vs {test.shape}; segment images "
            "on the same template grid"
        )
