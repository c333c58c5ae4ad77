"""Documentation that is generated from, or promises things about, the code."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cluster_engine.cli import config_docs, exits
from cluster_engine.server.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_page_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_docs.render(), (
        "docs/configuration.md is stale: run"
        " `python -m cluster_engine.cli.config_docs > docs/configuration.md`"
    )


def test_every_setting_is_documented_in_the_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in page
        assert setting.help


def test_the_readme_gives_the_clis_exit_codes_from_its_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert exits.sentence() in " ".join(readme.split()), "README's exit codes differ from cli/exits.py"


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1].splitlines()[1:]
    assert [line for line in first_block if line.strip()] == ["./dev serve --demo", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci


@pytest.mark.parametrize(
    "option, shown",
    [
        (click.Option(["--url"]), "(none)"),
        (click.Option(["--org"], required=True), "(required)"),
        (click.Option(["--scope"], multiple=True), "(none)"),
        (click.Option(["--ttl"], default="1h"), "`1h`"),
        (click.Option(["--demo"], is_flag=True), "off"),
    ],
)
def test_flag_defaults_are_shown_for_people_on_any_click_version(option: click.Option, shown: str) -> None:
    assert config_docs._option_row(option).split(" | ")[1] == shown


def test_the_configuration_page_shows_no_sentinel() -> None:
    assert "Sentinel" not in config_docs.render() and "UNSET" not in config_docs.render()
