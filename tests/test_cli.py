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
    """`--help` imports no Nipype, pybids or torch: it runs in a fresh interpreter quickly."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bids_harmony", "--help"],
                            capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    for name in ("histmatch", "ssimh", "nyul", "whitestripe", "zscore"):
        assert name in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from bids_harmony.cli.parser import build_parser; build_parser();"
         "print(sorted(m for m in ('nipype','bids','torch','niworkflows','ants') "
         "if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"
    assert elapsed < 20  # generous: the import check above is the real guarantee


@pytest.mark.parametrize(
    ("argv_tail", "expected"),
    [
        (["participant", "--nprocs", "0"], 64),
        (["participant", "--device", "tpu"], 64),
        (["participant", "--edge-ratio", "1.5"], 64),
        (["everyone"], 17),
    ],
)
def test_usage_errors(tmp_path: Path, demo_bids: Path, argv_tail: list[str], expected: int,
                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run([str(demo_bids), str(tmp_path / "out")] + argv_tail, capsys)
    assert code == expected
    assert "error" in out


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
