"""The workflow graph built from a real BIDS dataset (not run: the end-to-end tests run it)."""

from __future__ import annotations

from pathlib import Path

from bids_harmony.bids.layout import build_layout, collect_images
from bids_harmony.config import AnalysisLevel, RunConfig
from bids_harmony.data.templates import resolve_template
from bids_harmony.workflows.base import init_bids_harmony_wf


def _config(bids: Path, out: Path, **overrides: object) -> RunConfig:
    values: dict[str, object] = dict(
        bids_dir=bids, output_dir=out, analysis_level=AnalysisLevel.PARTICIPANT,
        work_dir=out / "work", run_id="test", resolution=2,
    )
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


def test_t2w_registers_through_its_session_t1w(demo_bids: Path, tmp_path: Path) -> None:
    config = _config(demo_bids, tmp_path)
    images = collect_images(build_layout(demo_bids, tmp_path), participants=["01"],
                            sessions=["01"])
    template = resolve_template(None, 2, tmp_path)
    workflow = init_bids_harmony_wf(config, images, template, model_dir=None)
    t1w = next(im for im in images if im.suffix == "T1w")
    t2w = next(im for im in images if im.suffix == "T2w")
    graph = workflow._create_flat_graph()
    names = {node.fullname: node for node in graph.nodes()}
    t2w_register = names[f"bids_harmony_wf.anat_{t2w.key}.register".replace("-", "_")]
    t1w_register = names[f"bids_harmony_wf.anat_{t1w.key}.register".replace("-", "_")]
    assert t2w_register.inputs.transform_type == "rigid"
    assert t1w_register.inputs.transform_type == "affine"
    assert t1w_register.inputs.fixed_file == str(template.brain)
    upstream = {edge[0].fullname for edge in graph.in_edges(t2w_register)}
    t2w_inputnode = names[f"bids_harmony_wf.anat_{t2w.key}.inputnode".replace("-", "_")]
    assert t2w_inputnode.fullname in upstream
    feeding = {edge[0].fullname for edge in graph.in_edges(t2w_inputnode)}
    assert feeding == {f"bids_harmony_wf.anat_{t1w.key}.outputnode".replace("-", "_")}
    assert not any("harmonize" in name for name in names)


def test_model_and_native_space_add_nodes(demo_bids: Path, tmp_path: Path) -> None:
    config = _config(demo_bids, tmp_path, output_spaces=("template", "T1w"))
    images = collect_images(build_layout(demo_bids, tmp_path), participants=["01"],
                            sessions=["01"], suffixes=["T1w"])
    template = resolve_template(None, 2, tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    workflow = init_bids_harmony_wf(config, images, template, model_dir=model)
    names = set(workflow.list_node_names())
    key = images[0].key.replace("-", "_")
    for node in ("harmonize", "ds_harmonized", "to_native", "ds_native", "ds_preproc",
                 "ds_edges", "ds_xfm", "ds_xfm_inv", "ds_mask"):
        assert f"anat_{key}_{node}" in names
