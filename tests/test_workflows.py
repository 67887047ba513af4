"""The workflow graph built from a real BIDS dataset (not run: the end-to-end tests run it).

Connections are followed through the sub-workflows' ``inputnode`` / ``outputnode`` to the
node that really produces a value, so a test says where each input comes from.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_harmony.bids.layout import AnatImage, build_layout, collect_images
from bids_harmony.config import AnalysisLevel, RunConfig
from bids_harmony.data.templates import resolve_template
from bids_harmony.harmonizers import HARMONIZERS
from bids_harmony.interfaces.datasink import AtomicDerivativesDataSink
from bids_harmony.workflows.base import init_bids_harmony_wf
from bids_harmony.workflows.citations import compose_methods

TOP = "bids_harmony_wf"


def _config(bids: Path, out: Path, **overrides: object) -> RunConfig:
    values: dict[str, object] = dict(
        bids_dir=bids, output_dir=out, analysis_level=AnalysisLevel.PARTICIPANT,
        work_dir=out / "work", run_id="test", resolution=2,
    )
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


def _label(image: AnatImage) -> str:
    return image.key.replace("-", "_")


class _Graph:
    """The flat graph with lookups by ``<sub-workflow>.<node>`` name."""

    def __init__(self, workflow: pe.Workflow) -> None:
        self.graph: nx.DiGraph = workflow._create_flat_graph()
        self.nodes = {node.fullname: node for node in self.graph.nodes()}

    def node(self, name: str) -> pe.Node:
        return self.nodes[f"{TOP}.{name}"]

    def source(self, name: str, field: str) -> tuple[str, str]:
        """The producing node (short name) and output field that feed ``name.field``."""
        return self._source(self.node(name), field)

    def _source(self, node: pe.Node, field: str) -> tuple[str, str]:
        for upstream, _, data in self.graph.in_edges(node, data=True):
            for output, target in data["connect"]:
                if target != field:
                    continue
                if isinstance(upstream.interface, IdentityInterface):
                    return self._source(upstream, output)
                return upstream.fullname.removeprefix(f"{TOP}."), output
        raise AssertionError(f"nothing feeds {node.fullname}.{field}")


@pytest.fixture
def session_images(demo_bids: Path, tmp_path: Path) -> list[AnatImage]:
    return collect_images(build_layout(demo_bids, tmp_path), participants=["01"],
                          sessions=["01"])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A real histmatch model fitted on T1w and T2w phantoms, target SiteX."""
    from phantoms import ellipsoid_phantom

    volumes = [ellipsoid_phantom((24, 24, 20), subject=k) for k in range(8)]
    harmonizer = HARMONIZERS["histmatch"]().fit(
        volumes, ["SiteX", "SiteY"] * 4, ["T1w"] * 4 + ["T2w"] * 4, target="SiteX")
    return harmonizer.save(tmp_path / "models" / "histmatch_SiteX")


def test_t2w_registers_through_its_session_t1w(demo_bids: Path, tmp_path: Path,
                                               session_images: list[AnatImage]) -> None:
    template = resolve_template(None, 2, tmp_path)
    workflow = init_bids_harmony_wf(_config(demo_bids, tmp_path), session_images, template,
                                    model_dir=None)
    t1w = next(im for im in session_images if im.suffix == "T1w")
    t2w = next(im for im in session_images if im.suffix == "T2w")
    graph = _Graph(workflow)
    t1w_anat, t2w_anat = f"anat_{_label(t1w)}", f"anat_{_label(t2w)}"
    assert graph.node(f"{t1w_anat}.register").inputs.transform_type == "affine"
    assert graph.node(f"{t1w_anat}.register").inputs.fixed_file == str(template.brain)
    assert graph.node(f"{t2w_anat}.register").inputs.transform_type == "rigid"
    assert graph.source(f"{t2w_anat}.register", "fixed_file") == (
        f"{t1w_anat}.skullstrip", "out_file")
    for field, t1w_output in (("reference_forward", "forward"),
                              ("reference_inverse", "inverse"),
                              ("reference_invert_flags", "invert_flags")):
        assert graph.source(f"{t2w_anat}.chain_transforms", field) == (
            f"{t1w_anat}.chain_transforms", t1w_output)
    assert not any("harmonize" in name for name in graph.nodes)


