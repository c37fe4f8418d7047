"""The command line: routing, help, and the demo end to end."""

import subprocess
import sys

import pytest

from batchnorm import cli


def test_help_lists_commands_and_experiments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "reproduce" in out


def test_demo_runs_and_folded_model_agrees(capsys):
    assert cli.main(["demo", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "population statistics" in out
    assert "(agree)" in out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "batchnorm", "--help"], capture_output=True,
                            text=True, check=True)
    assert "reproduce" in result.stdout


def test_reproduce_help_lists_every_experiment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert set(cli.EXPERIMENTS) >= {"mnist", "inception", "lr-sweep", "depth", "ics",
                                    "small-batch", "ghost"}
    for name in cli.EXPERIMENTS:
        assert name in out, name
