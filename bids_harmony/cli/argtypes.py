"""argparse value types of the command line (the Boutiques descriptor reads their bounds)."""

from __future__ import annotations

import argparse

from bids_harmony.config import DEVICE_PATTERN


def device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"'{value}' is not auto, cpu, cuda or cuda:N")
    return value


def positive_int(value: str) -> int:
    """An integer of 1 or more."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return number


def positive_float(value: str) -> float:
    """A number greater than 0."""
    number = float(value)
    if not number > 0.0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return number


def ratio(value: str) -> float:
    """A number strictly between 0 and 1."""
    number = float(value)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must lie strictly between 0 and 1")
    return number


def key_value(value: str) -> tuple[str, str]:
    """``KEY=VALUE``: one harmonizer parameter, typed later by the method's schema."""
    key, separator, text = value.partition("=")
    if not separator or not key.strip() or not text:
        raise argparse.ArgumentTypeError(f"'{value}' is not KEY=VALUE (e.g. n_quantiles=512)")
    return key.strip(), text


def plugin_args(value: str) -> str:
    """``--plugin-args``: a JSON object, or the path of a JSON or YAML file holding one (what
    Nipype's execution plugin receives as ``plugin_args``); returned as compact JSON, so the
    run's config.toml keeps the values even when a file gave them."""
    import json
    from pathlib import Path

    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"'{value}' is neither a JSON object nor a file")
        text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except ValueError:
        import yaml

        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise argparse.ArgumentTypeError(
                f"'{value}' is neither JSON nor YAML ({str(error).splitlines()[0]})"
            ) from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"'{value}' does not hold a JSON object of "
                                         "plugin arguments (e.g. {\"sbatch_args\": \"-p short\"})")
    return json.dumps(parsed, sort_keys=True)
