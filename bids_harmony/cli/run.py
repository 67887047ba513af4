"""``bids_harmony BIDS_DIR OUTPUT_DIR {participant,group}``: parse, validate, run, exit code.

The CLI is a boundary: every problem with the command line or the input becomes one line
on stderr and a BIDS-Apps exit code; heavy imports wait until they are needed so ``--help``
and ``--version`` are instant.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_harmony.errors import (
    ExitCode,
    HarmonyError,
    InputMissingError,
    OutputError,
    UsageError,
    from_os_error,
)
from bids_harmony.workflows.plugins import SUBMIT_AND_RETURN

if TYPE_CHECKING:
    import argparse

    from bids_harmony.config import RunConfig

LOGGER = logging.getLogger("bids_harmony")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bids_harmony`` console script."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bids_harmony.cli.parser import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    config: RunConfig | None = None
    try:
        config_file = _config_file(argv)
        file_values = _config_file_values(config_file) if config_file else {}
        args = build_parser(file_values, f"--config {config_file}").parse_args(argv)
        config = build_config(args)
        _setup_logging(config.verbose, config.log_dir)
        LOGGER.info("bids_harmony run %s: config written to %s", config.run_id,
                    config.write_toml())
        from bids_harmony.cli.levels import run_group, run_participant

        if config.analysis_level == "participant":
            run_participant(config)
        else:
            run_group(config)
    except HarmonyError as error:
        print(f"bids_harmony: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print("bids_harmony: interrupted; rerun the same command to resume", file=sys.stderr)
        return int(ExitCode.FAILURE)
    except OSError as error:
        mapped = from_os_error(error, "the run stopped")
        print(f"bids_harmony: error: {mapped}{_crash_note(config)}", file=sys.stderr)
        return int(mapped.exit_code)
    except Exception as error:  # noqa: BLE001 (the boundary: one line, details in a file)
        print(f"bids_harmony: error: unexpected {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else 'no message'}"
              f"{_crash_note(config)}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)


def _crash_note(config: RunConfig | None) -> str:
    """Write the traceback being handled to the run's log folder (before there is one, the
    temporary folder); say where it went."""
    import tempfile
    import traceback

    folder = config.log_dir if config is not None else Path(tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-bids_harmony-{os.getpid()}.txt"
        path.write_text(traceback.format_exc())
    except OSError:
        return ""
    return f" (details: {path})"


def _config_file(argv: list[str]) -> str | None:
    """The ``--config FILE`` of ``argv``, read before the real parse (its values become
    that parse's defaults)."""
    from bids_harmony.cli.parser import BIDSAppArgumentParser

    first_pass = BIDSAppArgumentParser(prog="bids_harmony", add_help=False)
    first_pass.add_argument("--config", default=None)
    return first_pass.parse_known_args(argv)[0].config


def _config_file_values(path: str) -> dict[str, Any]:
    """A config file's options as argparse would hold them (the run id is the new run's)."""
    from bids_harmony.config import read_toml_values

    values = read_toml_values(Path(path))
    values.pop("run_id", None)
    return {name: _as_argument(value) for name, value in values.items()}


def _as_argument(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _checked_harmonizer_params(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--harmonizer-param`` pairs (the last value of a key wins) checked with ``--method``
    and ``--preset`` against the method's schema; the group level builds the harmonizer, so
    that its own range checks fail now rather than after preprocessing."""
    from bids_harmony.harmonizers.registry import HARMONIZERS, from_options

    params = dict(args.harmonizer_params)
    if args.analysis_level == "group":
        from_options(args.method, preset=args.preset, device=args.device, seed=args.seed,
                     params=params)
    else:
        info = HARMONIZERS.info(args.method)
        info.parse_params(info.check_preset(args.preset), params)
    return tuple(params.items())


def build_config(args: argparse.Namespace) -> RunConfig:
    """Check paths and labels at the boundary and freeze them into a ``RunConfig``."""
    from bids_harmony.config import AnalysisLevel, Registration, RunConfig, SkullStripped

    params = _checked_harmonizer_params(args)
    _check_device(args.device)
    _check_plugin(args.plugin, args.analysis_level)
    bids_dir = Path(args.bids_dir).resolve()
    output_dir = Path(args.output_dir).resolve()
    if not bids_dir.is_dir():
        raise InputMissingError(f"BIDS_DIR {bids_dir} does not exist; give the dataset root")
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is inside the input dataset {bids_dir}, which is never "
            "written to; choose a folder outside it (e.g. BIDS_DIR/../derivatives/bids_harmony)"
        )
    work_dir = (Path(args.work_dir) if args.work_dir else output_dir / ".bids_harmony_work")
    work_dir = work_dir.resolve()
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(f"--work-dir {work_dir} is inside the input dataset; move it outside")
    for optional in ("site_map", "model"):
        value = getattr(args, optional)
        if value and not Path(value).exists():
            flag = "--" + optional.replace("_", "-")
            raise InputMissingError(f"{flag} {value} does not exist; check the path")
    for folder in (output_dir, work_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise OutputError(f"cannot write to {folder} ({error.strerror}); choose a writable "
                              "folder or fix its permissions") from None
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=AnalysisLevel(args.analysis_level),
        work_dir=work_dir,
        run_id=run_id,
        participant_label=tuple(_strip(label, "sub-") for label in args.participant_label),
        session_label=tuple(_strip(label, "ses-") for label in args.session_label),
        suffix=tuple(args.suffix),
        method=args.method,
        target_site=args.target_site,
        site_column=args.site_column,
        site_map=Path(args.site_map).resolve() if args.site_map else None,
        model=Path(args.model).resolve() if args.model else None,
        preset=args.preset,
        harmonizer_params=params,
        device=args.device,
        template=args.template,
        resolution=args.resolution,
        output_spaces=tuple(args.output_spaces),
        registration=Registration(args.registration),
        skull_stripped=SkullStripped(args.skull_stripped),
        edge_ratio=args.edge_ratio,
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        mem_gb=args.mem_gb,
        plugin=args.plugin,
        plugin_args=args.plugin_args,
        skip_bids_validation=args.skip_bids_validation,
        skip_image_checks=args.skip_image_checks,
        keep_flagged=args.keep_flagged,
        resume=args.resume,
        seed=args.seed,
        verbose=args.verbose,
    )


def _check_device(device: str) -> None:
    """``--device cuda[:N]`` needs that GPU now, not after preprocessing (torch is imported
    only when a GPU is asked for, so CPU runs start fast)."""
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise UsageError(f"--device {device}: torch {torch.__version__} sees {seen}; use "
                         "--device auto or cpu, or run on a machine with that GPU")


def _check_plugin(plugin: str | None, level: str) -> None:
    """A plugin that submits the graph and returns cannot precede the group level's fit."""
    if level == "group" and plugin in SUBMIT_AND_RETURN:
        raise UsageError(
            f"--plugin {plugin} submits the workflow and returns before it has run, so the "
            "group level could not fit on its results; run the participant level with it, "
            "then the group level with --plugin SLURM (or MultiProc) once its jobs are done"
        )


def _strip(label: str, prefix: str) -> str:
    return label[len(prefix):] if label.startswith(prefix) else label


def _setup_logging(verbose: int, log_dir: Path) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s bids_harmony %(levelname)s: %(message)s",
                                           "%H:%M:%S"))
    file_handler = logging.FileHandler(log_dir / "bids_harmony.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    LOGGER.handlers[:] = [handler, file_handler]
    LOGGER.setLevel(logging.DEBUG)
    handler.setLevel(level)
    nipype_logger = logging.getLogger("nipype.workflow")
    nipype_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    nipype_logger.filters[:] = [_first_line_only]


def _first_line_only(record: logging.LogRecord) -> bool:
    """Keep Nipype's crash reports to their first line on the console: the traceback is in
    the crash file that line names, and our own summary follows."""
    message = record.getMessage()
    if "\n" in message:
        record.msg, record.args = message.splitlines()[0], ()
    return True


if __name__ == "__main__":
    raise SystemExit(main())
