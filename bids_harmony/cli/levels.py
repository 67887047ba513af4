"""The two BIDS-Apps levels: what each one indexes, runs, fits and writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bids_harmony.bids.derivatives import write_dataset_description
from bids_harmony.bids.layout import (
    AnatImage,
    build_layout,
    collect_images,
    site_table,
    traveling_subjects,
    validate_bids,
)
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles, resolve_template
from bids_harmony.errors import DataError, HarmonyError, InputMissingError, UsageError
from bids_harmony.fileio import atomic_write_text, write_tsv
from bids_harmony.harmonizers.base import model_checksum
from bids_harmony.workflows.citations import Methods, compose_methods

LOGGER = logging.getLogger("bids_harmony")
CITATION_FILE = "CITATION.md"


@dataclass(frozen=True)
class RunContext:
    """What both levels need: the selected images and the template."""

    images: list[AnatImage]
    template: TemplateFiles


def prepare(config: RunConfig) -> RunContext:
    """Validate, index, resolve sites and the template; write sites.tsv."""
    if not config.skip_bids_validation:
        validate_bids(config.bids_dir)
    layout = build_layout(config.bids_dir, config.work_dir)
    images = collect_images(
        layout,
        participants=config.participant_label,
        sessions=config.session_label,
        suffixes=config.suffix,
        site_column=config.site_column,
        site_map=config.site_map,
    )
    known_sites = sorted({image.site for image in images})
    if config.target_site not in ("auto", "unified", *known_sites):
        raise DataError(
            f"--target-site '{config.target_site}' is not a site of the selected images; "
            f"known sites: {', '.join(known_sites)} (or use auto / unified)"
        )
    template = resolve_template(config.template, config.resolution, config.work_dir)
    write_dataset_description(config.output_dir, config.bids_dir)
    _write_sites(config.output_dir, images)
    return RunContext(images, template)


def run_participant(config: RunConfig) -> None:
    """Preprocess every selected image and harmonize it when a fitted model exists."""
    context = prepare(config)
    model_dir = find_model(config)
    if model_dir is None:
        LOGGER.warning(
            "no fitted '%s' model under %s: writing preprocessing outputs only; fit one with "
            "`bids_harmony %s %s group --method %s`, then rerun the participant level",
            config.method, config.output_dir / "models", config.bids_dir, config.output_dir,
            config.method,
        )
    else:
        LOGGER.info("harmonizing with the model in %s", model_dir)
    description = preprocess(config, context, model_dir)
    write_citation(config.output_dir, compose_methods([description]))


def run_group(config: RunConfig) -> None:
    """Preprocess what is missing, fit the harmonizer on all images, write group QC."""
    from bids_harmony.reports import write_group_outputs
    from bids_harmony.workflows.group import fit_group
    from bids_harmony.workflows.harmonize import harmonization_desc

    context = prepare(config)
    description = preprocess(config, context, model_dir=None)
    fit = fit_group(config, context.images, context.template)
    n_sites = len({image.site for image in context.images})
    methods = compose_methods([description, harmonization_desc(
        config.method, fit.harmonizer.target_site_,
        fitted_on=f"{len(context.images)} images from {n_sites} sites at the group level",
    )])
    write_citation(config.output_dir, methods)
    write_group_outputs(config.output_dir, config.bids_dir, fit, methods)


def preprocess(config: RunConfig, context: RunContext, model_dir: Path | None) -> str:
    """Run the Nipype workflow on the images whose outputs are not all there yet; return
    its methods text (that of every image when all are complete)."""
    from bids_harmony.workflows.base import expected_outputs, init_bids_harmony_wf

    checksum = model_checksum(model_dir) if model_dir is not None else None
    todo = [
        image for image in context.images
        if not (config.resume and _is_complete(
            expected_outputs(config, image, context.template, model_dir is not None), checksum
        ))
    ]
    skipped = len(context.images) - len(todo)
    if skipped:
        LOGGER.info("resuming: %d of %d images already complete", skipped, len(context.images))
    selected = _with_session_references(todo, context.images) if todo else context.images
    workflow = init_bids_harmony_wf(config, selected, context.template, model_dir)
    if todo:
        _run_workflow(workflow, config)
    return workflow.visit_desc()


def write_citation(output_dir: Path, methods: Methods) -> Path:
    """``OUTPUT_DIR/logs/CITATION.md``: the methods text to cite, as sMRIPrep writes it."""
    path = output_dir / "logs" / CITATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, methods.to_markdown())
    return path


def _is_complete(outputs: Sequence[Path], checksum: str | None) -> bool:
    """Every expected sidecar exists and the harmonized ones record the model ``checksum``: an
    image harmonized by an earlier model (another method or a refit) is done again."""
    if not all(path.is_file() for path in outputs):
        return False
    if checksum is None:
        return True
    return all(
        json.loads(path.read_text()).get("ModelChecksum") == checksum
        for path in outputs if "_desc-harmonized_" in path.name
    )


def find_model(config: RunConfig) -> Path | None:
    """``--model`` or the single model the group level saved for ``--method``."""
    if config.model is not None:
        if not (config.model / "model_card.json").is_file():
            raise InputMissingError(
                f"--model {config.model} has no model_card.json; point it at a folder the "
                "group level wrote under OUTPUT_DIR/models/"
            )
        return config.model
    candidates = sorted((config.output_dir / "models").glob(f"{config.method}_*/model_card.json"))
    if len(candidates) > 1:
        raise UsageError(
            f"several {config.method} models in {config.output_dir / 'models'} "
            f"({', '.join(c.parent.name for c in candidates)}); choose one with --model DIR"
        )
    return candidates[0].parent if candidates else None


def _with_session_references(todo: Sequence[AnatImage],
                             everything: Sequence[AnatImage]) -> list[AnatImage]:
    """Add the session's T1w to any T2w-like image that is registered through it."""
    selected = list(todo)
    keys = {im.key for im in selected}
    wanted_sessions = {(im.subject, im.session) for im in todo if im.suffix != "T1w"}
    for image in everything:
        if (image.suffix == "T1w" and (image.subject, image.session) in wanted_sessions
                and image.key not in keys):
            selected.append(image)
    return selected


