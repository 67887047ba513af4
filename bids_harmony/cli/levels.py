"""The two BIDS-Apps levels: what each one indexes, runs, fits and writes."""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bids_harmony.bids.derivatives import write_dataset_description
from bids_harmony.bids.layout import (
    AnatImage,
    build_layout,
    check_json_files,
    collect_images,
    site_table,
    traveling_subjects,
    validate_bids,
)
from bids_harmony.config import RunConfig
from bids_harmony.data.templates import TemplateFiles, resolve_template
from bids_harmony.errors import (
    DataError,
    HarmonyError,
    InputMissingError,
    UsageError,
    error_class,
    from_os_error,
)
from bids_harmony.fileio import (
    atomic_write_text,
    file_locks,
    remove_stale_partials,
    write_tsv,
)
from bids_harmony.harmonizers.base import model_checksum, verify_model
from bids_harmony.workflows.citations import Methods, compose_methods

LOGGER = logging.getLogger("bids_harmony")
CITATION_FILE = "CITATION.md"


@dataclass(frozen=True)
class RunContext:
    """What both levels need: the selected images and the template."""

    images: list[AnatImage]
    template: TemplateFiles


def prepare(config: RunConfig) -> RunContext:
    """Clean up after killed runs; validate, index, resolve sites and the template; write
    the shared files (dataset description, sites.tsv) the same way from every job."""
    removed = remove_stale_partials(config.output_dir, skip=[config.work_dir])
    if removed:
        LOGGER.info("removed %d partial file(s) a killed run left in %s", len(removed),
                    config.output_dir)
    if not config.skip_bids_validation:
        validate_bids(config.bids_dir)
    check_json_files(config.bids_dir)
    layout = build_layout(config.bids_dir, config.work_dir)
    selection = {"sessions": config.session_label, "suffixes": config.suffix,
                 "site_column": config.site_column, "site_map": config.site_map}
    images = collect_images(layout, participants=config.participant_label, **selection)
    known_sites = sorted({image.site for image in images})
    if config.target_site not in ("auto", "unified", *known_sites):
        raise DataError(
            f"--target-site '{config.target_site}' is not a site of the selected images; "
            f"known sites: {', '.join(known_sites)} (or use auto / unified)"
        )
    template = resolve_template(config.template, config.resolution, config.work_dir)
    write_dataset_description(config.output_dir, config.bids_dir)
    dataset = (collect_images(layout, skip_unresolved=True, **selection)
               if config.participant_label else images)
    _write_sites(config.output_dir, dataset, images)
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
        verify_model(model_dir, config.method, sorted({im.suffix for im in context.images}))
        LOGGER.info("harmonizing with the model in %s", model_dir)
    description = preprocess(config, context, model_dir)
    write_citation(config.output_dir, compose_methods([description]))


def run_group(config: RunConfig) -> None:
    """Preprocess what is missing, fit the harmonizer on all images, write group QC.

    Under ``torchrun --nproc-per-node N`` the N ranks each run this: the image locks let
    one preprocess while the others wait and find the outputs complete, all ranks join the
    process group only then (so no collective waits on preprocessing) and train together,
    and rank 0 alone saves the model and writes the reports.
    """
    from bids_harmony.nn import distributed
    from bids_harmony.nn.device import resolve_device
    from bids_harmony.reports import write_group_outputs
    from bids_harmony.workflows.group import fit_group
    from bids_harmony.workflows.harmonize import harmonization_desc

    context = prepare(config)
    description = preprocess(config, context, model_dir=None)
    distributed.start(resolve_device(config.device))
    try:
        fit = fit_group(config, context.images, context.template)
    finally:
        distributed.stop()
    if fit is None:
        LOGGER.info("training done on this rank; rank 0 saves the model and the reports")
        return
    n_sites = len({image.site for image in context.images})
    methods = compose_methods([description, harmonization_desc(
        config.method, fit.harmonizer.target_site_,
        fitted_on=f"{len(context.images)} images from {n_sites} sites at the group level",
    )])
    write_citation(config.output_dir, methods)
    write_group_outputs(config.output_dir, config.bids_dir, fit, methods,
                        workers=config.nprocs)


