"""Index a BIDS dataset with pybids by site and sequence.

Site of each image, first match wins:

1. ``--site-map`` TSV: ``participant_id`` [, ``session_id``], ``site``;
2. the site column (``--site-column``, default ``site``) of ``sub-*_sessions.tsv``, then of
   ``participants.tsv``;
3. a scanner label built from the JSON sidecar (Manufacturer, ManufacturersModelName,
   MagneticFieldStrength, and InstitutionName/StationName when present).

The same participant seen at several sites is a *traveling subject*; the group level uses
those pairs for paired evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_harmony.errors import DataError, EmptySelectionError, InputMissingError, ValidationError

if TYPE_CHECKING:
    from bids import BIDSLayout

ANATOMICAL_SUFFIXES = ("T1w", "T2w", "PDw", "T2starw", "FLAIR", "T1rho", "PDT2", "inplaneT1")
SCANNER_FIELDS = (
    "Manufacturer", "ManufacturersModelName", "MagneticFieldStrength",
    "InstitutionName", "StationName",
)


@dataclass(frozen=True)
class AnatImage:
    """One anatomical image selected for processing, with where its site came from."""

    path: Path
    subject: str
    session: str | None
    suffix: str
    site: str
    site_source: str
    entities: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """Stable identifier (the file name without extension)."""
        return self.path.name.split(".")[0]


def sanitize_label(text: str) -> str:
    """A BIDS-safe label (alphanumerics): ``Siemens TrioTim 3T`` -> ``SiemensTrioTim3T``."""
    words = re.split(r"[^0-9A-Za-z.]+", text)
    label = "".join(w[:1].upper() + w[1:] for w in words if w).replace(".", "p")
    return label


def validate_bids(bids_dir: Path) -> None:
    """Check the dataset description and every file name under ``sub-*`` against BIDS.

    Uses the Python BIDS validator's file-name rules (the schema-based validator is a Deno
    program the container may not carry); ``--skip-bids-validation`` skips this.
    """
    from bids_validator import BIDSValidator

    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise ValidationError(
            f"{description} is missing; a BIDS dataset needs it (or pass --skip-bids-validation)"
        )
    try:
        json.loads(description.read_text())
    except json.JSONDecodeError as error:
        raise ValidationError(f"{description} is not valid JSON ({error}); fix the file") from None
    validator = BIDSValidator()
    for path in sorted(bids_dir.glob("sub-*/**/*")):
        if path.is_file() and not path.name.startswith("."):
            relative = "/" + path.relative_to(bids_dir).as_posix()
            if not validator.is_bids(relative):
                raise ValidationError(
                    f"{path} is not a valid BIDS file name; rename it, add it to .bidsignore, "
                    "or pass --skip-bids-validation"
                )


def build_layout(bids_dir: Path, work_dir: Path) -> BIDSLayout:
    """A pybids layout whose database is cached in the work directory.

    The cache is keyed by the dataset's listing (names, sizes, mtimes), so an edited dataset
    is re-indexed rather than read from a stale database.
    """
    from bids import BIDSLayout

    listing = hashlib.sha256()
    for root, dirs, files in os.walk(bids_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("derivatives", "sourcedata", ".git"))
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            listing.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    database = work_dir / "bids_db" / listing.hexdigest()[:16]
    return BIDSLayout(
        str(bids_dir), validate=False, derivatives=False,
        database_path=str(database), reset_database=not database.exists(),
    )


def collect_images(
    layout: BIDSLayout,
    *,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
    site_column: str = "site",
    site_map: Path | None = None,
) -> list[AnatImage]:
    """Select anatomical images by participant, session and suffix and give each a site."""
    bids_dir = Path(layout.root)
    known_subjects = set(layout.get_subjects())
    unknown = sorted(set(participants) - known_subjects)
    if unknown:
        raise InputMissingError(
            f"participant(s) {', '.join('sub-' + p for p in unknown)} not found in {bids_dir}; "
            f"available: {', '.join('sub-' + s for s in sorted(known_subjects)) or 'none'}"
        )
    query: dict[str, Any] = {"datatype": "anat", "extension": [".nii", ".nii.gz"]}
    if participants:
        query["subject"] = list(participants)
    if sessions:
        query["session"] = list(sessions)
    wanted = tuple(suffixes) or ANATOMICAL_SUFFIXES
    query["suffix"] = list(wanted)
    files = sorted(layout.get(**query), key=lambda f: f.path)
    if not files:
        raise EmptySelectionError(
            f"no anatomical image in {bids_dir} matches participants={list(participants) or 'all'}"
            f", sessions={list(sessions) or 'all'}, suffixes={list(wanted)}; relax the filters"
        )
    resolver = SiteResolver(bids_dir, site_column=site_column, site_map=site_map)
    images = []
    for bids_file in files:
        entities = bids_file.get_entities()
        subject, session = entities["subject"], entities.get("session")
        site, source = resolver.site_of(Path(bids_file.path), subject, session,
                                         layout.get_metadata(bids_file.path))
        images.append(AnatImage(
            path=Path(bids_file.path), subject=subject, session=session,
            suffix=entities["suffix"], site=site, site_source=source, entities=entities,
        ))
    return images


class SiteResolver:
    """Answer "which site acquired this image?" in the documented order of sources."""

    def __init__(self, bids_dir: Path, *, site_column: str, site_map: Path | None) -> None:
        self.bids_dir = bids_dir
        self.site_column = site_column
        self.site_map = _read_site_map(site_map) if site_map else {}
        self.participants = _read_tsv_column(bids_dir / "participants.tsv", "participant_id",
                                             site_column)
        self._sessions: dict[str, dict[str, str]] = {}

    def site_of(
        self, path: Path, subject: str, session: str | None, metadata: dict[str, Any]
    ) -> tuple[str, str]:
        """Return (site label, how it was found)."""
        for key in ((subject, session), (subject, None)):
            if key in self.site_map:
                return sanitize_label(self.site_map[key]), "site-map"
        if session is not None:
            sessions = self._sessions_of(subject)
            if session in sessions:
                return sanitize_label(sessions[session]), "sessions.tsv"
        if subject in self.participants:
            return sanitize_label(self.participants[subject]), "participants.tsv"
        scanner = [str(metadata[f]) for f in SCANNER_FIELDS if metadata.get(f) not in (None, "")]
        if scanner:
            return sanitize_label(" ".join(scanner)), "sidecar"
        raise DataError(
            f"{path} has no site: add a '{self.site_column}' column to participants.tsv or "
            f"sub-{subject}_sessions.tsv, pass --site-map FILE.tsv, or give its JSON sidecar "
            "scanner fields (Manufacturer, ManufacturersModelName, MagneticFieldStrength)"
        )

    def _sessions_of(self, subject: str) -> dict[str, str]:
        if subject not in self._sessions:
            table = self.bids_dir / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
            self._sessions[subject] = _read_tsv_column(table, "session_id", self.site_column)
        return self._sessions[subject]


def traveling_subjects(images: Iterable[AnatImage]) -> dict[str, list[str]]:
    """Subjects imaged at more than one site, with their sites."""
    sites: dict[str, set[str]] = {}
    for image in images:
        sites.setdefault(image.subject, set()).add(image.site)
    return {subject: sorted(s) for subject, s in sorted(sites.items()) if len(s) > 1}


def traveling_pairs(images: Sequence[AnatImage], target_site: str) -> dict[int, int]:
    """Index of each source-site image -> index of the same subject's target-site image of
    the same sequence: the traveling-subject pairs every paired measure compares."""
    target_of = {(im.subject, im.suffix): k for k, im in enumerate(images)
                 if im.site == target_site}
    return {
        k: target_of[(im.subject, im.suffix)] for k, im in enumerate(images)
        if im.site != target_site and (im.subject, im.suffix) in target_of
    }


def site_table(images: Sequence[AnatImage]) -> list[dict[str, Any]]:
    """Rows of site x sequence x count, with how each site was found."""
    counts = Counter((im.site, im.suffix) for im in images)
    sources: dict[str, set[str]] = {}
    for image in images:
        sources.setdefault(image.site, set()).add(image.site_source)
    return [
        {"site": site, "suffix": suffix, "count": count,
         "found_in": ",".join(sorted(sources[site]))}
        for (site, suffix), count in sorted(counts.items())
    ]


def _read_tsv_column(path: Path, key: str, column: str) -> dict[str, str]:
    """Map ``key`` -> ``column`` of a BIDS TSV (``sub-``/``ses-`` prefixes removed)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or column not in rows[0] or key not in rows[0]:
        return {}
    return {
        _strip_prefix(row[key]): row[column]
        for row in rows if row.get(column) not in (None, "", "n/a")
    }


def _read_site_map(path: Path) -> dict[tuple[str, str | None], str]:
    if not path.is_file():
        raise InputMissingError(f"--site-map {path} does not exist; give a readable TSV file")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or not {"participant_id", "site"} <= set(rows[0]):
        raise DataError(
            f"{path} needs tab-separated columns participant_id, site (and optionally "
            "session_id); fix its header"
        )
    return {
        (_strip_prefix(row["participant_id"]),
         _strip_prefix(row["session_id"]) if row.get("session_id") else None): row["site"]
        for row in rows
    }


def _strip_prefix(label: str) -> str:
    return re.sub(r"^(sub|ses)-", "", label.strip())
