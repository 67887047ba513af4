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

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_harmony.errors import (
    DataError,
    EmptySelectionError,
    InputMissingError,
    UsageError,
    ValidationError,
)

if TYPE_CHECKING:
    from bids import BIDSLayout

#: The site column read when ``--site-column`` is not given; only a column the user named
#: must exist.
DEFAULT_SITE_COLUMN = "site"
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
    content = _read_json(description, ValidationError)
    missing = [key for key in ("Name", "BIDSVersion")
               if not isinstance(content.get(key), str) or not content[key].strip()]
    if missing:
        raise ValidationError(
            f"{description} lacks {' and '.join(missing)}, which BIDS requires; add them "
            "(e.g. \"Name\": \"my study\", \"BIDSVersion\": \"1.9.0\") or pass "
            "--skip-bids-validation"
        )
    validator = BIDSValidator()
    for path in sorted(bids_dir.glob("sub-*/**/*")):
        if path.is_file() and not path.name.startswith("."):
            relative = "/" + path.relative_to(bids_dir).as_posix()
            if not validator.is_bids(relative):
                raise ValidationError(
                    f"{path} is not a valid BIDS file name; rename it, add it to .bidsignore, "
                    "or pass --skip-bids-validation"
                )


def check_json_files(bids_dir: Path) -> None:
    """Every JSON file pybids will read (the description, sidecars, inherited ones) must be
    a JSON object: pybids raises deep inside ``BIDSLayout`` otherwise. Checked even with
    ``--skip-bids-validation``, because indexing needs them."""
    for root, dirs, files in os.walk(bids_dir):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_INDEXED and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".json") and not name.startswith("."):
                _read_json(Path(root) / name, DataError)


