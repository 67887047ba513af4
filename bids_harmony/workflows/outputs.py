"""Writing derivatives: one ``init_ds_*_wf`` factory per output kind, as sMRIPrep's.

Each sub-workflow takes what it writes through its ``inputnode`` and knows the BIDS entities
and sidecar fields of its files. Every sink always runs (it is cheap), so a derivative moved
away or deleted is rewritten from the work directory's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from bids_harmony.interfaces.datasink import AtomicDerivativesDataSink
from bids_harmony.interfaces.transforms import CompositeTransform


def init_ds_preproc_wf(
    *,
    output_dir: Path,
    source_file: Path,
    space: str,
    suffix: str,
    metadata: dict[str, Any],
    name: str = "ds_preproc_wf",
) -> Workflow:
    """``space-<template>_desc-preproc_<suffix>``: the normalised brain; its sidecar adds the
    intensities the 1st and 99th percentiles had, whether the input was skull-stripped, and
    the preprocessing QC (``PreprocessingQC`` measures, ``QCFlags``).

    Inputs: ``preproc``, ``lower_value``, ``upper_value``, ``was_skull_stripped``,
    ``qc_measures``, ``qc_flags``.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "lower_value", "upper_value", "was_skull_stripped", "qc_measures",
                "qc_flags"]),
        name="inputnode")
    sidecar = pe.Node(niu.Function(function=_preproc_metadata, output_names=["meta"]),
                      name="preproc_metadata", run_without_submitting=True)
    sidecar.inputs.static = dict(metadata)
    ds_preproc = _sink("ds_preproc", output_dir, source_file, space=space, desc="preproc",
                       suffix=suffix)
    workflow.connect([
        (inputnode, sidecar, [("lower_value", "lower"), ("upper_value", "upper"),
                              ("was_skull_stripped", "was_skull_stripped"),
                              ("qc_measures", "qc_measures"), ("qc_flags", "qc_flags")]),
        (inputnode, ds_preproc, [("preproc", "in_file")]),
        (sidecar, ds_preproc, [("meta", "meta_dict")]),
    ])
    return workflow


def init_ds_masks_wf(
    *,
    output_dir: Path,
    source_file: Path,
    space: str,
    sources: list[str],
    brain_desc: str,
    edges_desc: str,
    name: str = "ds_masks_wf",
) -> Workflow:
    """``desc-<brain_desc>_mask`` (the brain) and ``desc-<edges_desc>_mask`` (the Canny edge
    map, with the threshold found and the edge ratio reached in its sidecar).

    Inputs: ``mask``, ``edges``, ``edge_threshold``, ``edge_ratio``.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["mask", "edges", "edge_threshold", "edge_ratio"]), name="inputnode")
    ds_mask = _sink("ds_mask", output_dir, source_file, space=space, desc=brain_desc,
                    suffix="mask", meta_dict={"Sources": sources, "Type": "Brain"})
    edges_metadata = pe.Node(niu.Function(function=_edges_metadata, output_names=["meta"]),
                             name="edges_metadata", run_without_submitting=True)
    edges_metadata.inputs.sources = sources
    ds_edges = _sink("ds_edges", output_dir, source_file, space=space, desc=edges_desc,
                     suffix="mask")
    workflow.connect([
        (inputnode, ds_mask, [("mask", "in_file")]),
        (inputnode, edges_metadata, [("edge_threshold", "threshold"), ("edge_ratio", "ratio")]),
        (inputnode, ds_edges, [("edges", "in_file")]),
        (edges_metadata, ds_edges, [("meta", "meta_dict")]),
    ])
    return workflow


def init_ds_transforms_wf(
    *,
    output_dir: Path,
    source_file: Path,
    sources: list[str],
    image_space: str,
    template_space: str,
    name: str = "ds_transforms_wf",
) -> Workflow:
    """``from-<image>_to-<template>_mode-image_xfm.h5`` and its inverse, each chain of ANTs
    transforms stored as one ITK composite file.

    Inputs: ``forward_transforms``, ``inverse_transforms``, ``inverse_invert_flags``.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["forward_transforms", "inverse_transforms", "inverse_invert_flags"]),
        name="inputnode")
    forward = pe.Node(CompositeTransform(), name="forward_composite")
    inverse = pe.Node(CompositeTransform(), name="inverse_composite")
    common = {"suffix": "xfm", "extension": ".h5", "mode": "image",
              "meta_dict": {"Sources": sources}}
    # "from" is a Python keyword, hence the dictionaries
    ds_forward = _sink("ds_forward", output_dir, source_file, **common,
                       **{"from": image_space, "to": template_space})
    ds_inverse = _sink("ds_inverse", output_dir, source_file, **common,
                       **{"from": template_space, "to": image_space})
    workflow.connect([
        (inputnode, forward, [("forward_transforms", "transforms")]),
        (inputnode, inverse, [("inverse_transforms", "transforms"),
                              ("inverse_invert_flags", "invert_flags")]),
        (forward, ds_forward, [("out_file", "in_file")]),
        (inverse, ds_inverse, [("out_file", "in_file")]),
    ])
    return workflow


def init_ds_harmonized_wf(
    *,
    output_dir: Path,
    source_file: Path,
    space: str | None,
    suffix: str,
    name: str = "ds_harmonized_wf",
) -> Workflow:
    """``[space-<template>_]desc-harmonized_<suffix>`` with the harmonizer's sidecar (method,
    target site, model checksum, QC); ``space=None`` writes the native-grid image.

    Inputs: ``harmonized``, ``metadata``.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["harmonized", "metadata"]),
                        name="inputnode")
    entities = {"space": space} if space else {}
    ds_harmonized = _sink("ds_harmonized", output_dir, source_file, desc="harmonized",
                          suffix=suffix, **entities)
    workflow.connect([
        (inputnode, ds_harmonized, [("harmonized", "in_file"), ("metadata", "meta_dict")]),
    ])
    return workflow


def _sink(name: str, output_dir: Path, source_file: Path, **inputs: Any) -> pe.Node:
    """A derivatives sink that always runs, so moved or deleted outputs are rewritten."""
    return pe.Node(
        AtomicDerivativesDataSink(base_directory=str(output_dir), source_file=str(source_file),
                                  **inputs),
        name=name, run_without_submitting=True, overwrite=True,
    )


def _preproc_metadata(static: dict, lower: float, upper: float, was_skull_stripped: bool,
                      qc_measures: dict, qc_flags: list) -> dict:
    meta = dict(static)
    meta["PreprocessingQC"] = {key: float(value) for key, value in qc_measures.items()}
    meta["QCFlags"] = [qc_flags] if isinstance(qc_flags, str) else list(qc_flags or [])
    meta["NormalizationValues"] = [float(lower), float(upper)]
    meta["SkullStripped"] = True  # the derivative is brain-only whatever the input was
    meta["InputSkullStripped"] = bool(was_skull_stripped)
    return meta


def _edges_metadata(sources: list, threshold: float, ratio: float) -> dict:
    return {"Sources": sources, "Type": "ROI",
            "Description": "3D Canny edge map of the preprocessed image (1 = edge voxel)",
            "EdgeThreshold": float(threshold),
            "EdgeRatio": float(ratio), "Method": "3D Canny (SimpleITK), per-image threshold"}
