"""Top-level workflow: one preprocessing (+ harmonization) branch per image, and derivatives.

This is the only module that reads the run configuration; the factories it calls take
plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from nipype import __version__ as nipype_version
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from bids_harmony import __version__
from bids_harmony.bids.layout import AnatImage
from bids_harmony.bids.paths import (
    REFERENCE_SUFFIX,
    derivative_path,
    mask_desc,
    preprocessed_paths,
    sidecar_path,
    transform_path,
)
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.harmonizers.base import MODEL_CARD, read_model_card
from bids_harmony.workflows.anatomical import (
    NORMALIZATION_PERCENTILES,
    OUTPUT_FIELDS,
    anat_preproc_desc,
    init_anat_preproc_wf,
)
from bids_harmony.workflows.harmonize import init_harmonize_wf
from bids_harmony.workflows.outputs import (
    init_ds_harmonized_wf,
    init_ds_masks_wf,
    init_ds_preproc_wf,
    init_ds_transforms_wf,
)


def preprocessing_outputs(config: RunConfig, image: AnatImage, template: TemplateFiles
                          ) -> list[Path]:
    """Sidecars of an image's preprocessing derivatives (template-space image, brain and edge
    masks, both transforms), each written after its data file."""
    out = config.output_dir
    return [
        *(sidecar_path(path) for path in preprocessed_paths(out, image, template.name).values()),
        transform_path(out, image, image.suffix, template.name, ".json"),
        transform_path(out, image, template.name, image.suffix, ".json"),
    ]


def expected_outputs(config: RunConfig, image: AnatImage, template: TemplateFiles,
                     harmonize: bool) -> list[Path]:
    """Sidecars written last for each derivative: all present means the image is done."""
    out = config.output_dir
    paths = preprocessing_outputs(config, image, template)
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
    preprocessed: Collection[str] = (),
) -> Workflow:
    """Build the workflow for ``images``; T2w-like images go through their session's T1w.

    Per image: ``anat_*`` (preprocessing), ``harmonize_*`` when a model is given, and one
    ``ds_*`` sub-workflow per kind of derivative. Images whose key is in ``preprocessed``
    have all their preprocessing derivatives already (:func:`preprocessing_outputs`): they
    get a ``preprocessed_*`` source of those files instead of ``anat_*`` and its sinks, so
    the participant level that applies a fitted model runs only the harmonization and needs
    neither the work directory of the first run nor a hash check of its preprocessing nodes.
    ``workflow.visit_desc()`` gives the methods text of all of them, with citation keys.
    """
    workflow = Workflow(name="bids_harmony_wf")
    workflow.base_dir = str(config.work_dir)
    workflow.__desc__ = (
        f"Results included here come from preprocessing and harmonization performed with "
        f"bids_harmony {__version__}, whose workflows are built with Nipype {nipype_version} "
        "[@nipype1; @nipype2] and write BIDS derivatives with niworkflows [@niworkflows].\n\n"
    )
    card = read_model_card(model_dir) if model_dir is not None else None
    references = {
        (im.subject, im.session): im for im in images if im.suffix == REFERENCE_SUFFIX
    }
    branches: dict[str, Workflow] = {}
    for image in sorted(images, key=lambda im: im.suffix != REFERENCE_SUFFIX):
        reference = references.get((image.subject, image.session))
        via_reference = image.suffix != REFERENCE_SUFFIX and reference is not None
        if image.key in preprocessed:
            branches[image.key] = init_preprocessed_source_wf(
                config, image, template, via_reference,
                name=_workflow_name("preprocessed", image))
            continue
        preproc_wf = init_anat_preproc_wf(
            template=template,
            registration=config.registration.value,
            skull_stripped=config.skull_stripped.value,
            edge_ratio=config.edge_ratio,
            via_reference=via_reference,
            omp_nthreads=config.omp_nthreads,
            seed=config.seed,
            name=_workflow_name("anat", image),
        )
        preproc_wf.inputs.inputnode.in_file = str(image.path)
        if via_reference:
            workflow.connect([(branches[reference.key], preproc_wf, [
                ("outputnode.brain", "inputnode.reference_brain"),
                ("outputnode.forward_transforms", "inputnode.reference_transforms"),
                ("outputnode.inverse_transforms", "inputnode.reference_inverse"),
                ("outputnode.inverse_invert_flags", "inputnode.reference_invert_flags"),
            ])])
        branches[image.key] = preproc_wf
        _connect_preprocessed_outputs(workflow, preproc_wf, config, image, template)
    if model_dir is not None and card is not None:  # after all branches: methods text order
        for image in images:
            _connect_harmonization(workflow, branches[image.key], config, image, template,
                                   model_dir, card)
    else:  # nothing to connect them to: added for their methods text
        workflow.add_nodes([branch for key, branch in branches.items() if key in preprocessed])
    return workflow


def init_preprocessed_source_wf(config: RunConfig, image: AnatImage, template: TemplateFiles,
                                via_reference: bool, name: str) -> Workflow:
    """An ``outputnode`` holding an image's preprocessing derivatives, in place of its
    ``anat_*`` workflow: ``preproc``, ``mask``, ``edges`` and, as the one composite
    ``from-<template>_to-<suffix>`` file, the inverse transforms (a T2w's already chains its
    T1w's). Resampling through that composite matches the chain of the original ANTs
    files to within 0.3 % of the intensity range (the inverted affines are stored inverted,
    in double precision); the methods text is that of the preprocessing it reads back.
    """
    workflow = Workflow(name=name)
    workflow.__desc__ = anat_preproc_desc(template, config.registration.value,
                                          config.edge_ratio, via_reference)
    outputnode = pe.Node(niu.IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")
    paths = preprocessed_paths(config.output_dir, image, template.name)
    outputnode.inputs.preproc = str(paths["preproc"])
    outputnode.inputs.mask = str(paths["mask"])
    outputnode.inputs.edges = str(paths["edges"])
    outputnode.inputs.inverse_transforms = [
        str(transform_path(config.output_dir, image, template.name, image.suffix))]
    outputnode.inputs.inverse_invert_flags = [False]
    workflow.add_nodes([outputnode])
    return workflow


def _connect_preprocessed_outputs(workflow: Workflow, preproc_wf: Workflow, config: RunConfig,
                                  image: AnatImage, template: TemplateFiles) -> None:
    """Sinks of one image's preproc image, brain and edge masks, and transforms."""
    sources = _sources(image)
    common: dict[str, Any] = {"output_dir": config.output_dir, "source_file": image.path}
    ds_preproc_wf = init_ds_preproc_wf(
        **common, space=template.name, suffix=image.suffix,
        metadata={
            "Sources": sources, "Site": image.site, "SiteSource": image.site_source,
            "Template": template.name, "TemplateOrigin": template.origin,
            "Registration": config.registration.value,
            "NormalizationPercentiles": list(NORMALIZATION_PERCENTILES),
        },
        name=_workflow_name("ds_preproc", image),
    )
    ds_masks_wf = init_ds_masks_wf(
        **common, space=template.name, sources=sources,
        brain_desc=mask_desc("brain", image), edges_desc=mask_desc("edges", image),
        name=_workflow_name("ds_masks", image),
    )
    ds_transforms_wf = init_ds_transforms_wf(
        **common, sources=sources, image_space=image.suffix, template_space=template.name,
        name=_workflow_name("ds_transforms", image),
    )
    workflow.connect([
        (preproc_wf, ds_preproc_wf, [
            ("outputnode.preproc", "inputnode.preproc"),
            ("outputnode.lower_value", "inputnode.lower_value"),
            ("outputnode.upper_value", "inputnode.upper_value"),
            ("outputnode.was_skull_stripped", "inputnode.was_skull_stripped"),
            ("outputnode.qc_measures", "inputnode.qc_measures"),
            ("outputnode.qc_flags", "inputnode.qc_flags"),
        ]),
        (preproc_wf, ds_masks_wf, [
            ("outputnode.mask", "inputnode.mask"),
            ("outputnode.edges", "inputnode.edges"),
            ("outputnode.edge_threshold", "inputnode.edge_threshold"),
            ("outputnode.edge_ratio", "inputnode.edge_ratio"),
        ]),
        (preproc_wf, ds_transforms_wf, [
            ("outputnode.forward_transforms", "inputnode.forward_transforms"),
            ("outputnode.inverse_transforms", "inputnode.inverse_transforms"),
            ("outputnode.inverse_invert_flags", "inputnode.inverse_invert_flags"),
        ]),
    ])


def _connect_harmonization(workflow: Workflow, preproc_wf: Workflow, config: RunConfig,
                           image: AnatImage, template: TemplateFiles, model_dir: Path,
                           card: dict[str, Any]) -> None:
    """Harmonize one image and write it in template space (and on its native grid)."""
    harmonize_wf = init_harmonize_wf(
        model_dir=model_dir, method=card["method"], target_site=card["target_site"],
        sequence=image.suffix,
        metadata={"Sources": _sources(image), "Site": image.site, "Template": template.name,
                  "SkullStripped": True,
                  "ModelCard": _model_card_uri(model_dir, config.output_dir)},
        native_reference=image.path if config.native_output else None,
        resolution=template.resolution,
        name=_workflow_name("harmonize", image),
    )
    ds_harmonized_wf = init_ds_harmonized_wf(
        output_dir=config.output_dir, source_file=image.path, space=template.name,
        suffix=image.suffix, name=_workflow_name("ds_harmonized", image),
    )
    workflow.connect([
        (preproc_wf, harmonize_wf, [
            ("outputnode.preproc", "inputnode.preproc"),
            ("outputnode.mask", "inputnode.mask"),
            ("outputnode.edges", "inputnode.edges"),
            ("outputnode.inverse_transforms", "inputnode.inverse_transforms"),
            ("outputnode.inverse_invert_flags", "inputnode.inverse_invert_flags"),
        ]),
        (harmonize_wf, ds_harmonized_wf, [
            ("outputnode.harmonized", "inputnode.harmonized"),
            ("outputnode.metadata", "inputnode.metadata"),
        ]),
    ])
    if config.native_output:
        ds_native_wf = init_ds_harmonized_wf(
            output_dir=config.output_dir, source_file=image.path, space=None,
            suffix=image.suffix, name=_workflow_name("ds_native", image),
        )
        workflow.connect([(harmonize_wf, ds_native_wf, [
            ("outputnode.native", "inputnode.harmonized"),
            ("outputnode.metadata", "inputnode.metadata"),
        ])])


def _workflow_name(kind: str, image: AnatImage) -> str:
    """``<kind>_<image key>`` with only the characters Nipype accepts in a name."""
    return f"{kind}_" + "".join(c if c.isalnum() else "_" for c in image.key)


def _sources(image: AnatImage) -> list[str]:
    """The BIDS URI of the raw image, the ``Sources`` of every derivative."""
    return [f"bids:raw:{image.path.relative_to(_bids_root(image)).as_posix()}"]


def _model_card_uri(model_dir: Path, output_dir: Path) -> str:
    """The model card as a BIDS URI into this derivatives dataset (``bids::models/...``), so
    the sidecars stay true when the dataset moves; a ``--model`` from elsewhere by its path."""
    card = (model_dir / MODEL_CARD).resolve()
    try:
        return f"bids::{card.relative_to(output_dir.resolve()).as_posix()}"
    except ValueError:
        return str(card)


def _bids_root(image: AnatImage) -> Path:
    """The dataset root: the parent of the ``sub-*`` folder."""
    return next(p.parent for p in image.path.parents if p.name == f"sub-{image.subject}")