def test_derivatives_come_from_the_preprocessing(demo_bids: Path, tmp_path: Path,
                                                 session_images: list[AnatImage]) -> None:
    template = resolve_template(None, 2, tmp_path)
    workflow = init_bids_harmony_wf(_config(demo_bids, tmp_path), session_images, template,
                                    model_dir=None)
    graph = _Graph(workflow)
    t2w = next(im for im in session_images if im.suffix == "T2w")
    label = _label(t2w)
    anat = f"anat_{label}"
    expected = {
        (f"ds_preproc_{label}.ds_preproc", "in_file"): (f"{anat}.normalize", "out_file"),
        (f"ds_preproc_{label}.preproc_metadata", "lower"): (f"{anat}.normalize",
                                                            "lower_value"),
        (f"ds_masks_{label}.ds_mask", "in_file"): (f"{anat}.warp_mask", "out_file"),
        (f"ds_masks_{label}.ds_edges", "in_file"): (f"{anat}.edges", "out_file"),
        (f"ds_masks_{label}.edges_metadata", "threshold"): (f"{anat}.edges", "threshold"),
        (f"ds_transforms_{label}.forward_composite", "transforms"): (
            f"{anat}.chain_transforms", "forward"),
        (f"ds_transforms_{label}.inverse_composite", "transforms"): (
            f"{anat}.chain_transforms", "inverse"),
        (f"ds_transforms_{label}.inverse_composite", "invert_flags"): (
            f"{anat}.chain_transforms", "invert_flags"),
    }
    for (node, field), producer in expected.items():
        assert graph.source(node, field) == producer, (node, field)
    masks = graph.node(f"ds_masks_{label}.ds_mask").inputs
    assert (masks.desc, masks.suffix, masks.space) == ("brainT2w", "mask", template.name)
    assert graph.node(f"ds_masks_{label}.ds_edges").inputs.desc == "edgesT2w"
    sinks = [n for n in graph.nodes.values() if isinstance(n.interface, AtomicDerivativesDataSink)]
    assert len(sinks) == 5 * len(session_images)  # preproc, mask, edges, 2 transforms


def test_harmonization_takes_the_edge_map_and_goes_back_natively(
        demo_bids: Path, tmp_path: Path, session_images: list[AnatImage],
        model_dir: Path) -> None:
    config = _config(demo_bids, tmp_path, output_spaces=("template", "T1w"))
    template = resolve_template(None, 2, tmp_path)
    graph = _Graph(init_bids_harmony_wf(config, session_images, template, model_dir))
    for image in session_images:
        label = _label(image)
        anat, harmonize = f"anat_{label}", f"harmonize_{label}"
        assert graph.source(f"{harmonize}.harmonize", "in_file") == (
            f"{anat}.normalize", "out_file")
        assert graph.source(f"{harmonize}.harmonize", "mask_file") == (
            f"{anat}.warp_mask", "out_file")
        assert graph.source(f"{harmonize}.harmonize", "edges_file") == (
            f"{anat}.edges", "out_file")
        assert graph.node(f"{harmonize}.harmonize").inputs.sequence == image.suffix
        to_native = f"{harmonize}.to_native"
        assert graph.source(to_native, "in_file") == (f"{harmonize}.harmonize", "out_file")
        assert graph.source(to_native, "transforms") == (f"{anat}.chain_transforms", "inverse")
        assert graph.source(to_native, "invert_flags") == (
            f"{anat}.chain_transforms", "invert_flags")
        assert graph.node(to_native).inputs.reference_file == str(image.path)
        template_sink = f"ds_harmonized_{label}.ds_harmonized"
        native_sink = f"ds_native_{label}.ds_harmonized"
        assert graph.source(template_sink, "in_file") == (f"{harmonize}.harmonize", "out_file")
        assert graph.source(native_sink, "in_file") == (to_native, "out_file")
        for sink in (template_sink, native_sink):
            assert graph.source(sink, "meta_dict") == (f"{harmonize}.harmonized_metadata",
                                                       "meta")
        assert graph.node(template_sink).inputs.space == template.name
        assert not graph.node(native_sink).inputs.space


def test_template_space_only_has_no_native_resampling(
        demo_bids: Path, tmp_path: Path, session_images: list[AnatImage],
        model_dir: Path) -> None:
    template = resolve_template(None, 2, tmp_path)
    graph = _Graph(init_bids_harmony_wf(_config(demo_bids, tmp_path), session_images,
                                        template, model_dir))
    assert any(name.endswith(".harmonize") for name in graph.nodes)
    assert not any("to_native" in name or "ds_native" in name for name in graph.nodes)


def test_descriptions_make_a_methods_section(
        demo_bids: Path, tmp_path: Path, session_images: list[AnatImage],
        model_dir: Path) -> None:
    config = _config(demo_bids, tmp_path, output_spaces=("template", "T1w"))
    template = resolve_template(None, 2, tmp_path)
    description = init_bids_harmony_wf(config, session_images, template,
                                        model_dir).visit_desc()
    for cited in ("Nipype 1.", "[@nipype1; @nipype2]", "N4 [@n4]", "deepbet [@deepbet]",
                  f"{template.name} template", "antspyx [@antspyx]", "Canny edge map [@canny]",
                  "registered rigidly to the session's T1w brain",
                  "toward the style of site SiteX with histmatch [@histmatch]",
                  "resampled back onto each image's own grid"):
        assert cited in description, cited
    methods = compose_methods([description])
    assert len(methods.paragraphs) == 4  # header, preprocessing, T2w via T1w, harmonization
    assert "[@" not in " ".join(methods.paragraphs)
    assert any(reference.startswith("Tustison NJ, Avants BB") for reference in
               methods.references)  # N4
    assert HARMONIZERS["histmatch"].citation in methods.references
    with pytest.raises(KeyError, match="no reference"):
        compose_methods(["An uncited tool [@nothing]."])


def test_every_harmonizer_has_a_paper_to_cite() -> None:
    for name in HARMONIZERS:
        assert HARMONIZERS[name].citation, f"{name} has no citation"