def preprocess(config: RunConfig, context: RunContext, model_dir: Path | None) -> str:
    """Run the Nipype workflow on the images whose outputs are not all there yet; return
    its methods text (that of every image when all are complete).

    An image whose preprocessing derivatives are all written is not preprocessed again: with
    a model, its harmonization reads them (``preprocessed_*`` in
    :func:`~bids_harmony.workflows.base.init_bids_harmony_wf`), unless a T2w of its session
    still needs its T1w's brain. Each image is locked for the run (``WORK_DIR/locks``): two
    jobs given the same image (a SLURM array with overlapping selections, a group run during
    participant runs) take turns, and the second finds the first one's outputs complete.
    Only images still to do are checked (:func:`~bids_harmony.imaging.checks.check_images`),
    so a rerun is cheap.
    """
    from bids_harmony.imaging.checks import check_images
    from bids_harmony.workflows.base import (
        expected_outputs,
        init_bids_harmony_wf,
        preprocessing_outputs,
    )

    checksum = model_checksum(model_dir) if model_dir is not None else None
    locks = [config.work_dir / "locks" / f"{image.key}.lock" for image in context.images]
    with file_locks(locks, on_wait=lambda path: LOGGER.warning(
            "waiting for another job that processes %s", path.stem)):
        preprocessed = {
            image.key for image in context.images
            if config.resume and _is_complete(
                preprocessing_outputs(config, image, context.template), None)
        }
        todo = [
            image for image in context.images
            if not (image.key in preprocessed and _is_complete(
                expected_outputs(config, image, context.template, model_dir is not None),
                checksum,
            ))
        ]
        skipped = len(context.images) - len(todo)
        if skipped:
            LOGGER.info("resuming: %d of %d images already complete", skipped,
                        len(context.images))
        if todo and not config.skip_image_checks:
            check_images([image.path for image in todo])
        if todo:
            to_preprocess = [image for image in todo if image.key not in preprocessed]
            selected = _with_session_references(to_preprocess, context.images)
            keys = {image.key for image in selected}
            selected += [image for image in todo if image.key not in keys]
            preprocessed -= keys
        else:
            selected = list(context.images)
        workflow = init_bids_harmony_wf(config, selected, context.template, model_dir,
                                        preprocessed=preprocessed)
        if todo:
            _run_workflow(workflow, config, selected)
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


