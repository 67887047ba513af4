"""The command-line parser: BIDS-Apps positional arguments and options.

It is the single source of truth for the options: ``--help``, the README's option table and
the Boutiques descriptor are all derived from or checked against it. Harmonizer names,
presets and parameters come from the registry, which reads the harmonizer modules without
importing them, so building the parser imports no numpy, scipy or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from bids_harmony import __version__
from bids_harmony.cli.argtypes import (
    device,
    key_value,
    plugin_args,
    positive_float,
    positive_int,
    ratio,
)
from bids_harmony.errors import ExitCode, UsageError
from bids_harmony.harmonizers.registry import HARMONIZERS, HarmonizerRegistry
from bids_harmony.workflows.plugins import NIPYPE_PLUGINS

POSITIONALS = ("bids_dir", "output_dir", "analysis_level")


class BIDSAppArgumentParser(argparse.ArgumentParser):
    """argparse with the BIDS-Apps exit codes: 17 for an unknown level, 64 otherwise."""

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        code = ExitCode.UNKNOWN_LEVEL if "analysis_level" in message else ExitCode.USAGE
        self.exit(int(code), f"{self.prog}: error: {message}\n")


class _PrintBoutiquesAction(argparse.Action):
    """``--boutiques``: print the Boutiques descriptor generated from this parser, exit 0."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> NoReturn:
        from bids_harmony.cli.boutiques import descriptor_json

        sys.stdout.write(descriptor_json(parser))
        parser.exit(0)


def build_parser(file_values: Mapping[str, Any] | None = None,
                 source: str = "--config") -> BIDSAppArgumentParser:
    """Build the parser; harmonizer choices come from the registry.

    ``file_values`` (a ``--config`` file's options, keyed by ``dest``) become the defaults,
    so options given on the command line override them; the positionals the file holds
    become optional. Each value passes the option's own type and choices check.
    """
    file_values = dict(file_values or {})
    Preset = HARMONIZERS.preset_enum()  # noqa: N806 (a class built at run time)

    def positional(dest: str) -> dict[str, Any]:
        return {"nargs": "?", "default": file_values[dest]} if dest in file_values else {}

    parser = BIDSAppArgumentParser(
        prog="bids_harmony",
        description=(
            "Harmonize multi-site structural MRI (T1w, T2w, ...) of a BIDS dataset. "
            "'participant' preprocesses each image (reorient, N4, brain extraction, registration "
            "to MNI, percentile normalisation, 3D Canny edges) and applies a fitted harmonizer; "
            "'group' fits the harmonizer on all preprocessed images and writes group QC."
        ),
    )
    parser.add_argument("bids_dir", help="root of the input BIDS dataset (never written to)",
                        **positional("bids_dir"))
    parser.add_argument("output_dir", help="where derivatives are written",
                        **positional("output_dir"))
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="processing stage", **positional("analysis_level"))
    parser.add_argument("--version", action="version", version=f"bids_harmony {__version__}")
    parser.add_argument("--boutiques", action=_PrintBoutiquesAction,
                        help="print the Boutiques descriptor (descriptor.json) and exit")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="replay a run configuration (TOML, e.g. OUTPUT_DIR/logs/<run>/"
                             "config.toml): its values are the defaults, options given on the "
                             "command line override them, and BIDS_DIR OUTPUT_DIR LEVEL may "
                             "be left out")

    select = parser.add_argument_group("selecting data")
    select.add_argument("--participant-label", "--participant_label", nargs="+", default=[],
                        metavar="LABEL", help="participants to process (with or without 'sub-')")
    select.add_argument("--session-label", nargs="+", default=[], metavar="LABEL",
                        help="sessions to process (with or without 'ses-')")
    select.add_argument("--suffix", nargs="+", default=[], metavar="SUFFIX",
                        help="sequences to process, e.g. T1w T2w (default: every anatomical "
                             "suffix found)")
    select.add_argument("--skip-bids-validation", action="store_true",
                        help="do not validate the input dataset")
    select.add_argument("--skip-image-checks", action="store_true",
                        help="do not check the selected images (readable, 3D, finite, sane "
                             "affine and voxel size, a head-sized field of view) before "
                             "processing (experts only)")
    select.add_argument("--keep-flagged", action="store_true",
                        help="let the group level fit on images whose preprocessing was "
                             "flagged (failed registration, not brain-like); default: leave "
                             "them out")

    sites = parser.add_argument_group("sites")
    sites.add_argument("--site-column", default="site",
                       help="column of sessions.tsv / participants.tsv that names the site "
                            "(default: %(default)s)")
    sites.add_argument("--site-map", metavar="FILE.tsv", default=None,
                       help="TSV with participant_id[, session_id], site; overrides the tables")
    sites.add_argument("--target-site", default="auto", metavar="SITE|auto|unified",
                       help="site whose style the harmonized images take; auto (default) = the "
                            "most homogeneous site; unified = pooled reference of all sites "
                            "(sgcd, umh: their stage-1 unified domain; ssim_disentangle: "
                            "its style-agnostic output)")

    harmony = parser.add_argument_group("harmonization")
    harmony.add_argument("--method", choices=list(HARMONIZERS), default="histmatch",
                         help="harmonizer (default: %(default)s)")
    harmony.add_argument("--model", metavar="DIR", default=None,
                         help="a fitted harmonizer (default: the one the group level saved "
                              "under OUTPUT_DIR/models/)")
    harmony.add_argument("--preset", choices=list(Preset), default=None,
                         help="size of a learned harmonizer trained at the group level "
                              "(cpu: 10-45 min on 2 CPU cores at 2 mm; fast: one GPU; "
                              "paper: the paper's scale; tiny: tests; auto: cpu without a "
                              "GPU, else fast); default: the method's own, "
                              f"{_default_presets(HARMONIZERS)}; methods without presets "
                              "refuse it")
    harmony.add_argument("--harmonizer-param", dest="harmonizer_params", action="extend",
                         nargs="+", type=key_value, default=[], metavar="KEY=VALUE",
                         help="parameters of --method (repeatable; each is typed and checked "
                              "against the method's own, the last value of a key wins): "
                              f"{_parameter_help(HARMONIZERS)}")
    harmony.add_argument("--device", type=device, default="auto",
                         help="auto (default), cpu, cuda or cuda:N (learned harmonizers)")

    preproc = parser.add_argument_group("preprocessing")
    preproc.add_argument("--template", default=None,
                         help="TemplateFlow template (default MNI152NLin2009cAsym when "
                              "available, else the bundled MNI152NLin2009aSym)")
    preproc.add_argument("--resolution", type=int, choices=[1, 2], default=1,
                         help="template grid spacing in mm (default: %(default)s)")
    preproc.add_argument("--output-spaces", nargs="+", default=["template"],
                         metavar="SPACE",
                         help="'template' (default; or its name) and/or T1w (also resample to "
                              "each image's native grid)")
    preproc.add_argument("--registration", choices=["affine", "syn"], default="affine",
                         help="rigid + affine (default), or rigid + affine + SyN")
    preproc.add_argument("--skull-stripped", nargs="?", const="yes", default="auto",
                         choices=["auto", "yes", "no"],
                         help="whether inputs are already brain-extracted (default auto: "
                              "detect; the bare flag means yes)")
    preproc.add_argument("--edge-ratio", type=ratio, default=0.08,
                         help="fraction of the image's voxels the 3D Canny edge map keeps, "
                              "threshold searched per image as in BlindHarmonyDiff (every edge "
                              "in the brain where fewer exist; default: %(default)s)")
    preproc.add_argument("--seed", type=int, default=42,
                         help="random seed (default: %(default)s)")

    perf = parser.add_argument_group("performance and bookkeeping")
    perf.add_argument("-w", "--work-dir", default=None,
                      help="working directory (default: OUTPUT_DIR/.bids_harmony_work)")
    perf.add_argument("--nprocs", type=positive_int, default=1,
                      help="parallel processes (default: %(default)s)")
    perf.add_argument("--omp-nthreads", type=positive_int, default=1,
                      help="threads per process for registration (default: %(default)s)")
    perf.add_argument("--mem-gb", type=positive_float, default=None,
                      help="memory limit in GB")
    perf.add_argument("--plugin", choices=list(NIPYPE_PLUGINS), default=None,
                      help="Nipype execution plugin (default: MultiProc with --nprocs > 1, "
                           "else Linear); SLURM, SGE, PBS, LSF, Condor and OAR submit each "
                           "step as a job and wait; SLURMGraph, SGEGraph, PBSGraph and DAGMan "
                           "submit the whole graph and return (participant level only)")
    perf.add_argument("--plugin-args", type=plugin_args, default=None, metavar="JSON|FILE",
                      help="the plugin's arguments: a JSON object or a JSON/YAML file, e.g. "
                           "'{\"sbatch_args\": \"-p short -t 30\"}' (MultiProc: n_procs and "
                           "memory_gb come from --nprocs and --mem-gb unless given here)")
    perf.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                      help="skip images whose outputs already exist (default: on)")
    perf.add_argument("-v", "--verbose", action="count", default=0,
                      help="more logging (repeat for debug)")
    _apply_file_values(parser, file_values, source)
    return parser


