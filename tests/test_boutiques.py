"""descriptor.json, the parser and the container files must not drift apart."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from bids_harmony import __version__
from bids_harmony.cli.boutiques import INFORMATIONAL_DESTS, descriptor_json
from bids_harmony.cli.parser import build_parser
from bids_harmony.cli.run import main
from bids_harmony.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR_PATH = REPO / "descriptor.json"
FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._CountAction, argparse.BooleanOptionalAction)


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR_PATH.read_text())


@pytest.fixture(scope="module")
def run_options() -> list[argparse.Action]:
    return [action for action in build_parser()._actions
            if action.dest not in INFORMATIONAL_DESTS]


def _inputs_by_flag(descriptor: dict) -> dict[str, dict]:
    return {entry.get("command-line-flag", entry["id"]): entry for entry in descriptor["inputs"]}


def test_committed_descriptor_is_what_boutiques_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """descriptor.json is regenerated with `bids_harmony --boutiques > descriptor.json`."""
    with pytest.raises(SystemExit) as exit_:
        main(["--boutiques"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed == descriptor_json(build_parser())
    assert printed == DESCRIPTOR_PATH.read_text(), (
        "descriptor.json is stale: run `bids_harmony --boutiques > descriptor.json`")


def test_every_option_is_an_input_and_every_input_an_option(
        descriptor: dict, run_options: list[argparse.Action]) -> None:
    inputs = _inputs_by_flag(descriptor)
    matched = set()
    for action in run_options:
        candidates = action.option_strings or [action.dest]
        flag = next((candidate for candidate in candidates if candidate in inputs), None)
        assert flag is not None, f"{candidates} has no input in descriptor.json"
        matched.add(flag)
    assert matched == set(inputs), f"inputs with no option: {set(inputs) - matched}"


@pytest.mark.parametrize("dest", [action.dest for action in build_parser()._actions
                                  if action.dest not in INFORMATIONAL_DESTS])
def test_input_matches_option(descriptor: dict, run_options: list[argparse.Action],
                              dest: str) -> None:
    """Flag, requiredness, type, list-ness, default and choices agree with argparse."""
    action = next(action for action in run_options if action.dest == dest)
    inputs = _inputs_by_flag(descriptor)
    entry = next(inputs[flag] for flag in action.option_strings or [dest] if flag in inputs)
    assert entry["optional"] is bool(action.option_strings)
    assert entry["value-key"] in descriptor["command-line"]
    if isinstance(action, FLAG_ACTIONS):
        assert entry["type"] == "Flag" and "default-value" not in entry
        return
    assert entry.get("list", False) is (action.nargs == "+")
    assert entry.get("value-choices") == (list(action.choices) if action.choices else None)
    expected_default = None if action.default in (None, []) else action.default
    assert entry.get("default-value") == expected_default
    if entry["type"] == "Number":  # argparse parses the descriptor's default back to itself
        assert action.type is not None
        assert expected_default is None or action.type(str(expected_default)) == expected_default
    else:
        assert not isinstance(action.default, (int, float))

def test_harmonizer_choices_come_from_the_registry(descriptor: dict) -> None:
    from bids_harmony.harmonizers import HARMONIZERS

    method = _inputs_by_flag(descriptor)["--method"]
    assert method["value-choices"] == sorted(HARMONIZERS)


def test_preset_and_parameters_come_from_the_registry(descriptor: dict) -> None:
    """--preset's choices are the union of the methods' presets; --harmonizer-param names
    every method's parameters; --config takes a file."""
    from bids_harmony.harmonizers import HARMONIZERS

    inputs = _inputs_by_flag(descriptor)
    assert inputs["--preset"]["value-choices"] == list(HARMONIZERS.presets())
    assert "default-value" not in inputs["--preset"]  # each method's own default
    param = inputs["--harmonizer-param"]
    assert (param["type"], param["list"], param["id"]) == ("String", True, "harmonizer_params")
    for name, info in HARMONIZERS.methods.items():
        assert f"{name}: " in param["description"]
        for parameter in info.parameters():
            assert f"{parameter.name} ({parameter.kind})" in param["description"]
    assert inputs["--config"]["type"] == "File"


def test_value_keys_appear_once_in_the_command_line(descriptor: dict) -> None:
    command = descriptor["command-line"]
    assert command.split()[0] == "bids_harmony"
    for entry in descriptor["inputs"]:
        assert command.split().count(entry["value-key"]) == 1, entry["id"]


def test_error_codes_match_exit_codes(descriptor: dict) -> None:
    documented = {entry["code"] for entry in descriptor["error-codes"]}
    assert documented == {int(code) for code in ExitCode if code is not ExitCode.OK}


def test_container_files_name_this_version(descriptor: dict) -> None:
    image = f"bidsharmony/bids_harmony:{__version__}"
    assert descriptor["container-image"] == {"type": "docker", "image": image}
    assert descriptor["tool-version"] == __version__
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG VERSION={__version__}\n" in dockerfile
    assert 'ENTRYPOINT ["bids_harmony"]' in dockerfile
    definition = (REPO / "singularity.def").read_text()
    assert re.search(rf"^From: {re.escape(image)}$", definition, re.M)
    assert re.search(r'^%runscript\n\s+exec bids_harmony "\$@"$', definition, re.M)


def test_bosh_validate_accepts_the_descriptor() -> None:
    pytest.importorskip("boutiques")
    from boutiques import bosh

    bosh(["validate", str(DESCRIPTOR_PATH)])  # raises DescriptorValidationError when invalid


def test_prebuilt_bundled_template_in_templateflow_home_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The container builds the bundled template into TEMPLATEFLOW_HOME; runs write none."""
    from bids_harmony.data.templates import bundled_template, resolve_template

    home = tmp_path / "templateflow"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    prebuilt = bundled_template(2, home)
    work_dir = tmp_path / "work"
    for name in (None, "MNI152NLin2009aSym"):
        found = resolve_template(name, 2, work_dir, allow_download=False)
        assert found.brain == prebuilt.brain and found.mask == prebuilt.mask
    assert not work_dir.exists()