def _read_json(path: Path, error: type[DataError] | type[ValidationError]) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` with one line naming the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); fix or remove the file") from None
    if not isinstance(content, dict):
        raise error(f"{path} holds a JSON {type(content).__name__}, not an object "
                    "({\"Key\": value, ...}); fix the file")
    return content


#: Folders pybids does not index here (``derivatives=False``, no source data).
_NOT_INDEXED = ("derivatives", "sourcedata", "code", ".git")


def build_layout(bids_dir: Path, work_dir: Path) -> BIDSLayout:
    """A pybids layout whose database is cached in the work directory.

    The cache is keyed by the dataset's listing (names, sizes, mtimes), so an edited dataset
    is re-indexed rather than read from a stale database.
    """
    from bids import BIDSLayout

    listing = hashlib.sha256()
    for root, dirs, files in os.walk(bids_dir):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_INDEXED)
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            listing.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    database = work_dir / "bids_db" / listing.hexdigest()[:16]
    if not database.is_dir():
        # Built beside its final name and renamed into place: a parallel job (a SLURM array
        # on one output) either sees a complete database or builds its own.
        staging = database.with_name(f".{database.name}.{os.getpid()}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        BIDSLayout(str(bids_dir), validate=False, derivatives=False,
                   database_path=str(staging), reset_database=True)
        try:
            os.rename(staging, database)
        except OSError:  # another job renamed its copy first: use that one
            shutil.rmtree(staging, ignore_errors=True)
    return BIDSLayout(str(bids_dir), validate=False, derivatives=False,
                      database_path=str(database), reset_database=False)


def collect_images(
    layout: BIDSLayout,
    *,
    participants: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
    site_column: str = "site",
    site_map: Path | None = None,
    skip_unresolved: bool = False,
) -> list[AnatImage]:
    """Select anatomical images by participant, session and suffix and give each a site
    (``skip_unresolved``: leave out, rather than refuse, an image with no site)."""
    bids_dir = Path(layout.root)
    known_subjects = _subjects(layout)
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
    _check_names([Path(f.path) for f in files])
    resolver = SiteResolver(bids_dir, site_column=site_column, site_map=site_map)
    images = []
    for bids_file in files:
        entities = bids_file.get_entities()
        subject, session = entities["subject"], entities.get("session")
        try:
            site, source = resolver.site_of(Path(bids_file.path), subject, session,
                                             layout.get_metadata(bids_file.path))
        except DataError:
            if skip_unresolved:
                continue
            raise
        images.append(AnatImage(
            path=Path(bids_file.path), subject=subject, session=session,
            suffix=entities["suffix"], site=site, site_source=source, entities=entities,
        ))
    return images


def _subjects(layout: BIDSLayout) -> set[str]:
    """The dataset's subject labels from the database's entity table in one query.

    ``layout.get_subjects()`` reads every file's entities one ORM query at a time: 4.6 s at
    4,000 participants, paid twice by every participant job of an array (this: 0.13 s).
    """
    subject = layout.get_entities(metadata=False).get("subject")
    return set() if subject is None else {str(label) for label in subject.unique()}


#: A BIDS file name: ``key-label`` entities of letters and digits, then the suffix.
_BIDS_NAME = re.compile(r"^([A-Za-z]+-[A-Za-z0-9]+_)+[A-Za-z0-9]+\.nii(\.gz)?$")


def _check_names(paths: Sequence[Path]) -> None:
    """Refuse file names whose labels hold characters BIDS does not allow (a space, a dot):
    derivative names are built from the parsed entities, which drop them, so the outputs of
    ``acq-my scan`` would land under ``acq-my`` (and the resume check would never find them,
    or two inputs would write one output). Checked even with ``--skip-bids-validation``."""
    bad = [path for path in paths if not _BIDS_NAME.match(path.name)]
    if bad:
        raise DataError(
            f"{len(bad)} image name(s) hold characters BIDS labels do not allow (only letters "
            f"and digits after each 'key-'): {' | '.join(map(str, bad))}; rename them"
        )


class SiteResolver:
    """Answer "which site acquired this image?" in the documented order of sources."""

    def __init__(self, bids_dir: Path, *, site_column: str, site_map: Path | None) -> None:
        self.bids_dir = bids_dir
        self.site_column = site_column
        self.site_map = _read_site_map(site_map) if site_map else {}
        self.participants = _read_tsv_column(bids_dir / "participants.tsv", "participant_id",
                                             site_column)
        self._sessions: dict[str, dict[str, str]] = {}
        if site_column != DEFAULT_SITE_COLUMN:
            self._check_column_exists()

    def _check_column_exists(self) -> None:
        """A ``--site-column`` the user named must be somewhere: silently falling back to
        the sidecars would give every image a scanner label instead."""
        tables = [self.bids_dir / "participants.tsv",
                  *sorted(self.bids_dir.glob("sub-*/sub-*_sessions.tsv"))]
        headers: set[str] = set()
        for table in tables:
            if table.is_file():
                rows = read_tsv(table)
                headers.update(rows[0] if rows else ())
        if self.site_column not in headers:
            raise UsageError(
                f"--site-column '{self.site_column}' is in neither participants.tsv nor any "
                f"sessions.tsv of {self.bids_dir} (columns: {', '.join(sorted(headers)) or 'none'}"
                "); name an existing column or use --site-map"
            )

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


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a BIDS TSV, read strictly: a UTF-8 byte-order mark and stray spaces around
    headers and cells are dropped (spreadsheets add both); a row with more cells than the
    header is an error naming its line, one with fewer (trailing tabs trimmed by an editor)
    has its last cells empty."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    lines = [line.rstrip("\r") for line in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        return []
    header = [cell.strip() for cell in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) > len(header):
            raise DataError(f"{path} line {number} has {len(cells)} tab-separated cells where "
                            f"the header has {len(header)}; fix the row")
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def _keyed_column(path: Path, rows: list[dict[str, str]], keys: Sequence[str],
                  column: str) -> dict[tuple[str | None, ...], str]:
    """``keys`` -> ``column`` of ``rows``; a key listed twice is an error naming both lines
    (two sites for one participant would otherwise be decided by row order)."""
    found: dict[tuple[str | None, ...], tuple[int, str]] = {}
    for number, row in enumerate(rows, start=2):
        value = row.get(column, "")
        if value in ("", "n/a"):
            continue
        key = tuple(_strip_prefix(row[k]) if row.get(k) not in (None, "", "n/a") else None
                    for k in keys)
        if key in found:
            first, earlier = found[key]
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, key) if v is not None)
            same = "the same site twice" if earlier == value else f"'{earlier}' and '{value}'"
            raise DataError(f"{path} lists {label} on lines {first} and {number} with {same}; "
                            "keep one row per participant (and session)")
        found[key] = (number, value)
    return {key: value for key, (_, value) in found.items()}


def _read_tsv_column(path: Path, key: str, column: str) -> dict[str, str]:
    """Map ``key`` -> ``column`` of a BIDS TSV (``sub-``/``ses-`` prefixes removed)."""
    if not path.is_file():
        return {}
    rows = read_tsv(path)
    if not rows or column not in rows[0] or key not in rows[0]:
        return {}
    return {k[0]: v for k, v in _keyed_column(path, rows, [key], column).items()
            if k[0] is not None}


def _read_site_map(path: Path) -> dict[tuple[str, str | None], str]:
    if not path.is_file():
        raise InputMissingError(f"--site-map {path} does not exist; give a readable TSV file")
    rows = read_tsv(path)
    if not rows or not {"participant_id", "site"} <= set(rows[0]):
        raise DataError(
            f"{path} needs tab-separated columns participant_id, site (and optionally "
            "session_id); fix its header"
        )
    keyed = _keyed_column(path, rows, ["participant_id", "session_id"], "site")
    return {(str(k[0]), k[1]): value for k, value in keyed.items()}


def _strip_prefix(label: str) -> str:
    return re.sub(r"^(sub|ses)-", "", label.strip())
