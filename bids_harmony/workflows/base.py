"""Top-level workflow: one preprocessing (+ harmonization) branch per image, and derivatives.

This is the only module that reads the run configuration; the factories it calls take
plain keyword arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_harmony.bids.layout import AnatImage
from bids_harmony.bids.paths import REFERENCE_SUFFIX, derivative_path, mask_desc
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.interfaces.datasink import AtomicDerivativesDataSink
from bids_harmony.interfaces.harmonize import Harmonize
from bids_harmony.interfaces.registration import ApplyTransforms
from bids_harmony.interfaces.transforms import CompositeTransform
from bids_harmony.workflows.anatomical import init_anat_preproc_wf

LOGGER = logging.getLogger("bids_harmony")


def expected_outputs(config: RunConfig, image: AnatImage, template: TemplateFiles,
                     harmonize: bool) -> list[Path]:
    """Sidecars written last for each derivative: all present means the image is done."""
    out = config.output_dir
    paths = [
        derivative_path(out, image, template.name, "preproc", extension=".json"),
        derivative_path(out, image, template.name, mask_desc("brain", image), "mask", ".json"),
        derivative_path(out, image, template.name, mask_desc("edges", image), "mask", ".json"),
    ]
    if harmonize:
        paths.append(derivative_path(out, image, template.name, "harmonized", extension=".json"))
        if config.native_output:
            paths.append(derivative_path(out, image, None, "harmonized", extension=".json"))
    return paths


def init_bids_harmony_wf(
    config: RunConfig,
    images: Sequence[AnatImage],
    template: TemplateFiles,
    model_dir: Path | None,
) -> pe.Workflow:
    """Build the workflow for ``images``; T2w-like images go through their session's T1w."""
    workflow = pe.Workflow(name="bids_harmony_wf")
    workflow.base_dir = str(config.work_dir)
    references = {
        (im.subject, im.session): im for im in images if im.suffix == REFERENCE_SUFFIX
    }
    branches: dict[str, pe.Workflow] = {}
    for image in sorted(images, key=lambda im: im.suffix != REFERENCE_SUFFIX):
        reference = references.get((image.subject, image.session))
        via_reference = image.suffix != REFERENCE_SUFFIX and reference is not None
        preproc_wf = init_anat_preproc_wf(
            template=template,
            registration=config.registration.value,
            skull_stripped=config.skull_stripped.value,
            edge_ratio=config.edge_ratio,
            via_reference=via_reference,
            omp_nthreads=config.omp_nthreads,
            seed=config.seed,
            name=_branch_name(image),
        )
        preproc_wf.inputs.inputnode.in_file = str(image.path)
        if via_reference:
            ref_wf = branches[reference.key]
            workflow.connect([(ref_wf, preproc_wf, [
                ("outputnode.brain", "inputnode.reference_brain"),
                ("outputnode.forward_transforms", "inputnode.reference_transforms"),
                ("outputnode.inverse_transforms", "inputnode.reference_inverse"),
                ("outputnode.inverse_invert_flags", "inputnode.reference_invert_flags"),
            ])])
        branches[image.key] = preproc_wf
        _connect_derivatives(workflow, preproc_wf, config, image, template, model_dir)
    return workflow


