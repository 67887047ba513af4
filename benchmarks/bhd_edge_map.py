"""BlindHarmonyDiff's conditioning edge map against the pipeline's ``desc-edges`` map.

Before issue 10, BlindHarmonyDiff recomputed each image's Canny map without the voxel
spacing, so its Gaussian smoothing (variance in mm²) was applied in voxels and the map it
conditioned on differed from the ``desc-edges`` file the report shows. This script measures
the overlap (Dice) with the pipeline's map, written by the ``CannyEdges`` interface from a
NIfTI file, of

* the old map: ``canny_edges_at_ratio`` on the data without spacing (the code before), and
* the new map: what the model conditions on now (``with_edges``: the Volume's ``edges``
  channel, or the pipeline's rule with the spacing when it has none; both are checked).

Images: the bundled MNI152 brain at 2 mm (offline), and the real IXI heads in
``../shared/data/ixi`` when that folder exists (brain = DLMUSE labels > 0; skipped
otherwise). Each is normalised to [0, 1] in its mask as the pipeline does (1-99 %).

Usage::

    NIPYPE_NO_ET=1 python benchmarks/bhd_edge_map.py [--ratio 0.08] [--out benchmarks/results]

Writes ``bhd_edge_map.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_harmony.data.templates import resolve_template
from bids_harmony.fileio import atomic_path, atomic_write_text
from bids_harmony.harmonizers.blindharmonydiff import with_edges
from bids_harmony.imaging.edges import canny_edges_at_ratio
from bids_harmony.interfaces.canny import CannyEdges
from bids_harmony.interfaces.normalize import percentile_normalize
from bids_harmony.volume import EDGES, Volume

IXI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def compare(name: str, data: np.ndarray, mask: np.ndarray, affine: np.ndarray, ratio: float,
            work: Path) -> dict[str, object]:
    """Dice of the old and the new conditioning map with the map CannyEdges writes."""
    normalised, _, _ = percentile_normalize(data, mask)
    spacing = tuple(float(z) for z in nib.affines.voxel_sizes(affine))
    folder = work / name
    folder.mkdir(parents=True)
    nib.Nifti1Image(normalised, affine).to_filename(folder / "preproc.nii.gz")
    nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(folder / "mask.nii.gz")
    result = CannyEdges(in_file=str(folder / "preproc.nii.gz"),
                        mask_file=str(folder / "mask.nii.gz"),
                        edge_ratio=ratio, denominator="mask").run(cwd=str(folder))
    pipeline = np.asarray(nib.load(result.outputs.out_file).dataobj)
    old, _ = canny_edges_at_ratio(normalised, ratio, mask=mask, denominator="mask")
    computed = with_edges(Volume(normalised, mask, spacing), ratio).channel(EDGES)
    given = with_edges(Volume(normalised, mask, spacing, {EDGES: pipeline}), ratio)
    return {
        "maps": (pipeline > 0, old > 0),
        "image": name, "grid": "x".join(map(str, data.shape)),
        "spacing": "x".join(f"{s:g}" for s in spacing),
        "old": dice(old, pipeline), "computed": dice(computed, pipeline),
        "given": dice(given.channel(EDGES), pipeline),
    }


def plot_maps(path: Path, pipeline: np.ndarray, old: np.ndarray, title: str) -> None:
    """The middle axial slice: the pipeline's map, the old conditioning map, where they differ."""
    from matplotlib.figure import Figure

    k = pipeline.shape[2] // 2
    panels = (("pipeline desc-edges (used now)", pipeline[:, :, k]),
              ("old conditioning map (no spacing)", old[:, :, k]),
              ("disagreement", pipeline[:, :, k] ^ old[:, :, k]))
    figure = Figure(figsize=(10, 4))
    for axis, (label, image) in zip(figure.subplots(1, 3), panels):
        axis.imshow(image.T, origin="lower", cmap="gray", interpolation="nearest")
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100, format="png")


def mni_brain(work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = resolve_template(None, 2, work, allow_download=False)
    brain = nib.load(files.brain)
    mask = np.asarray(nib.load(files.mask).dataobj) > 0
    return brain.get_fdata(dtype=np.float32) * mask, mask, brain.affine


def ixi_heads() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    heads = []
    for scan in sorted((IXI / "nifti").glob("IXI*-T1_ds.nii.gz")):
        labels = IXI / "dlmuse" / scan.name.replace("_ds.nii.gz", "_ds_DLMUSE.nii.gz")
        if not labels.is_file():
            continue
        image = nib.load(scan)
        mask = np.asarray(nib.load(labels).dataobj) > 0
        data = image.get_fdata(dtype=np.float32) * mask
        heads.append((scan.name.split("-")[0], data, mask, image.affine))
    return heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.08)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(compare("MNI152 (bundled)", *mni_brain(work), args.ratio, work))
        heads = ixi_heads() if IXI.is_dir() else []
        for name, data, mask, affine in heads:
            rows.append(compare(name, data, mask, affine, args.ratio, work))
    lines = [
        "# BlindHarmonyDiff conditioning edge map vs the pipeline's desc-edges map",
        "",
        f"{date.today()}, {platform.node()}, Python {platform.python_version()}; "
        f"edge ratio {args.ratio} of brain-mask voxels; `python benchmarks/bhd_edge_map.py`.",
        "",
        "Dice with the map the pipeline's `CannyEdges` node writes from the NIfTI file. "
        "*before*: the old recomputation without voxel spacing; *after, computed*: the "
        "fallback for images without an `edges` channel (the pipeline's rule, with "
        "spacing); *after, given*: the `edges` channel the Harmonize step now passes.",
        "",
        "| image | grid | spacing (mm) | before | after, computed | after, given |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['image']} | {r['grid']} | {r['spacing']} | {r['old']:.4f} | "
        f"{r['computed']:.4f} | {r['given']:.4f} |"
        for r in rows
    ]
    if not IXI.is_dir():
        lines += ["", f"IXI heads skipped: {IXI} does not exist."]
    elif len(rows) > 1:
        old = [r["old"] for r in rows[1:]]
        lines += ["", f"IXI ({len(old)} heads, brain = DLMUSE labels > 0, native 2 mm grid): "
                      f"before {np.mean(old):.4f} mean, {np.min(old):.4f} min."]
    args.out.mkdir(parents=True, exist_ok=True)
    mni = rows[0]
    plot_maps(args.out / "bhd_edge_map.png", *mni["maps"],
              f"MNI152 2 mm, middle axial slice: Dice {mni['old']:.3f} before, "
              f"{mni['given']:.3f} after")
    lines += ["", "![middle axial slice of the MNI152 maps](bhd_edge_map.png)"]
    atomic_write_text(args.out / "bhd_edge_map.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
