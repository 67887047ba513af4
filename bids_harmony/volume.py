"""The image every harmonizer and metric works on: a brain on the template grid.

A :class:`Volume` carries what the pipeline knows about one preprocessed image: its
normalised intensities, brain mask, voxel spacing and any extra channels the pipeline
derived from it (today the 3D Canny ``edges`` map, the ``desc-edges`` file the report
shows), so a method conditions on the same maps the user sees instead of recomputing them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from bids_harmony.errors import DataError, InputMissingError

#: The channel name of the pipeline's 3D Canny edge map.
EDGES = "edges"


@dataclass(frozen=True)
class Volume:
    """A brain image in template space with its brain mask.

    ``data`` is float32 and normalised to [0, 1] inside ``mask`` (1st-99th percentile
    min-max); voxels outside the mask are 0. ``spacing`` is the voxel size in mm.
    ``channels`` holds extra maps on the same grid, by name (e.g. :data:`EDGES`).
    """

    data: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.shape != self.mask.shape:
            raise DataError(
                f"image shape {self.data.shape} differs from mask shape {self.mask.shape}; "
                "resample both to the same template grid"
            )
        for name, channel in self.channels.items():
            if channel.shape != self.data.shape:
                raise DataError(
                    f"channel '{name}' has shape {channel.shape}, the image {self.data.shape}; "
                    "resample it to the same template grid"
                )
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise DataError(f"voxel spacing must be three positive sizes, got {self.spacing}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "channels", MappingProxyType(dict(self.channels)))

    @property
    def brain(self) -> np.ndarray:
        """Intensities inside the mask, as a flat float array."""
        return self.data[self.mask.astype(bool)]

    def channel(self, name: str) -> np.ndarray:
        """The extra map ``name``, with an error that says where it comes from."""
        if name not in self.channels:
            raise DataError(
                f"this image has no '{name}' map (it has: {', '.join(self.channels) or 'none'}); "
                "harmonize the pipeline's desc-preproc outputs, which come with their maps"
            )
        return self.channels[name]


def load_volume(
    data_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    channel_paths: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Volume:
    """Read a preprocessed image, its mask and its extra maps from NIfTI files."""
    import nibabel as nb

    for path in (data_path, mask_path, *(channel_paths or {}).values()):
        if not os.path.isfile(path):
            raise InputMissingError(
                f"{path} is missing; run the participant level on that subject first"
            )
    image = nb.load(data_path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(mask_path).dataobj) > 0
    channels = {
        name: np.asarray(nb.load(path).dataobj, dtype=np.float32)
        for name, path in (channel_paths or {}).items()
    }
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(data, mask, spacing, channels)  # type: ignore[arg-type]
