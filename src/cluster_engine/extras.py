"""Which optional parts of the distribution are installed.

The default install is the SDK (``cluster_engine.client``) and the ``images`` CLI. Serving, tokens,
migrations, catalog files and the pytest plugin's server need the ``server`` extra; a command that needs it
checks here first and stops with one line naming the install command, instead of an ImportError's traceback.
"""

from __future__ import annotations

import importlib.util

SERVER_HINT = "pip install 'cluster-engine[server]'"

# Import names of the server extra's distributions (pyproject.toml's [project.optional-dependencies].server).
SERVER_MODULES = (
    "granian",
    "starlette",
    "sqlalchemy",
    "aiosqlite",
    "psycopg",
    "alembic",
    "jwt",
    "prometheus_client",
    "swagger_ui",
    "xxhash",
    "zstandard",
    "ijson",
)


class MissingExtra(RuntimeError):
    """The ``server`` extra (or part of it) is not installed."""


def missing_server_modules() -> list[str]:
    """The server extra's modules that cannot be imported here (none when the extra is installed)."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def server_hint(what: str) -> str | None:
    """One line saying what to install for ``what`` ("serve", "the pytest plugin's server", …), or None
    when the server extra is installed."""
    missing = missing_server_modules()
    if not missing:
        return None
    return f"{what} needs the server extra (missing: {', '.join(missing)}): {SERVER_HINT}"


def require_server(what: str) -> None:
    """Raise ``MissingExtra`` with ``server_hint(what)`` unless the server extra is installed."""
    hint = server_hint(what)
    if hint is not None:
        raise MissingExtra(hint)
