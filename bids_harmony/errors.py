"""One exception hierarchy; each error carries the exit code of the BIDS execution-spec draft.

Messages are one line that names the file (or option) at fault and the fix, so the CLI can
print ``str(error)`` and exit with ``error.exit_code`` without a traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the BIDS-Apps execution specification draft."""

    OK = 0
    FAILURE = 1
    VALIDATION_FAILED = 16
    UNKNOWN_LEVEL = 17
    EMPTY_SELECTION = 18
    USAGE = 64
    DATA_ERROR = 65
    INPUT_MISSING = 66
    CANNOT_CREATE_OUTPUT = 73
    IO_ERROR = 74


class HarmonyError(Exception):
    """Base of every error bids_harmony raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(HarmonyError):
    """The command line asks for something inconsistent."""

    exit_code = ExitCode.USAGE


class InputMissingError(HarmonyError):
    """A file or directory the run needs does not exist."""

    exit_code = ExitCode.INPUT_MISSING


class DataError(HarmonyError):
    """The input exists but its content cannot be used (no site, bad image, ...)."""

    exit_code = ExitCode.DATA_ERROR


class ValidationError(HarmonyError):
    """The BIDS validator rejected the input dataset."""

    exit_code = ExitCode.VALIDATION_FAILED


class EmptySelectionError(HarmonyError):
    """The participant/session/suffix filters selected no image."""

    exit_code = ExitCode.EMPTY_SELECTION


class OutputError(HarmonyError):
    """The output or work directory cannot be created or written."""

    exit_code = ExitCode.CANNOT_CREATE_OUTPUT


class IOFailureError(HarmonyError):
    """Reading or writing a file failed at the operating-system level (disk full, I/O)."""

    exit_code = ExitCode.IO_ERROR


class TemplateNotFoundError(InputMissingError):
    """A requested template is neither in the local TemplateFlow home nor downloadable."""


class NotFittedError(HarmonyError):
    """A harmonizer was asked to transform or save before it was fitted."""


def error_class(name: str) -> type[HarmonyError] | None:
    """The error class called ``name`` (as a crash file prints it), or ``None``."""
    pending: list[type[HarmonyError]] = [HarmonyError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def from_os_error(error: OSError, doing: str) -> HarmonyError:
    """One line for an ``OSError`` met while ``doing`` something: a full disk (or quota, or
    file-size limit) or a denied write cannot create output (73), anything else is an I/O
    failure (74)."""
    import errno

    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"{doing}: no space left on{where or ' the output device'} "
                           f"({reason}); free space or choose another output/work folder")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{doing}: cannot write{where} ({reason}); fix its permissions "
                           "or choose another folder")
    return IOFailureError(f"{doing}: I/O error on{where or ' a file'} ({reason}); check the "
                          "disk and rerun (finished images are kept)")