def _run_workflow(workflow: object, config: RunConfig, images: Sequence[AnatImage]) -> None:
    """Run with ``--plugin`` (default: MultiProc when more than one process is allowed, else
    Linear) and its arguments; summarise failures.

    Nipype's defaults cost more than our nodes work: its scheduler sleeps 2 s between two
    looks at its workers, so every step of every image waited up to 2 s to be noticed (the
    demo's first participant level: 6.8 min for 4.5 min of node work on 2 cores), and
    ``content`` hashing reads every input file again to decide that a node is cached. Our
    nodes' inputs are files our own nodes wrote or the raw images, which change with their
    modification time, so ``timestamp`` (path, size, mtime) is enough. A batch plugin keeps
    Nipype's 2 s: each look runs the scheduler's status command once per job.
    """
    from bids_harmony.workflows.plugins import (
        SUBMIT_AND_RETURN,
        default_plugin,
        plugin_arguments,
        poll_seconds,
        request_resources,
    )

    plugin = config.plugin or default_plugin(config.nprocs)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    workflow.config["execution"].update({  # type: ignore[attr-defined]
        "crashdump_dir": str(config.log_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "hash_method": "timestamp",
        "poll_sleep_duration": poll_seconds(plugin),
        "remove_unnecessary_outputs": False,
    })
    given = json.loads(config.plugin_args) if config.plugin_args else {}
    request_resources(workflow, plugin, given)
    # Nipype's SLURM plugin names each job after $LOGNAME, which batch shells may not set.
    os.environ.setdefault("LOGNAME", getpass.getuser())
    try:
        workflow.run(plugin=plugin,  # type: ignore[attr-defined]
                     plugin_args=plugin_arguments(plugin, config.nprocs, config.mem_gb, given))
    except OSError as error:
        raise from_os_error(error, "the workflow stopped") from None
    except Exception as error:  # noqa: BLE001 (Nipype raises RuntimeError, or its own)
        raise crash_error(config.log_dir, images) or HarmonyError(
            f"the workflow stopped: {type(error).__name__}: {str(error).splitlines()[0]}"
        ) from None
    if plugin in SUBMIT_AND_RETURN:
        LOGGER.warning(
            "submitted the workflow of %d image(s) to %s: its jobs write the derivatives as "
            "they finish (step logs under %s); rerun the same command afterwards to check "
            "that every image is complete", len(images), plugin, config.work_dir)


def crash_error(log_dir: Path, images: Sequence[AnatImage]) -> HarmonyError | None:
    """The error of the first crash file, as our own class with its exit code and the raw
    image of the failed node named: a ``DataError`` raised in a node still exits 65, a full
    disk 73, and the console shows one line (the crash file keeps the traceback)."""
    crashes = sorted(log_dir.glob("crash-*.txt"))
    if not crashes:
        return None
    text = crashes[0].read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    node = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Node:")),
                crashes[0].name)
    exception = [line for line in lines if _EXCEPTION_LINE.match(line)]
    detail = exception[-1] if exception else lines[-1]
    name, _, message = detail.partition(":")
    image = next((im for im in images if f"_{_node_key(im)}." in f"_{node}."
                  or node.endswith(_node_key(im))), None)
    where = f"{image.path}: " if image is not None and str(image.path) not in message else ""
    summary = (f"{where}{message.strip() or name} (step {node}; {len(crashes)} step(s) failed; "
               f"details: {crashes[0]})")
    cls = error_class(name.rsplit(".", 1)[-1].strip())
    if cls is not None:
        return cls(summary)
    errno_match = re.search(r"\[Errno (\d+)\]", detail)
    if errno_match:
        return from_os_error(OSError(int(errno_match.group(1)), message.strip()),
                             f"{where}step {node} failed (details: {crashes[0]})")
    return HarmonyError(f"{where}{name.strip()}: {message.strip()} (step {node}; "
                        f"{len(crashes)} step(s) failed; details: {crashes[0]})")


#: ``module.ErrorName: message``, the last line of a Python traceback.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(Error|Exception|Exit|Interrupt)\b:?")


def _node_key(image: AnatImage) -> str:
    """The image part of its Nipype node names (see ``workflows.base._workflow_name``)."""
    return "".join(c if c.isalnum() else "_" for c in image.key)


def _write_sites(output_dir: Path, dataset: Sequence[AnatImage],
                 selected: Sequence[AnatImage]) -> None:
    """Write OUTPUT_DIR/sites.tsv for the whole dataset (so that every job of an array
    writes the same file, whichever participants it was given); log the selection's sites
    and traveling subjects."""
    write_tsv(output_dir / "sites.tsv", site_table(dataset),
              ["site", "suffix", "count", "found_in"])
    for row in site_table(selected):
        LOGGER.info("site %-24s %-6s %3d images (from %s)", row["site"], row["suffix"],
                    row["count"], row["found_in"])
    travelers = traveling_subjects(selected)
    if travelers:
        LOGGER.info("traveling subjects (same participant, several sites): %s",
                    ", ".join(f"sub-{s} ({'/'.join(v)})" for s, v in travelers.items()))
