"""The single `gr3d` script: every command has a working --help, and --help imports nothing heavy."""

import subprocess
import sys

import pytest

from pipelines.cli import build_parser, main

COMMANDS = [
    [], ["demo"], ["sample-world"], ["shards"], ["shards", "verify"], ["build"], ["build", "det3d"],
    ["build", "pointmaps"], ["build", "cot"], ["audit"], ["train"], ["eval"], ["eval", "det3d"],
    ["eval", "ground2d"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "gr3d")
def test_help_of_every_command(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*argv, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gr3d" in out and len(out) > 200


def test_top_level_lists_every_command():
    text = build_parser().format_help()
    for name in ["demo", "sample-world", "build", "shards", "audit", "train", "eval"]:
        assert name in text


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom pipelines.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'ray', 'open3d', 'transformers', 'apache_beam') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"gr3d --help imported {out}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
