"""Run a benchmark: ``python -m bench NAME [ARGS…]`` from the repository root, inside the project's
environment (``./dev run python -m bench run --quick``); ``python -m bench NAME --help`` for its options.

- ``run``: the read path against a raw-ASGI floor and nginx (wrk), per catalog size;
- ``orgs``: the read path with every org's token rotating through wrk (spread, restart, writes);
- ``micro``: CPU µs per request through the whole ASGI stack, in process;
- ``cold``: an org's first request, in process (one by one, in a burst, preloaded);
- ``polls``: what idle workers' polling costs PostgreSQL and PgBouncer's pool;
- ``pgbouncer``: what the PgBouncer mode costs the service's database calls.

See bench/README.md.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = ("run", "orgs", "micro", "cold", "polls", "pgbouncer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"bench.{argv[0]}")
    code: int = module.main(argv[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