def _connect_derivatives(
    workflow: pe.Workflow,
    preproc_wf: pe.Workflow,
    config: RunConfig,
    image: AnatImage,
    template: TemplateFiles,
    model_dir: Path | None,
) -> None:
    """Sinks for one image: preproc, mask, edges, transforms, and harmonized outputs."""
    prefix = preproc_wf.name
    source = str(image.path)
    sources = [f"bids:raw:{image.path.relative_to(_bids_root(image)).as_posix()}"]
    common = {"base_directory": str(config.output_dir), "source_file": source}

    preproc_meta = pe.Node(
        niu.Function(function=_preproc_metadata, output_names=["meta"]),
        name=f"{prefix}_preproc_meta", run_without_submitting=True,
    )
    preproc_meta.inputs.static = {
        "Sources": sources, "Site": image.site, "SiteSource": image.site_source,
        "Template": template.name, "TemplateOrigin": template.origin,
        "Registration": config.registration.value,
        "NormalizationPercentiles": [1.0, 99.0],
    }
    ds_preproc = _sink(f"{prefix}_ds_preproc", space=template.name, desc="preproc",
                       suffix=image.suffix, **common)
    ds_mask = _sink(f"{prefix}_ds_mask", space=template.name, desc=mask_desc("brain", image),
                    suffix="mask",
                    meta_dict={"Sources": sources, "Type": "Brain"}, **common)
    edge_meta = pe.Node(niu.Function(function=_edge_metadata, output_names=["meta"]),
                        name=f"{prefix}_edge_meta", run_without_submitting=True)
    edge_meta.inputs.sources = sources
    ds_edges = _sink(f"{prefix}_ds_edges", space=template.name, desc=mask_desc("edges", image),
                     suffix="mask",
                     **common)
    to_h5 = pe.Node(CompositeTransform(), name=f"{prefix}_fwd_xfm")
    ds_xfm = _sink(f"{prefix}_ds_xfm", suffix="xfm", extension=".h5", mode="image",
                   to=template.name, meta_dict={"Sources": sources}, **common)
    setattr(ds_xfm.inputs, "from", image.suffix)
    to_h5_inv = pe.Node(CompositeTransform(), name=f"{prefix}_inv_xfm")
    ds_xfm_inv = _sink(f"{prefix}_ds_xfm_inv", suffix="xfm", extension=".h5", mode="image",
                       meta_dict={"Sources": sources}, **common)
    setattr(ds_xfm_inv.inputs, "from", template.name)
    setattr(ds_xfm_inv.inputs, "to", image.suffix)

    workflow.connect([
        (preproc_wf, preproc_meta, [("outputnode.lower_value", "lower"),
                                    ("outputnode.upper_value", "upper"),
                                    ("outputnode.was_skull_stripped", "was_skull_stripped")]),
        (preproc_wf, ds_preproc, [("outputnode.preproc", "in_file")]),
        (preproc_meta, ds_preproc, [("meta", "meta_dict")]),
        (preproc_wf, ds_mask, [("outputnode.mask", "in_file")]),
        (preproc_wf, edge_meta, [("outputnode.edge_threshold", "threshold"),
                                 ("outputnode.edge_ratio", "ratio")]),
        (preproc_wf, ds_edges, [("outputnode.edges", "in_file")]),
        (edge_meta, ds_edges, [("meta", "meta_dict")]),
        (preproc_wf, to_h5, [("outputnode.forward_transforms", "transforms")]),
        (to_h5, ds_xfm, [("out_file", "in_file")]),
        (preproc_wf, to_h5_inv, [("outputnode.inverse_transforms", "transforms"),
                                 ("outputnode.inverse_invert_flags", "invert_flags")]),
        (to_h5_inv, ds_xfm_inv, [("out_file", "in_file")]),
    ])
    if model_dir is None:
        return

    harmonize = pe.Node(Harmonize(model_dir=str(model_dir), sequence=image.suffix),
                        name=f"{prefix}_harmonize")
    harmonized_meta = pe.Node(
        niu.Function(function=_merge_metadata, output_names=["meta"]),
        name=f"{prefix}_harmonized_meta", run_without_submitting=True,
    )
    harmonized_meta.inputs.static = {"Sources": sources, "Site": image.site,
                                     "Template": template.name, "SkullStripped": True}
    ds_harmonized = _sink(f"{prefix}_ds_harmonized", space=template.name, desc="harmonized",
                          suffix=image.suffix, **common)
    workflow.connect([
        (preproc_wf, harmonize, [("outputnode.preproc", "in_file"),
                                 ("outputnode.mask", "mask_file"),
                                 ("outputnode.edges", "edges_file")]),
        (harmonize, harmonized_meta, [("metadata", "dynamic")]),
        (harmonize, ds_harmonized, [("out_file", "in_file")]),
        (harmonized_meta, ds_harmonized, [("meta", "meta_dict")]),
    ])
    if config.native_output:
        to_native = pe.Node(ApplyTransforms(reference_file=source, interpolation="linear"),
                            name=f"{prefix}_to_native")
        ds_native = _sink(f"{prefix}_ds_native", desc="harmonized", suffix=image.suffix,
                          **common)
        workflow.connect([
            (harmonize, to_native, [("out_file", "in_file")]),
            (preproc_wf, to_native, [("outputnode.inverse_transforms", "transforms"),
                                     ("outputnode.inverse_invert_flags", "invert_flags")]),
            (to_native, ds_native, [("out_file", "in_file")]),
            (harmonized_meta, ds_native, [("meta", "meta_dict")]),
        ])


def _sink(name: str, **inputs: object) -> pe.Node:
    """A derivatives sink node that always runs (cheap), so moved outputs are rewritten."""
    return pe.Node(AtomicDerivativesDataSink(**inputs), name=name, run_without_submitting=True,
                   overwrite=True)


def _branch_name(image: AnatImage) -> str:
    return "anat_" + "".join(c if c.isalnum() else "_" for c in image.key)


def _bids_root(image: AnatImage) -> Path:
    """The dataset root: the parent of the ``sub-*`` folder."""
    return next(p.parent for p in image.path.parents if p.name == f"sub-{image.subject}")


def _preproc_metadata(static: dict, lower: float, upper: float,
                      was_skull_stripped: bool) -> dict:
    meta = dict(static)
    meta["NormalizationValues"] = [float(lower), float(upper)]
    meta["SkullStripped"] = True  # the derivative is brain-only whatever the input was
    meta["InputSkullStripped"] = bool(was_skull_stripped)
    return meta


def _edge_metadata(sources: list, threshold: float, ratio: float) -> dict:
    return {"Sources": sources, "Type": "ROI",
            "Description": "3D Canny edge map of the preprocessed image (1 = edge voxel)",
            "EdgeThreshold": float(threshold),
            "EdgeRatio": float(ratio), "Method": "3D Canny (SimpleITK), per-image threshold"}


def _merge_metadata(static: dict, dynamic: dict) -> dict:
    return {**static, **dynamic}
