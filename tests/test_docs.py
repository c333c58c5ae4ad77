"""Documentation that is generated from, or promises things about, the code."""

from __future__ import annotations

from pathlib import Path

from cluster_engine.cli import config_docs
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


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1].splitlines()[1:]
    assert [line for line in first_block if line.strip()] == ["./dev serve --demo", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci
