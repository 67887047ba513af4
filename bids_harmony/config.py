"""One frozen run configuration, built by the CLI and written next to the outputs as TOML."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class StrEnum(str, Enum):
    """``str`` enum whose value is what the command line and TOML show."""

    def __str__(self) -> str:
        return self.value


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
    preset: str = "fast"
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
    skip_bids_validation: bool = False
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
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return {"bids_harmony": out}

    def write_toml(self) -> Path:
        """Snapshot the resolved configuration under ``OUTPUT_DIR/logs/<run-id>/config.toml``."""
        import tomli_w

        from bids_harmony.fileio import atomic_write_text

        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "config.toml"
        atomic_write_text(path, tomli_w.dumps(self.to_toml_dict()))
        return path