def _run_workflow(workflow: object, config: RunConfig) -> None:
    """Run with MultiProc when more than one process is allowed; summarise failures."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    workflow.config["execution"].update({  # type: ignore[attr-defined]
        "crashdump_dir": str(config.log_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "hash_method": "content",
        "remove_unnecessary_outputs": False,
    })
    plugin_args: dict[str, object] = {"n_procs": config.nprocs, "raise_insufficient": False}
    if config.mem_gb:
        plugin_args["memory_gb"] = config.mem_gb
    plugin = "MultiProc" if config.nprocs > 1 else "Linear"
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)  # type: ignore[attr-defined]
    except RuntimeError as error:
        raise HarmonyError(_first_crash_message(config.log_dir) or str(error)) from None


def _first_crash_message(log_dir: Path) -> str | None:
    """The last line of the first crash file: usually our one-line error."""
    crashes = sorted(log_dir.glob("crash-*.txt"))
    if not crashes:
        return None
    lines = [line.strip() for line in crashes[0].read_text().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    detail = errors[-1] if errors else lines[-1]
    return f"{len(crashes)} step(s) failed; first: {detail} (details: {crashes[0]})"


def _write_sites(output_dir: Path, images: Sequence[AnatImage]) -> None:
    """Print and write OUTPUT_DIR/sites.tsv; list traveling subjects."""
    rows = site_table(images)
    write_tsv(output_dir / "sites.tsv", rows, ["site", "suffix", "count", "found_in"])
    for row in rows:
        LOGGER.info("site %-24s %-6s %3d images (from %s)", row["site"], row["suffix"],
                    row["count"], row["found_in"])
    travelers = traveling_subjects(images)
    if travelers:
        LOGGER.info("traveling subjects (same participant, several sites): %s",
                    ", ".join(f"sub-{s} ({'/'.join(v)})" for s, v in travelers.items()))
