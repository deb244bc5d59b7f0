"""Every stage command is reachable and its --help says what it reads and writes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
COMMANDS = ["synth", "decode", "extract", "merge", "vocab", "train", "evaluate", "lineage", "report"]


def test_top_level_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_says_what_it_reads_and_writes(name):
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Reads:" in result.output
    if name not in ("lineage", "report"):
        assert "Writes:" in result.output
        assert "--params" in result.output and "--set" in result.output


def test_version_is_the_package_version():
    """`vmr --version` prints pipeline.__version__, which must be pyproject.toml's version."""
    from pathlib import Path

    import tomllib

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    assert result.output.strip() == f"vmr {tomllib.loads(pyproject.read_text())['project']['version']}"


def test_every_command_that_reads_params_takes_profiles():
    from typer.main import get_command

    group = get_command(app)
    for name, command in group.commands.items():
        options = {opt for p in command.params for opt in p.opts}
        if "--params" in options and name != "dag":  # dvc.yaml is made from params.yaml alone
            assert "--profile" in options, name
