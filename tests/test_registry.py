"""The harmonizer registry: read from the source without imports, equal to the classes,
and the one way (``from_options``) to build a harmonizer from command-line options."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bids_harmony.errors import UsageError
from bids_harmony.harmonizers import HARMONIZERS, from_options
from bids_harmony.harmonizers.registry import (
    AUTO_PRESET,
    DEDICATED_OPTIONS,
    MACHINE_PRESET,
    HarmonizerRegistry,
    ParamKind,
    Parameter,
)

KIND_TYPES = {ParamKind.INT: int, ParamKind.FLOAT: float, ParamKind.STR: str,
              ParamKind.BOOL: bool, ParamKind.INTS: tuple, ParamKind.FLOATS: tuple}
CLASSICAL = [name for name, info in HARMONIZERS.methods.items() if not info.presets]
LEARNED = [name for name, info in HARMONIZERS.methods.items() if info.presets]


def test_listing_the_registry_imports_no_numpy_scipy_or_torch() -> None:
    """Names, summaries, presets, schemas and the whole parser, in a fresh interpreter."""
    probe = textwrap.dedent("""
        import sys
        from bids_harmony.cli.parser import build_parser
        from bids_harmony.harmonizers import HARMONIZERS
        build_parser().format_help()
        for info in HARMONIZERS.methods.values():
            info.summary, info.presets, [info.parameters(p) for p in info.presets or [None]]
        print(sorted(m for m in ("numpy", "scipy", "torch") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_every_harmonizer_module_is_found() -> None:
    assert CLASSICAL == ["histmatch", "nyul", "ssimh", "whitestripe", "zscore"]
    assert LEARNED == ["blindharmony", "blindharmonydiff", "sgcd", "ssim_disentangle",
                       "umh"]


@pytest.mark.parametrize("name", sorted(HARMONIZERS))
def test_static_metadata_equals_the_imported_class(name: str) -> None:
    info = HARMONIZERS.methods[name]
    cls = HARMONIZERS[name]
    assert cls.name == name and cls.__name__ == info.class_name
    assert info.summary == inspect.getdoc(cls).splitlines()[0]
    assert info.presets == cls.presets
    assert info.citation == cls.citation
    for parameter in info.parameters(info.default_preset):
        assert isinstance(parameter.default, KIND_TYPES[parameter.kind]), parameter
    signature = inspect.signature(cls.__init__).parameters
    if info.presets:
        module = importlib.import_module(info.module)
        assert info.default_preset == signature["preset"].default
        for preset in info.presets:
            settings = dataclasses.asdict(module.PRESETS[
                MACHINE_PRESET if preset == AUTO_PRESET else preset])
            assert {p.name: p.default for p in info.parameters(preset)} == {
                key: value for key, value in settings.items() if key not in DEDICATED_OPTIONS}
    else:
        assert {p.name: p.default for p in info.parameters()} == {
            key: value.default for key, value in signature.items()
            if key != "self" and key not in DEDICATED_OPTIONS
            and value.kind is not value.VAR_KEYWORD}


def test_preset_choices_are_the_union_of_the_methods_presets() -> None:
    preset = HARMONIZERS.preset_enum()
    assert [member.value for member in preset] == list(HARMONIZERS.presets())
    for name in LEARNED:
        assert set(HARMONIZERS.methods[name].presets) <= set(HARMONIZERS.presets())
    assert repr(preset("fast")) == "'fast'"  # argparse's "choose from" list reads cleanly


def test_classical_parameters_are_typed_and_recorded() -> None:
    nyul = from_options("nyul", params={"percentiles": "1,50,99"})
    assert nyul.params == {"percentiles": [1.0, 50.0, 99.0]}
    histmatch = from_options("histmatch", params={"n_quantiles": "256"})
    assert histmatch.params == {"n_quantiles": 256} and histmatch.checkpoint_dir is None
    whitestripe = from_options("whitestripe", params={"width": "0.1", "wm_peak": "last"})
    assert whitestripe.params == {"width": 0.1, "wm_peak": "last"}


def test_learned_settings_come_from_preset_options_and_params(tmp_path: Path) -> None:
    """Device, seed and checkpoint directory reach the instance; nothing is set on the class."""
    from bids_harmony.harmonizers.base import Harmonizer

    diff = from_options(
        "blindharmonydiff", preset="tiny", device="cpu", seed=3, checkpoint_dir=tmp_path,
        params={"sampling_steps": "8", "solver": "euler", "precision": "fp32",
                "checkpoint_every": "7", "multipliers": "1,2"},
    )
    assert (diff.settings.sampling_steps, diff.settings.solver, diff.settings.precision,
            diff.settings.checkpoint_every, diff.settings.multipliers) == (8, "euler", "fp32",
                                                                           7, (1, 2))
    assert (diff.settings.device, diff.settings.seed, diff.params["preset"]) == ("cpu", 3, "tiny")
    assert diff.checkpoint_dir == tmp_path and "checkpoint_dir" not in diff.params
    blind = from_options("blindharmony", params={"alpha": "0.01", "ncc_step": "0.5",
                                                  "beta_edge": "0.1", "iterations": "3"})
    # the default preset "auto" is "cpu" on a machine without a GPU
    assert (blind.params["alpha"], blind.params["ncc_step"], blind.params["beta_edge"],
            blind.params["iterations"], blind.params["preset"]) == (0.01, 0.5, 0.1, 3, "cpu")
    assert blind.checkpoint_dir is None
    assert "checkpoint_dir" not in vars(Harmonizer)


@pytest.mark.parametrize(
    ("method", "preset", "params", "fragments"),
    [
        ("histmatch", None, {"n_quantile": "5"}, ["n_quantile", "its parameters: n_quantiles"]),
        ("histmatch", None, {"n_quantiles": "many"}, ["n_quantiles=many", "an integer"]),
        ("histmatch", None, {"n_quantiles": "1"}, [">= 2", "--harmonizer-param n_quantiles=1"]),
        ("nyul", None, {"percentiles": "1,x"}, ["percentiles", "comma-separated numbers"]),
        ("zscore", None, {"width": "1"}, ["zscore has no parameter 'width'", "none"]),
        ("histmatch", "tiny", {}, ["--preset tiny", "histmatch has no presets"]),
        ("blindharmony", "huge", {}, ["--preset huge", "auto, cpu, fast, paper, tiny"]),
        ("blindharmony", None, {"device": "cpu"}, ["device", "--device"]),
        ("blindharmonydiff", None, {"sampling_step": "3"}, ["sampling_steps", "solver"]),
        ("nomethod", None, {}, ["--method nomethod", "histmatch"]),
    ],
)
def test_bad_options_are_one_line_usage_errors(method: str, preset: str | None,
                                               params: dict[str, str],
                                               fragments: list[str]) -> None:
    with pytest.raises(UsageError) as error:
        from_options(method, preset=preset, params=params)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [(ParamKind.INT, "20_000", 20000), (ParamKind.FLOAT, "1e-3", 0.001),
     (ParamKind.BOOL, "Yes", True), (ParamKind.BOOL, "false", False),
     (ParamKind.INTS, "1,2,4", (1, 2, 4)), (ParamKind.FLOATS, "0.5", (0.5,)),
     (ParamKind.STR, "midpoint", "midpoint")],
)
def test_parameter_values_are_parsed_by_kind(kind: ParamKind, text: str, value: object) -> None:
    assert Parameter("p", kind, value).parse(text) == value


def test_an_eleventh_harmonizer_is_one_module(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A new module with a registered class is listed, described and built: no list to edit."""
    package = tmp_path / "extra_harmonizers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "gain.py").write_text(textwrap.dedent('''
        from bids_harmony.harmonizers.base import Harmonizer
        from bids_harmony.harmonizers.registry import register

        @register("gain")
        class Gain(Harmonizer):
            """Multiply the brain by a constant.

            A toy method.
            """

            def __init__(self, factor: float = 2.0, clip: bool = True) -> None:
                super().__init__(factor=float(factor), clip=clip)

            def _fit_sequence(self, reference):
                return {}

            def _transform_sequence(self, image, state):
                return image.data * self.params["factor"]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = HarmonizerRegistry("extra_harmonizers", package)
    info = registry.methods["gain"]
    assert list(registry) == ["gain"] and "gain" in registry
    assert info.summary == "Multiply the brain by a constant."
    assert [(p.name, p.kind, p.default) for p in info.parameters()] == [
        ("factor", ParamKind.FLOAT, 2.0), ("clip", ParamKind.BOOL, True)]
    assert "extra_harmonizers.gain" not in sys.modules
    assert info.parse_params(None, {"factor": "3", "clip": "no"}) == {"factor": 3.0,
                                                                      "clip": False}
    assert registry["gain"](factor=3.0).params == {"factor": 3.0, "clip": True}


def test_the_group_level_builds_through_from_options(tmp_path: Path) -> None:
    """``build_harmonizer`` hands the run's options over; checkpoints go to the work dir."""
    from bids_harmony.config import AnalysisLevel, RunConfig
    from bids_harmony.workflows.group import build_harmonizer

    config = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP, tmp_path / "work",
                       "run", method="blindharmonydiff", preset="tiny", device="cpu", seed=5,
                       harmonizer_params=(("sampling_steps", "4"), ("solver", "euler")))
    harmonizer = build_harmonizer(config)
    assert harmonizer.checkpoint_dir == tmp_path / "work" / "checkpoints" / "blindharmonydiff"
    assert (harmonizer.settings.sampling_steps, harmonizer.settings.solver,
            harmonizer.settings.seed, harmonizer.settings.device) == (4, "euler", 5, "cpu")
    classical = build_harmonizer(RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP,
                                           tmp_path / "work", "run", method="nyul"))
    assert classical.params == {"percentiles": [1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0,
                                                80.0, 90.0, 99.0]}
