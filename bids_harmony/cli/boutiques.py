"""The Boutiques descriptor (schema 0.5), generated from the argparse parser.

Brainlife, CBRAIN and ``bosh`` run the app through this descriptor; deriving it from
``build_parser()`` means a new option cannot be missing from it, and ``descriptor.json`` at
the repository top level is this module's output, checked by the tests.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from bids_harmony import __version__
from bids_harmony.cli.argtypes import positive_int, ratio
from bids_harmony.errors import ExitCode

CONTAINER_IMAGE = f"bidsharmony/bids_harmony:{__version__}"
# Options that print something and exit instead of configuring a run.
INFORMATIONAL_DESTS = frozenset({"help", "version", "boutiques"})
# Inputs that name existing files or folders (Boutiques has no separate folder type).
PATH_DESTS = frozenset({"bids_dir", "site_map", "model", "config"})
# argparse value types that Boutiques expresses as Number with bounds.
NUMBER_TYPES: dict[Callable[[str], Any], dict[str, Any]] = {
    int: {"integer": True},
    float: {"integer": False},
    positive_int: {"integer": True, "minimum": 1},
    ratio: {"integer": False, "minimum": 0, "exclusive-minimum": True,
                        "maximum": 1, "exclusive-maximum": True},
}

ERROR_DESCRIPTIONS: dict[ExitCode, str] = {
    ExitCode.FAILURE: "Unexpected failure; the log under OUTPUT_DIR/logs says where.",
    ExitCode.VALIDATION_FAILED: "The input dataset failed BIDS validation.",
    ExitCode.UNKNOWN_LEVEL: "Unknown analysis level (participant or group).",
    ExitCode.EMPTY_SELECTION: "The participant, session and suffix filters selected no image.",
    ExitCode.USAGE: "Usage error: an invalid or inconsistent command line.",
    ExitCode.DATA_ERROR: "Data error: an image without a site, an unknown target site, "
                         "a bad image (all listed at once), a damaged or mismatched model.",
    ExitCode.INPUT_MISSING: "An input file or folder (dataset, site map, model) is missing.",
    ExitCode.CANNOT_CREATE_OUTPUT: "The output or work directory cannot be created or written "
                                   "(no space left, no permission).",
    ExitCode.IO_ERROR: "An input/output error while reading or writing a file.",
}

OUTPUT_FILES: list[dict[str, Any]] = [
    {"id": "derivatives", "name": "Derivatives dataset", "path-template": "[OUTPUT_DIR]",
     "optional": False,
     "description": "BIDS derivatives dataset: harmonized and preprocessed images in template "
                    "space (and native space with --output-spaces T1w), brain and edge masks, "
                    "transforms, each with a JSON sidecar holding provenance and QC."},
    {"id": "dataset_description", "name": "Dataset description",
     "path-template": "[OUTPUT_DIR]/dataset_description.json", "optional": False,
     "description": "DatasetType derivative with GeneratedBy (container when inside one)."},
    {"id": "sites", "name": "Sites table", "path-template": "[OUTPUT_DIR]/sites.tsv",
     "optional": False,
     "description": "Site x sequence x count, and where each site label came from."},
    {"id": "subject_anat", "name": "Per-subject anatomical derivatives", "list": True,
     "path-template": "[OUTPUT_DIR]/sub-*/anat/*", "optional": True,
     "description": "*_space-<tpl>_desc-{preproc,harmonized}_<suffix>.nii.gz, "
                    "*_desc-brain_mask, *_desc-edges_mask, *_xfm.h5 and their sidecars "
                    "(datasets with sessions put them under sub-*/ses-*/anat)."},
    {"id": "models", "name": "Fitted harmonizers", "path-template": "[OUTPUT_DIR]/models",
     "optional": True,
     "description": "Group level: models/<method>_<target>/state.npz + model_card.json."},
    {"id": "group_qc", "name": "Group QC tables", "list": True,
     "path-template": "[OUTPUT_DIR]/group_*.tsv", "optional": True,
     "description": "Group level: per-image QC, paired metrics of traveling subjects."},
    {"id": "group_histograms", "name": "Group histograms", "list": True,
     "path-template": "[OUTPUT_DIR]/group_*_histograms.png", "optional": True,
     "description": "Group level: per-site brain histograms before and after harmonization."},
    {"id": "group_summary", "name": "Group summary",
     "path-template": "[OUTPUT_DIR]/group_summary.json", "optional": True,
     "description": "Group level: means per sequence and site."},
    {"id": "logs", "name": "Run logs", "path-template": "[OUTPUT_DIR]/logs", "optional": False,
     "description": "logs/<run-id>/config.toml (resolved configuration), log and crash files."},
]


def primary_flag(action: argparse.Action) -> str:
    """The flag a descriptor uses: the first long one, or the negation of a boolean pair.

    A ``--resume/--no-resume`` pair defaults to on, so only ``--no-resume`` changes a run.
    """
    if isinstance(action, argparse.BooleanOptionalAction):
        return next(flag for flag in action.option_strings if flag.startswith("--no-"))
    return next((flag for flag in action.option_strings if flag.startswith("--")),
                action.option_strings[0])


def input_id(action: argparse.Action) -> str:
    """Boutiques id of an argparse action: ``no_resume`` for the negated pair, else ``dest``."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return primary_flag(action).lstrip("-").replace("-", "_")
    return action.dest


