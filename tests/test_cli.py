"""The command line as a boundary: exit codes, one-line errors, config snapshot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from bids_harmony import __version__
from bids_harmony.cli.run import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse exits for --help/--version/usage
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"bids_harmony {__version__}"


def test_help_is_fast_and_lists_the_registry() -> None:
    """`--help` imports no numpy, scipy, torch, Nipype or pybids (the registry reads the
    harmonizer modules' source): it runs in a fresh interpreter in well under a second."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bids_harmony", "--help"],
                            capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    for name in ("histmatch", "ssimh", "nyul", "whitestripe", "zscore"):
        assert name in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from bids_harmony.cli.parser import build_parser; build_parser();"
         "print(sorted(m for m in ('numpy','scipy','torch','nipype','bids','niworkflows',"
         "'ants') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"
    assert elapsed < 20  # generous: the import check above is the real guarantee


@pytest.mark.parametrize(
    ("argv_tail", "expected", "fragments"),
    [
        (["participant", "--nprocs", "0"], 64, ["--nprocs", "must be 1 or more"]),
        (["participant", "--device", "tpu"], 64, ["--device", "auto, cpu, cuda or cuda:N"]),
        (["participant", "--edge-ratio", "1.5"], 64, ["--edge-ratio", "strictly between 0"]),
        (["everyone"], 17, ["analysis_level", "'everyone'", "choose from 'participant'"]),
        (["group", "--preset", "huge", "--method", "blindharmony"], 64,
         ["--preset", "'huge'", "choose from 'auto', 'cpu', 'fast', 'paper', 'tiny'"]),
        (["group", "--preset", "tiny"], 64, ["--preset tiny", "histmatch has no presets",
                                             "drop --preset"]),
        (["group", "--harmonizer-param", "n_quantile=5"], 64,
         ["--harmonizer-param n_quantile", "its parameters: n_quantiles"]),
        (["group", "--harmonizer-param", "n_quantiles=many"], 64,
         ["n_quantiles=many", "takes an integer", "e.g. n_quantiles=1024"]),
        (["group", "--harmonizer-param", "n_quantiles=1"], 64,
         [">= 2", "--harmonizer-param n_quantiles=1"]),
        (["group", "--harmonizer-param", "quantiles"], 64,
         ["--harmonizer-param", "'quantiles' is not KEY=VALUE"]),
        (["group", "--method", "blindharmony", "--harmonizer-param", "device=cpu"], 64,
         ["--harmonizer-param device", "set it with --device"]),
        (["participant", "--plugin", "Torque"], 64, ["--plugin", "'Torque'", "SLURMGraph"]),
        (["participant", "--plugin-args", "{sbatch_args: [}"], 64,
         ["--plugin-args", "neither JSON nor YAML"]),
        (["participant", "--plugin-args", "no_such_file.json"], 64,
         ["--plugin-args", "neither a JSON object nor a file"]),
        (["group", "--plugin", "SLURMGraph"], 64,
         ["--plugin SLURMGraph submits the workflow and returns", "--plugin SLURM"]),
    ],
)
def test_usage_errors(tmp_path: Path, demo_bids: Path, argv_tail: list[str], expected: int,
                      fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The exit code, and one error line naming the offending option and the fix; nothing
    is created before the command line is found wrong."""
    code, out = _run([str(demo_bids), str(tmp_path / "out")] + argv_tail, capsys)
    assert code == expected
    error_lines = [line for line in out.splitlines() if "error:" in line]
    assert len(error_lines) == 1, out
    for fragment in fragments:
        assert fragment in error_lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_input_is_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"], capsys)
    assert code == 66
    assert str(tmp_path / "nope") in out and len(out.strip().splitlines()) == 1


def test_output_inside_input_is_refused(demo_bids: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in demo_bids.iterdir())
    code, out = _run([str(demo_bids), str(demo_bids / "derivatives" / "x"), "participant"],
                     capsys)
    assert code == 64 and "inside the input dataset" in out
    assert sorted(p.name for p in demo_bids.iterdir()) == before


def test_unknown_participant_is_66(tmp_path: Path, demo_bids: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run([str(demo_bids), str(tmp_path / "out"), "participant",
                      "--participant-label", "sub-99", "--skip-bids-validation"], capsys)
    assert code == 66 and "sub-99" in out


def test_empty_selection_is_18(tmp_path: Path, demo_bids: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run([str(demo_bids), str(tmp_path / "out"), "participant",
                      "--suffix", "FLAIR", "--skip-bids-validation"], capsys)
    assert code == 18 and "FLAIR" in out


def test_unknown_target_site_is_65(tmp_path: Path, demo_bids: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Checked at the boundary, before any image is processed."""
    code, out = _run([str(demo_bids), str(tmp_path / "out"), "group", "--target-site", "siteZ",
                      "--skip-bids-validation", "--resolution", "2"], capsys)
    assert code == 65 and "siteZ" in out
    assert not (tmp_path / "out" / "sub-01").exists()


def test_invalid_bids_is_16(tmp_path: Path, demo_bids: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_bids, broken)
    (broken / "sub-01" / "ses-01" / "anat" / "notbids.nii.gz").write_bytes(b"x")
    code, out = _run([str(broken), str(tmp_path / "out"), "participant"], capsys)
    assert code == 16 and "notbids.nii.gz" in out


def test_unwritable_output_is_73(tmp_path: Path, demo_bids: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = _run([str(demo_bids), str(blocker / "out"), "participant"], capsys)
    assert code == 73 and str(blocker) in out


def test_config_snapshot_is_written(tmp_path: Path, demo_bids: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    code, _ = _run([str(demo_bids), str(out_dir), "participant", "--suffix", "FLAIR",
                    "--participant-label", "01", "--skip-bids-validation"], capsys)
    assert code == 18
    configs = list((out_dir / "logs").glob("*/config.toml"))
    assert len(configs) == 1
    config = tomllib.loads(configs[0].read_text())["bids_harmony"]
    assert config["participant_label"] == ["01"]
    assert config["suffix"] == ["FLAIR"]
    assert config["analysis_level"] == "participant"
    assert config["bids_dir"] == str(demo_bids)
    assert json.loads((demo_bids / "dataset_description.json").read_text())["DatasetType"] == "raw"


def test_plugin_args_from_a_yaml_file_are_kept_in_the_snapshot(
        tmp_path: Path, demo_bids: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = tmp_path / "slurm.yaml"
    arguments.write_text("sbatch_args: -p short --mem=6G\nmax_jobs: 40\n")
    code, _ = _run([str(demo_bids), str(tmp_path / "out"), "participant", "--suffix", "FLAIR",
                    "--plugin", "SLURM", "--plugin-args", str(arguments)], capsys)
    assert code == 18
    config = tomllib.loads(next((tmp_path / "out" / "logs").glob("*/config.toml"))
                           .read_text())["bids_harmony"]
    assert config["plugin"] == "SLURM"
    assert json.loads(config["plugin_args"]) == {"sbatch_args": "-p short --mem=6G",
                                                 "max_jobs": 40}


def test_readme_documents_every_option() -> None:
    """README, --help and the parser must not drift apart."""
    from bids_harmony.cli.parser import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    parser = build_parser()
    for action in parser._actions:
        long_flags = [f for f in action.option_strings if f.startswith("--") and "_" not in f]
        if not long_flags or long_flags[0] == "--help":
            continue
        assert any(flag in readme for flag in long_flags), f"{long_flags[0]} not in README"
    for name in parser._option_string_actions["--method"].choices:
        assert f"`{name}`" in readme


def test_config_toml_round_trip(tmp_path: Path) -> None:
    """to_toml -> from_toml gives the same RunConfig, enums, paths and parameters included."""
    from bids_harmony.config import AnalysisLevel, Registration, RunConfig, SkullStripped

    config = RunConfig(
        bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
        analysis_level=AnalysisLevel.GROUP, work_dir=tmp_path / "work", run_id="run-1",
        participant_label=("01", "02"), suffix=("T1w",), method="blindharmonydiff",
        preset="tiny", harmonizer_params=(("sampling_steps", "8"), ("multipliers", "1,2")),
        site_map=tmp_path / "sites.tsv", registration=Registration.SYN,
        skull_stripped=SkullStripped.YES, mem_gb=4.0, resume=False, verbose=2,
    )
    assert RunConfig.from_toml(config.write_toml()) == config
    minimal = RunConfig(tmp_path, tmp_path / "o", AnalysisLevel.PARTICIPANT, tmp_path / "w", "r")
    assert RunConfig.from_toml(minimal.write_toml()) == minimal


def test_bad_config_file_is_a_usage_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    for text, fragment in [
        ('[bids_harmony]\nnproc = 2\n', "unknown key(s) nproc"),
        ('[bids_harmony]\nnprocs = 0\n', "nprocs = 0 is refused by --nprocs"),
        ('[bids_harmony]\nregistration = "rigid"\n', "not one of affine, syn"),
        ('[other]\n', "no [bids_harmony] table"),
    ]:
        path.write_text(text)
        code, out = _run(["--config", str(path)], capsys)
        assert code == 64 and fragment in out and len(out.strip().splitlines()) == 1, out
    code, out = _run(["--config", str(tmp_path / "none.toml")], capsys)
    assert code == 66 and "none.toml not found" in out


def test_config_replays_a_run_and_the_command_line_overrides_it(
        tmp_path: Path, demo_bids: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config logs/<run>/config.toml`` alone reproduces the run's configuration; options
    given with it replace the file's (``--harmonizer-param`` keys one by one)."""
    from dataclasses import replace

    from bids_harmony.config import RunConfig

    out_dir = tmp_path / "out"

    def snapshot() -> RunConfig:
        newest = max((out_dir / "logs").glob("*/config.toml"), key=lambda p: p.stat().st_mtime_ns)
        return RunConfig.from_toml(newest)

    code, _ = _run([str(demo_bids), str(out_dir), "participant", "--suffix", "FLAIR",
                    "--participant-label", "01", "--skip-bids-validation", "--nprocs", "2",
                    "--harmonizer-param", "n_quantiles=512", "--no-resume"], capsys)
    assert code == 18
    first = snapshot()
    assert first.harmonizer_params == (("n_quantiles", "512"),) and first.resume is False
    replay_file = tmp_path / "replay.toml"
    replay_file.write_text((first.log_dir / "config.toml").read_text())

    code, _ = _run(["--config", str(replay_file)], capsys)
    assert code == 18
    replayed = snapshot()
    assert replace(replayed, run_id=first.run_id) == first

    code, _ = _run(["--config", str(replay_file), "--participant-label", "02",
                    "--harmonizer-param", "n_quantiles=256"], capsys)
    assert code == 18
    overridden = snapshot()
    assert overridden.participant_label == ("02",) and overridden.suffix == ("FLAIR",)
    assert overridden.harmonizer_params == (("n_quantiles", "256"),)
    assert overridden.nprocs == 2 and overridden.bids_dir == demo_bids
