"""The CLI exposes every config field as an option with its dataclass default, and passes it through."""

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deft_clean.cli import app
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig, flag

EXAMPLE = Path(__file__).parents[1] / "examples" / "fashion-mnist"


def _click_options(command: str) -> dict[str, object]:
    """Option flag -> default of one command, read from the click command typer builds."""
    import typer.main

    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {flag: p.default for p in params for flag in p.opts if flag.startswith("--")}


@pytest.mark.parametrize(
    ("command", "classes"),
    [
        ("check", (DataConfig,)),
        ("detect", (DataConfig, BackboneConfig, DetectConfig)),
        ("finetune", (DataConfig, BackboneConfig, FinetuneConfig)),
    ],
)
def test_every_config_field_is_an_option_with_its_default(command, classes):
    options = _click_options(command)
    for cls in classes:
        for field in dataclasses.fields(cls):
            option = flag(field.name)
            assert option in options, f"{command} lacks {option}"
            assert options[option] == field.default, (command, option)


def test_option_values_reach_the_library(wide_console):
    args = ["check", str(EXAMPLE), str(EXAMPLE / "labels.csv"), "--min-per-class", "100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "10 problem(s)" in text and "class 'Coat' has 27 readable image(s); at least 100 needed" in text
