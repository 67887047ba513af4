"""Harmonizing one preprocessed image with a fitted model, and back to its native grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from bids_harmony.errors import DataError
from bids_harmony.harmonizers import HARMONIZERS
from bids_harmony.interfaces.harmonize import Harmonize
from bids_harmony.interfaces.registration import ApplyTransforms
from bids_harmony.workflows.plugins import node_resources


def init_harmonize_wf(
    *,
    model_dir: Path,
    method: str,
    target_site: str,
    sequence: str,
    metadata: dict[str, Any],
    native_reference: Path | None = None,
    resolution: int = 1,
    name: str = "harmonize_wf",
) -> Workflow:
    """Apply the ``method`` model in ``model_dir`` to the template-space image; with a
    ``native_reference`` (the raw image) also resample the result onto its grid.

    The model gets the image, its brain mask and the pipeline's Canny edge map, so a method
    conditioned on edges sees the ``desc-edges`` map the user sees. ``metadata`` (sources,
    site, template) joins the fields the model reports (method, target, checksum, QC) in
    the sidecar of both outputs.

    ``resolution`` (the template grid in mm) sizes the steps' memory estimates
    (:func:`~bids_harmony.workflows.plugins.node_resources`).

    Inputs: ``preproc``, ``mask``, ``edges``; with a ``native_reference`` also
    ``inverse_transforms`` and ``inverse_invert_flags`` (template to image, ANTs order).
    Outputs: ``harmonized``, ``native`` (with a ``native_reference``), ``metadata``.
    """
    workflow = Workflow(name=name)
    workflow.__desc__ = harmonization_desc(method, target_site, native=native_reference
                                           is not None)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc", "mask", "edges", "inverse_transforms", "inverse_invert_flags"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["harmonized", "native", "metadata"]),
                         name="outputnode")
    harmonize = pe.Node(Harmonize(model_dir=str(model_dir), sequence=sequence),
                        name="harmonize", **node_resources("harmonize", resolution, 1))
    sidecar = pe.Node(niu.Function(function=_merge_metadata, output_names=["meta"]),
                      name="harmonized_metadata", run_without_submitting=True)
    sidecar.inputs.static = dict(metadata)
    workflow.connect([
        (inputnode, harmonize, [("preproc", "in_file"), ("mask", "mask_file"),
                                ("edges", "edges_file")]),
        (harmonize, sidecar, [("metadata", "dynamic")]),
        (harmonize, outputnode, [("out_file", "harmonized")]),
        (sidecar, outputnode, [("meta", "metadata")]),
    ])
    if native_reference is not None:
        to_native = pe.Node(ApplyTransforms(reference_file=str(native_reference),
                                            interpolation="linear"), name="to_native",
                            **node_resources("to_native", resolution, 1))
        workflow.connect([
            (harmonize, to_native, [("out_file", "in_file")]),
            (inputnode, to_native, [("inverse_transforms", "transforms"),
                                    ("inverse_invert_flags", "invert_flags")]),
            (to_native, outputnode, [("out_file", "native")]),
        ])
    return workflow


def harmonization_desc(method: str, target_site: str, *, native: bool = False,
                       fitted_on: str = "") -> str:
    """Methods text of harmonizing with ``method`` (cited by its name, see ``citations``);
    ``fitted_on`` says what the group level trained it on."""
    if method not in HARMONIZERS:
        raise DataError(f"the model names the method '{method}', which this version of "
                        f"bids_harmony does not know; known: {', '.join(HARMONIZERS)}")
    cite = f" [@{method}]" if HARMONIZERS.methods[method].citation else ""
    target = ("a unified reference domain" if target_site == "unified"
              else f"the style of site {target_site}")
    text = (f"Preprocessed images were harmonized toward {target} with {method}{cite}, "
            "given each image with its brain mask and Canny edge map")
    if fitted_on:
        text += f"; the model was fitted on {fitted_on}"
    text += "."
    if native:
        text += (" Harmonized images were also resampled back onto each image's own grid "
                 "through the inverse transforms (linear interpolation, antspyx [@antspyx]).")
    return text + "\n\n"


def _merge_metadata(static: dict, dynamic: dict) -> dict:
    return {**static, **dynamic}