def run_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions that configure a run (informational ones excluded)."""
    return [action for action in parser._actions if action.dest not in INFORMATIONAL_DESTS]


def _expanded_help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it, ``%(default)s`` filled in."""
    values = {name: value for name, value in vars(action).items()
              if value is not argparse.SUPPRESS}
    values["prog"] = prog
    return " ".join((action.help or "").split()) % values


def _describe_input(action: argparse.Action, prog: str) -> dict[str, Any]:
    """One Boutiques input with the flag, type, default and choices of ``action``."""
    identifier = input_id(action)
    entry: dict[str, Any] = {
        "id": identifier,
        "name": primary_flag(action) if action.option_strings else action.dest.upper(),
        "description": _expanded_help(action, prog),
        "value-key": f"[{identifier.upper()}]",
        "optional": bool(action.option_strings),
    }
    if action.option_strings:
        entry["command-line-flag"] = primary_flag(action)
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction,
                           argparse.BooleanOptionalAction)):
        entry["type"] = "Flag"
        return entry
    number = NUMBER_TYPES.get(action.type)
    entry["type"] = ("File" if action.dest in PATH_DESTS else
                     "Number" if number is not None else "String")
    entry.update(number or {})
    if action.nargs == "+":
        entry["list"] = True
        entry["min-list-entries"] = 1
    if action.choices is not None:
        entry["value-choices"] = list(action.choices)
    if action.default not in (None, []):
        entry["default-value"] = action.default
    return entry


def build_descriptor(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The whole descriptor: one input per run option, outputs, resources and exit codes."""
    inputs = [_describe_input(action, parser.prog) for action in run_actions(parser)]
    return {
        "name": "bids_harmony",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "url": "https://github.com/bids-harmony/bids_harmony",
        "command-line": " ".join([parser.prog] + [entry["value-key"] for entry in inputs]),
        "container-image": {"type": "docker", "image": CONTAINER_IMAGE},
        "inputs": inputs,
        "output-files": OUTPUT_FILES,
        "suggested-resources": {
            "cpu-cores": 2,
            "ram": 8,
            "disk-space": 5,
            "walltime-estimate": 1800,
        },
        "error-codes": [{"code": int(code), "description": ERROR_DESCRIPTIONS[code]}
                        for code in ExitCode if code is not ExitCode.OK],
        "tags": {"domain": ["neuroinformatics", "mri", "harmonization"], "bids-app": True},
        "custom": {
            "gpu": "Not needed: the classical harmonizers and brain extraction run on CPU. "
                   "Learned harmonizers use one CUDA GPU with --device cuda when the image is "
                   "built with TORCH_VARIANT=cu128 and run with --nv / --gpus.",
            "walltime-note": "walltime-estimate is per participant at --resolution 1; "
                             "the group level takes about as long as one participant.",
        },
    }


def descriptor_json(parser: argparse.ArgumentParser) -> str:
    """The descriptor as ``descriptor.json`` stores it (2-space indent, final newline)."""
    return json.dumps(build_descriptor(parser), indent=2) + "\n"
