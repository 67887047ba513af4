"""How much site information is left in a set of images: features, classifiers, distances.

The papers measure the site effect with deep ResNet features fed to a classifier. No
pretrained weights are available offline, so bids_harmony uses hand-made features a scanner
leaves its mark on: intensity quantiles (contrast, gamma curve), gradient-magnitude and
local-standard-deviation quantiles (blur, noise), all inside the brain mask and, when a tissue
segmentation is given, per tissue class. A lower balanced accuracy after harmonization means
less site information; chance level is ``1 / number of sites``.

Between sites it also gives the two measures of paper 002: the Wasserstein distance between
sites' mean brain-intensity distributions (its Fig. 5 heatmaps) and the SSIM luminance term
between sites' mean images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from bids_harmony.errors import DataError
from bids_harmony.volume import Volume
from bids_harmony.metrics.similarity import ssim_components, wasserstein

INTENSITY_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
TEXTURE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Gaussian derivative scale of the gradient magnitude, in voxels: one voxel keeps the noise
# and blur a scanner adds visible without being dominated by single-voxel spikes.
GRADIENT_SIGMA = 1.0
# Edge length of the cube over which the local standard deviation is taken (3 voxels = the
# 26-neighbourhood), the smallest window that still measures texture.
LOCAL_WINDOW = 3
# Quantiles kept per image for the site distributions: enough to reproduce the Wasserstein
# distance of the full voxel sets to ~1e-3 of the intensity range.
DISTRIBUTION_QUANTILES = np.linspace(0.0, 1.0, 1001)
MAX_FOLDS = 5
DEFAULT_REPEATS = 10


def image_features(volume: Volume, tissue_labels: np.ndarray | None = None,
                   tissue_names: Sequence[str] = ()) -> dict[str, float]:
    """Site-sensitive features of one image, named ``<measure>_<region>_q<percent>``.

    ``tissue_labels`` holds 1..N for ``tissue_names`` (0 = outside); each tissue adds its
    intensity median and IQR and its median gradient magnitude.
    """
    box = _brain_box(volume.mask)
    mask = volume.mask[box].astype(bool)
    data = volume.data[box].astype(np.float64)
    if tissue_labels is not None:
        tissue_labels = tissue_labels[box]
    gradient = ndimage.gaussian_gradient_magnitude(data, sigma=GRADIENT_SIGMA)
    local_mean = ndimage.uniform_filter(data, size=LOCAL_WINDOW)
    local_sq = ndimage.uniform_filter(data * data, size=LOCAL_WINDOW)
    local_std = np.sqrt(np.maximum(local_sq - local_mean**2, 0.0))
    # Texture only where the whole window is brain, so the brain edge does not dominate it.
    interior = ndimage.binary_erosion(mask, iterations=LOCAL_WINDOW // 2 + 1)
    if not interior.any():
        interior = mask
    features: dict[str, float] = {}
    for q, value in zip(INTENSITY_QUANTILES, np.quantile(data[mask], INTENSITY_QUANTILES)):
        features[f"intensity_brain_q{round(q * 100):02d}"] = float(value)
    for name, texture in (("gradient", gradient), ("localstd", local_std)):
        values = np.quantile(texture[interior], TEXTURE_QUANTILES)
        for q, value in zip(TEXTURE_QUANTILES, values):
            features[f"{name}_brain_q{round(q * 100):02d}"] = float(value)
    if tissue_labels is not None:
        for index, tissue in enumerate(tissue_names, start=1):
            region = (tissue_labels == index) & mask
            if not region.any():
                raise DataError(f"tissue {tissue} is empty in the segmentation; check the mask")
            q25, q50, q75 = np.quantile(data[region], (0.25, 0.5, 0.75))
            features[f"intensity_{tissue}_q50"] = float(q50)
            features[f"intensity_{tissue}_iqr"] = float(q75 - q25)
            features[f"gradient_{tissue}_q50"] = float(np.median(gradient[region]))
    return features


@dataclass(frozen=True)
class CrossValidation:
    """How a cross-validated score was obtained, so small samples are reported honestly."""

    n_samples: int
    n_splits: int
    n_repeats: int
    note: str


@dataclass(frozen=True)
class SiteClassification:
    """Cross-validated site classification; lower is better after harmonization."""

    balanced_accuracy: float
    balanced_accuracy_sd: float
    macro_f1: float
    macro_f1_sd: float
    chance_level: float
    n_sites: int
    validation: CrossValidation

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class BrainAge:
    """Cross-validated brain-age error; ``baseline_mae`` predicts every age as the mean."""

    mae: float
    mae_sd: float
    baseline_mae: float
    validation: CrossValidation

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def classify_sites(features: np.ndarray, sites: Sequence[str],
                   n_repeats: int = DEFAULT_REPEATS, seed: int = 0) -> SiteClassification:
    """Logistic regression on standardized features, repeated stratified K-fold.

    K = min(5, images of the smallest site), so every test fold holds every site; with fewer
    than 5 images per site the note says so. Logistic regression (L2, C=1) rather than a
    random forest: with tens of images and ~30 features it has fewer knobs to overfit and
    is deterministic given the folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(sites)
    names, counts = np.unique(labels, return_counts=True)
    if len(names) < 2 or counts.min() < 2:
        raise DataError(
            f"site classification needs at least 2 sites with 2 images each, got "
            f"{dict(zip(names.tolist(), counts.tolist()))}; add images or skip this measure"
        )
    n_splits = int(min(MAX_FOLDS, counts.min()))
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats,
                                       random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_validate(model, np.asarray(features, dtype=np.float64), labels,
                            cv=splitter, scoring=("balanced_accuracy", "f1_macro"))
    return SiteClassification(
        balanced_accuracy=float(np.mean(scores["test_balanced_accuracy"])),
        balanced_accuracy_sd=float(np.std(scores["test_balanced_accuracy"])),
        macro_f1=float(np.mean(scores["test_f1_macro"])),
        macro_f1_sd=float(np.std(scores["test_f1_macro"])),
        chance_level=1.0 / len(names),
        n_sites=len(names),
        validation=CrossValidation(
            n_samples=len(labels), n_splits=n_splits, n_repeats=n_repeats,
            note=_fold_note(n_splits, int(counts.min()), "site"),
        ),
    )


def predict_brain_age(features: np.ndarray, ages: Sequence[float], subjects: Sequence[str],
                      n_repeats: int = DEFAULT_REPEATS, seed: int = 0) -> BrainAge:
    """Ridge regression (alpha=1 on standardized features) of age, cross-validated MAE.

    Folds split by subject (a traveling subject's scans share one age, so splitting by image
    would leak the answer); K = min(5, number of subjects), shuffled ``n_repeats`` times.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(ages, dtype=np.float64)
    groups = np.asarray(subjects)
    n_subjects = len(np.unique(groups))
    if n_subjects < 3:
        raise DataError(
            f"brain-age regression needs at least 3 participants with an age, got {n_subjects}; "
            "fill the age column of participants.tsv"
        )
    n_splits = min(MAX_FOLDS, n_subjects)
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    errors, baseline = [], []
    for repeat in range(n_repeats):
        splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + repeat)
        for train, test in splitter.split(x, y, groups):
            prediction = model.fit(x[train], y[train]).predict(x[test])
            errors.append(np.mean(np.abs(prediction - y[test])))
            baseline.append(np.mean(np.abs(y[train].mean() - y[test])))
    return BrainAge(
        mae=float(np.mean(errors)), mae_sd=float(np.std(errors)),
        baseline_mae=float(np.mean(baseline)),
        validation=CrossValidation(
            n_samples=len(y), n_splits=n_splits, n_repeats=n_repeats,
            note=_fold_note(n_splits, n_subjects, "participant"),
        ),
    )


def site_wasserstein_matrix(brain_values: Mapping[str, Sequence[np.ndarray]]
                            ) -> tuple[list[str], np.ndarray]:
    """Wasserstein distance between every pair of sites' mean brain-intensity distributions.

    A site's distribution is the equal-weight mixture of its images' distributions (each image
    summarised by 1001 quantiles, so large brains do not outweigh small ones), which is our
    reading of paper 002's "mean voxel intensity distribution" per scanner-site.
    """
    sites = sorted(brain_values)
    pooled = {
        site: np.concatenate([np.quantile(values, DISTRIBUTION_QUANTILES)
                              for values in brain_values[site]])
        for site in sites
    }
    matrix = np.zeros((len(sites), len(sites)))
    for i, first in enumerate(sites):
        for j in range(i + 1, len(sites)):
            matrix[i, j] = matrix[j, i] = wasserstein(pooled[first], pooled[sites[j]])
    return sites, matrix


def site_luminance_ssim(site_images: Mapping[str, np.ndarray], mask: np.ndarray
                        ) -> tuple[list[str], np.ndarray]:
    """SSIM luminance term between every pair of sites' mean images, inside ``mask``.

    Paper 002 compares all pairs of test images; on template-space images the mean image of
    each site carries the same luminance information with one comparison per site pair.
    """
    sites = sorted(site_images)
    matrix = np.ones((len(sites), len(sites)))
    for i, first in enumerate(sites):
        for j in range(i + 1, len(sites)):
            value = ssim_components(site_images[first], site_images[sites[j]], mask)["luminance"]
            matrix[i, j] = matrix[j, i] = value
    return sites, matrix


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """The values above the diagonal: one per site pair."""
    return matrix[np.triu_indices_from(matrix, k=1)]


def _brain_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the brain plus a margin wider than the filters: same features, half
    the voxels to filter."""
    objects = ndimage.find_objects(mask.astype(np.uint8))
    if not objects or objects[0] is None:
        raise DataError("the brain mask selects no voxel; check the desc-brain mask")
    margin = LOCAL_WINDOW + int(np.ceil(4 * GRADIENT_SIGMA))
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                 for s, n in zip(objects[0], mask.shape))


def _fold_note(n_splits: int, smallest: int, unit: str) -> str:
    if n_splits < MAX_FOLDS:
        return (f"{n_splits}-fold instead of {MAX_FOLDS}-fold: the smallest group has only "
                f"{smallest} {unit}(s); scores on so few images are coarse")
    return f"{n_splits}-fold"