def _default_presets(registry: HarmonizerRegistry) -> str:
    """``fast (blindharmony, blindharmonydiff)``: each default preset and its methods."""
    by_preset: dict[str, list[str]] = {}
    for info in registry.methods.values():
        if info.default_preset is not None:
            by_preset.setdefault(info.default_preset, []).append(info.name)
    return "; ".join(f"{preset} ({', '.join(names)})" for preset, names in by_preset.items())


def _parameter_help(registry: HarmonizerRegistry) -> str:
    """Every method's parameter names and kinds: what ``--harmonizer-param`` accepts."""
    described = []
    for info in registry.methods.values():
        names = ", ".join(f"{p.name} ({p.kind})" for p in info.parameters()) or "none"
        described.append(f"{info.name}: {names}")
    return "; ".join(described)


def _apply_file_values(parser: argparse.ArgumentParser, file_values: Mapping[str, Any],
                       source: str) -> None:
    """Make ``file_values`` the parser's defaults after the options' own checks."""
    actions = {action.dest: action for action in parser._actions}
    for dest, value in file_values.items():
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"{source}: '{dest}' is no option of bids_harmony; remove it")
        for item in value if isinstance(value, list) else [value]:
            _check_file_value(action, item, source)
    parser.set_defaults(**{dest: value for dest, value in file_values.items()
                           if dest not in POSITIONALS})


def _check_file_value(action: argparse.Action, value: Any, source: str) -> None:
    """The check argparse makes of a command-line value: ``type``, then ``choices``."""
    flag = next((f for f in action.option_strings if f.startswith("--")), action.dest)
    try:
        if action.type is not None and not isinstance(value, tuple):
            value = action.type(str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
        raise UsageError(f"{source}: {action.dest} = {value!r} is refused by {flag} ({error}); "
                         "fix the file") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise UsageError(f"{source}: {action.dest} = {value!r} is not one of {choices}; "
                         "fix the file")
