"""The levels driver's decisions on real files: what is done, which model, what to expect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bids_harmony.bids.layout import AnatImage
from bids_harmony.cli.levels import _is_complete, find_model, write_citation
from bids_harmony.config import AnalysisLevel, RunConfig
from bids_harmony.data.templates import TemplateFiles
from bids_harmony.errors import InputMissingError, UsageError
from bids_harmony.workflows.base import expected_outputs
from bids_harmony.workflows.citations import compose_methods

TEMPLATE = "MNI152NLin2009aSym"


def _config(tmp_path: Path, **overrides: object) -> RunConfig:
    values: dict[str, object] = dict(
        bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
        analysis_level=AnalysisLevel.PARTICIPANT, work_dir=tmp_path / "work", run_id="test",
    )
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


def _image(tmp_path: Path, suffix: str = "T1w") -> AnatImage:
    path = tmp_path / "bids" / "sub-01" / "ses-02" / "anat" / f"sub-01_ses-02_{suffix}.nii.gz"
    return AnatImage(path, "01", "02", suffix, "SiteA", "sessions.tsv")


def _template(tmp_path: Path) -> TemplateFiles:
    return TemplateFiles(TEMPLATE, 2, tmp_path / "brain.nii.gz", tmp_path / "mask.nii.gz",
                         "bundled")


def _names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def test_expected_outputs_are_the_sidecars_of_each_derivative(tmp_path: Path) -> None:
    config = _config(tmp_path)
    image, template = _image(tmp_path), _template(tmp_path)
    folder = tmp_path / "out" / "sub-01" / "ses-02" / "anat"
    stem = f"sub-01_ses-02_space-{TEMPLATE}"
    preprocessing = [f"{stem}_desc-preproc_T1w.json", f"{stem}_desc-brain_mask.json",
                     f"{stem}_desc-edges_mask.json",
                     f"sub-01_ses-02_from-T1w_to-{TEMPLATE}_mode-image_xfm.json",
                     f"sub-01_ses-02_from-{TEMPLATE}_to-T1w_mode-image_xfm.json"]
    outputs = expected_outputs(config, image, template, harmonize=False)
    assert _names(outputs) == preprocessing
    assert all(path.parent == folder for path in outputs)
    assert _names(expected_outputs(config, image, template, harmonize=True)) == [
        *preprocessing, f"{stem}_desc-harmonized_T1w.json"]
    native = _config(tmp_path, output_spaces=("template", "T1w"))
    assert _names(expected_outputs(native, image, template, harmonize=True)) == [
        *preprocessing, f"{stem}_desc-harmonized_T1w.json",
        "sub-01_ses-02_desc-harmonized_T1w.json"]
    # native output only matters once there is something harmonized to resample
    assert _names(expected_outputs(native, image, template, harmonize=False)) == preprocessing


def test_expected_outputs_of_a_t2w_keep_their_own_mask_names(tmp_path: Path) -> None:
    outputs = expected_outputs(_config(tmp_path), _image(tmp_path, "T2w"), _template(tmp_path),
                               harmonize=False)
    assert _names(outputs)[1:] == [f"sub-01_ses-02_space-{TEMPLATE}_desc-brainT2w_mask.json",
                                   f"sub-01_ses-02_space-{TEMPLATE}_desc-edgesT2w_mask.json",
                                   f"sub-01_ses-02_from-T2w_to-{TEMPLATE}_mode-image_xfm.json",
                                   f"sub-01_ses-02_from-{TEMPLATE}_to-T2w_mode-image_xfm.json"]


def _write_sidecars(paths: list[Path], checksum: str | None = None) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ModelChecksum": checksum} if "_desc-harmonized_" in path.name else {}
        path.write_text(json.dumps(meta))


def test_is_complete_needs_every_sidecar(tmp_path: Path) -> None:
    config = _config(tmp_path)
    outputs = expected_outputs(config, _image(tmp_path), _template(tmp_path), harmonize=False)
    assert not _is_complete(outputs, checksum=None)
    _write_sidecars(outputs[:-1])
    assert not _is_complete(outputs, checksum=None)
    _write_sidecars(outputs)
    assert _is_complete(outputs, checksum=None)


def test_is_complete_redoes_images_harmonized_by_another_model(tmp_path: Path) -> None:
    config = _config(tmp_path, output_spaces=("template", "T1w"))
    outputs = expected_outputs(config, _image(tmp_path), _template(tmp_path), harmonize=True)
    _write_sidecars(outputs, checksum="sha256:old")
    assert _is_complete(outputs, checksum="sha256:old")
    assert not _is_complete(outputs, checksum="sha256:new")
    native = outputs[-1]
    native.write_text(json.dumps({"ModelChecksum": "sha256:new"}))
    assert not _is_complete(outputs, checksum="sha256:new")  # the template-space one is old


def _save_model(models: Path, name: str) -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text(json.dumps({"method": name.split("_")[0]}))
    return folder


def test_find_model_none_one_or_several(tmp_path: Path) -> None:
    config = _config(tmp_path, method="histmatch")
    models = config.output_dir / "models"
    assert find_model(config) is None
    _save_model(models, "nyul_SiteA")  # another method's model is not a candidate
    assert find_model(config) is None
    (models / "histmatch_SiteC").mkdir()  # a folder without a card is not a model
    assert find_model(config) is None
    only = _save_model(models, "histmatch_SiteA")
    assert find_model(config) == only
    _save_model(models, "histmatch_SiteB")
    with pytest.raises(UsageError, match="histmatch_SiteA, histmatch_SiteB.*--model"):
        find_model(config)


def test_find_model_takes_model_option_only_with_a_card(tmp_path: Path) -> None:
    models = tmp_path / "out" / "models"
    _save_model(models, "histmatch_SiteA")
    _save_model(models, "histmatch_SiteB")
    chosen = models / "histmatch_SiteB"
    assert find_model(_config(tmp_path, model=chosen)) == chosen
    with pytest.raises(InputMissingError, match="model_card.json"):
        find_model(_config(tmp_path, model=tmp_path / "elsewhere"))


def test_citation_file_holds_methods_and_references(tmp_path: Path) -> None:
    methods = compose_methods(["Registered with antspyx [@antspyx; @ants].\n\n",
                               "Harmonized with histmatch [@histmatch]; antspyx [@antspyx].\n\n"])
    assert methods.paragraphs == ("Registered with antspyx [1, 2].",
                                  "Harmonized with histmatch [3]; antspyx [1].")
    path = write_citation(tmp_path / "out", methods)
    assert path == tmp_path / "out" / "logs" / "CITATION.md"
    text = path.read_text()
    assert text.startswith("## Methods\n\nRegistered with antspyx [1, 2].")
    assert "### References\n\n1. Tustison NJ" in text and "\n2. Avants BB" in text
    assert "\n3. " in text and "\n4. " not in text
