"""Generate docs/configuration.md from the code itself: every CE_* setting and every CLI flag.

    python -m cluster_engine.cli.config_docs > docs/configuration.md

A test regenerates it and compares, so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import enum

import click

from ..server.config import SETTINGS, Settings
from ..server.config_values import Bounded, Parser
from .main import main

COMPUTED_DEFAULTS = {
    "data_dir": "the user data dir (e.g. `~/.local/share/cluster-engine`)",
    "database_url": "`sqlite:///DATA_DIR/cluster-engine.db`",
}


# What an unset setting means, where it is more than "nothing".
UNSET_MEANS = {
    "jwt_secret": "(generated: a development secret in DATA_DIR, when no public key or JWKS is set)",
    "log_format": "(text on a terminal, else JSON)",
}


def _default(field: str) -> str:
    if field in COMPUTED_DEFAULTS:
        return COMPUTED_DEFAULTS[field]
    value = next(f.default for f in dataclasses.fields(Settings) if f.name == field)
    if value is None:
        return UNSET_MEANS.get(field, "(none)")
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _range(parser: Parser) -> str:
    """The bounds of a number setting, as its parser holds them."""
    return f"{parser.low:_} to {parser.high:_}" if isinstance(parser, Bounded) else ""


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found += _commands(command, path)
        else:
            found.append((path, command))
    return found


def _no_default(param: click.Option) -> bool:
    """No default of its own, however this click version says so: None (click < 8.3), its ``UNSET``
    sentinel (8.3+), a callable, or an empty tuple for a ``multiple`` option."""
    value = param.default
    unset = isinstance(value, enum.Enum) and value.name == "UNSET"
    return value is None or unset or callable(value) or (param.multiple and not value)


def _option_row(param: click.Option) -> str:
    names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    if param.is_flag and not param.secondary_opts:
        default = "off"
    elif _no_default(param):
        default = "(required)" if param.required else "(none)"
    else:
        default = f"`{param.default}`"
    envvar = f" (env `{param.envvar}`)" if isinstance(param.envvar, str) else ""
    return f"| {names}{envvar} | {default} | {(param.help or '').replace('|', '/')} |"


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from the code by `python -m cluster_engine.cli.config_docs`; a test keeps it current.",
        "",
        "## Settings (environment)",
        "",
        "Every setting is read from the environment by the `cluster-engine` command only; `serve` passes the",
        "same values to every worker.",
        "",
        "| Variable | Default | Range | Effect |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{s.env}` | {_default(s.field)} | {_range(s.parser)} | {s.help} |" for s in SETTINGS]
    lines += ["", "## Commands and flags", ""]
    for path, command in _commands(main, "cluster-engine"):
        arguments = " ".join(p.human_readable_name for p in command.params if isinstance(p, click.Argument))
        lines += [f"### `{path}{' ' + arguments if arguments else ''}`", "", (command.help or "").strip(), ""]
        options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
        if options:
            lines += ["| Flag | Default | Effect |", "|---|---|---|", *map(_option_row, options), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
