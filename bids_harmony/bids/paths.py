"""Where each derivative of an input image lives in the output dataset (BIDS names)."""

from __future__ import annotations

from pathlib import Path

from bids_harmony.bids.layout import AnatImage

#: The sequence other sequences of a session are registered through, and whose masks keep
#: the plain names sMRIPrep users expect.
REFERENCE_SUFFIX = "T1w"


def mask_desc(kind: str, image: AnatImage) -> str:
    """``desc`` label of a mask derived from ``image``: ``brain`` / ``edges`` for the T1w
    (the names sMRIPrep users expect), ``brainT2w`` / ``edgesT2w`` for other sequences, since
    a session's T1w and T2w masks would otherwise share one file name."""
    return kind if image.suffix == REFERENCE_SUFFIX else f"{kind}{image.suffix}"


def derivative_path(output_dir: Path, image: AnatImage, space: str | None, desc: str,
                    suffix: str | None = None, extension: str = ".nii.gz") -> Path:
    """Where the sink writes a derivative of ``image`` (entities keep the BIDS order)."""
    parts = [_stem(image)] + ([f"space-{space}"] if space else []) + [f"desc-{desc}"]
    name = f"{'_'.join(parts)}_{suffix or image.suffix}{extension}"
    return _anat_folder(output_dir, image) / name


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a ``.nii.gz`` derivative."""
    return path.with_name(path.name.removesuffix(".nii.gz") + ".json")


def preprocessed_paths(output_dir: Path, image: AnatImage, space: str) -> dict[str, Path]:
    """The template-space outputs a harmonizer reads: ``preproc``, ``mask`` and ``edges``."""
    return {
        "preproc": derivative_path(output_dir, image, space, "preproc"),
        "mask": derivative_path(output_dir, image, space, mask_desc("brain", image), "mask"),
        "edges": derivative_path(output_dir, image, space, mask_desc("edges", image), "mask"),
    }


def transform_path(output_dir: Path, image: AnatImage, source: str, target: str,
                   extension: str = ".h5") -> Path:
    """``from-<source>_to-<target>_mode-image_xfm``: the composite transform the sink writes
    between the image's own space (its suffix) and the template."""
    return (_anat_folder(output_dir, image)
            / f"{_stem(image)}_from-{source}_to-{target}_mode-image_xfm{extension}")


def _stem(image: AnatImage) -> str:
    """The raw image's entities before its suffix, e.g. ``sub-01_ses-02``."""
    return image.key[: -len(image.suffix) - 1]


def _anat_folder(output_dir: Path, image: AnatImage) -> Path:
    folder = output_dir / f"sub-{image.subject}"
    if image.session:
        folder = folder / f"ses-{image.session}"
    return folder / "anat"
