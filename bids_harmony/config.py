"""One frozen run configuration, built by the CLI and written next to the outputs as TOML.

The snapshot ``logs/<run>/config.toml`` reads back with :meth:`RunConfig.from_toml` (and
``bids_harmony --config FILE``), so a run can be replayed.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from bids_harmony.errors import InputMissingError, UsageError

TOML_TABLE = "bids_harmony"


class StrEnum(str, Enum):
    """``str`` enum whose value is what the command line and TOML show."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        """The bare value, so argparse's "choose from" lists read 'fast', not <Preset...>."""
        return repr(self.value)


class AnalysisLevel(StrEnum):
    PARTICIPANT = "participant"
    GROUP = "group"


class Registration(StrEnum):
    AFFINE = "affine"
    SYN = "syn"


class SkullStripped(StrEnum):
    AUTO = "auto"
    YES = "yes"
    NO = "no"


NATIVE_SPACES = ("T1w", "native")
#: Devices a learned harmonizer accepts: the command line and the harmonizers share the rule.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the top-level workflow factory is the only reader."""

    bids_dir: Path
    output_dir: Path
    analysis_level: AnalysisLevel
    work_dir: Path
    run_id: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    method: str = "histmatch"
    target_site: str = "auto"
    site_column: str = "site"
    site_map: Path | None = None
    model: Path | None = None
    #: ``None``: the method's own default preset (learned methods only have presets).
    preset: str | None = None
    #: ``--harmonizer-param KEY=VALUE`` as given (strings, typed by the method's schema).
    harmonizer_params: tuple[tuple[str, str], ...] = ()
    device: str = "auto"
    template: str | None = None
    resolution: int = 1
    output_spaces: tuple[str, ...] = ("template",)
    registration: Registration = Registration.AFFINE
    skull_stripped: SkullStripped = SkullStripped.AUTO
    edge_ratio: float = 0.08
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    #: Nipype execution plugin (``None``: MultiProc with ``nprocs`` > 1, else Linear).
    plugin: str | None = None
    #: ``--plugin-args`` as compact JSON text (an object).
    plugin_args: str | None = None
    skip_bids_validation: bool = False
    skip_image_checks: bool = False
    keep_flagged: bool = False
    resume: bool = True
    seed: int = 42
    verbose: int = 0

    @property
    def native_output(self) -> bool:
        """Whether harmonized images are also resampled back to the subject's grid."""
        return any(space in NATIVE_SPACES for space in self.output_spaces)

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "logs" / self.run_id

    def to_toml_dict(self) -> dict[str, Any]:
        """Plain types only (TOML has no None: unset options are left out)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            elif field.name == "harmonizer_params":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return {TOML_TABLE: out}

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        """The configuration a ``write_toml`` snapshot (or a hand-written file) holds."""
        values = read_toml_values(path)
        missing = [field.name for field in dataclasses.fields(cls)
                   if field.default is dataclasses.MISSING and field.name not in values]
        if missing:
            raise UsageError(f"{path} lacks {', '.join(missing)}; add them under "
                             f"[{TOML_TABLE}] or give them on the command line")
        return cls(**values)

    def write_toml(self) -> Path:
        """Snapshot the resolved configuration under ``OUTPUT_DIR/logs/<run-id>/config.toml``."""
        import tomli_w

        from bids_harmony.fileio import atomic_write_text

        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "config.toml"
        atomic_write_text(path, tomli_w.dumps(self.to_toml_dict()))
        return path


def read_toml_values(path: Path) -> dict[str, Any]:
    """The ``[bids_harmony]`` table of a config file, typed as ``RunConfig`` fields; keys
    may be missing (``--config`` fills in the rest from the command line)."""
    import tomllib

    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get(TOML_TABLE)
    except FileNotFoundError:
        raise InputMissingError(f"--config {path} not found; check the path") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror}); check the "
                         "path") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path} is not valid TOML ({error}); fix the file") from None
    if not isinstance(table, dict):
        raise UsageError(f"--config {path} has no [{TOML_TABLE}] table; write the options "
                         "under it (as logs/<run>/config.toml does)")
    hints = get_type_hints(RunConfig)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(hints)}")
    return {name: _typed(name, hints[name], value, path) for name, value in table.items()}


def _typed(name: str, hint: Any, value: Any, path: Path) -> Any:
    """A TOML value as the ``RunConfig`` field ``name`` holds it."""
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if name == "harmonizer_params":
        if not isinstance(value, dict):
            raise UsageError(f"--config {path}: {name} must be a table of KEY = VALUE; fix it")
        return tuple((str(key), _param_text(item)) for key, item in value.items())
    if get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise UsageError(f"--config {path}: {name} must be a list; fix it")
        return tuple(str(item) for item in value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(member.value for member in hint)
            raise UsageError(f"--config {path}: {name} = {value!r} is not one of {choices}; "
                             "fix it") from None
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UsageError(f"--config {path}: {name} = {value!r} is not a {hint.__name__}; "
                         "fix it")
    return value


def _param_text(value: Any) -> str:
    """A harmonizer parameter written in TOML as the command line spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(_param_text(item) for item in value)
    return str(value)
