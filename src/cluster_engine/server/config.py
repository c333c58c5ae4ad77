"""Typed, frozen settings built from a mapping (the ``CE_*`` environment or CLI flags).

Nothing here reads the environment by itself: the CLI (``cli/``) passes ``os.environ`` in. That keeps settings
explicit in tests and makes every knob listable (``SETTINGS`` below is the single table of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from .config_values import (
    Bounded,
    Parser,
    _bool,
    _interface,
    _log_format,
    _optional_str,
    _origins,
    _path,
    _rate,
    _root_path,
    _str,
)
from .config_values import ConfigError as ConfigError

APP_NAME = "cluster-engine"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``CE_*`` variable, declared once: its name, the ``Settings`` field it sets, how its value is
    parsed and bounded (``parser`` is given the name, so errors say which variable), and its help."""

    env: str
    field: str
    parser: Parser
    help: str

    def parse(self, raw: str) -> Any:
        return self.parser(self.env, raw)


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_jwks: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: float = 0.0
    token_cache_size: int = 50_000
    freshness_bound: float = 1.0
    poll_interval: float = 0.25
    response_cache_size: int = 4096
    cache_images: int = 1_500_000
    cache_compress: bool = True
    header_timeout: float = 10.0
    max_header_bytes: int = 65_536
    body_timeout: float = 10.0
    max_connections: int = 10_000
    backlog: int = 1024
    rate_limit: str | None = None
    access_log: bool = True
    access_log_probes: bool = False
    log_format: str | None = None
    cache_orgs: int = 100_000
    db_pool_size: int = 1
    db_pool_overflow: int = 1
    db_listen: bool = False
    database_read_url: str | None = None
    cors_origins: tuple[str, ...] = ()
    root_path: str = ""
    server_interface: str = "rsgi"

    @property
    def dev_secret_path(self) -> Path:
        return self.data_dir / "jwt-secret"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "CE_DATA_DIR",
        "data_dir",
        _path,
        "Directory for the embedded database and the generated development secret.",
    ),
    Setting(
        "CE_DATABASE_URL",
        "database_url",
        _str,
        "sqlite:///PATH (embedded default: DATA_DIR/cluster-engine.db) or postgresql://…; for a failover "
        "pair, libpq's multi-host form postgresql://USER@H1:P1,H2:P2/DB?target_session_attrs=read-write "
        "(see deploy/ha/). Add pgbouncer=true to the query when the URL points at a PgBouncer in "
        "transaction-pooling mode (no prepared statements, statement timeout per transaction; see README).",
    ),
    Setting(
        "CE_DATABASE_READ_URL",
        "database_read_url",
        _optional_str,
        "PostgreSQL only: a hot standby of CE_DATABASE_URL's primary (postgresql://…, pgbouncer=true "
        "allowed) that change polling and org loads read from; writes, migrations and audit stay on the "
        "primary. Each poll still asks the primary for its catalog revision (one indexed row) and reads "
        "the changes from the standby only once the standby shows that revision, so a standby that lags "
        "(replay paused, a slow link) or fails never makes a worker serve data older than "
        "CE_FRESHNESS_BOUND: reads then go to the primary (the standby is tried again every 2 s). Each "
        "worker keeps a pool on the standby as well (CE_DB_POOL_SIZE, CE_DB_POOL_OVERFLOW).",
    ),
    Setting("CE_JWT_SECRET", "jwt_secret", _optional_str, "Shared secret for HS256 tokens."),
    Setting(
        "CE_JWT_PUBLIC_KEY",
        "jwt_public_key",
        _optional_str,
        "Path of a PEM public key (RSA → RS256, EC → ES256/384/512, Ed25519 → EdDSA).",
    ),
    Setting("CE_JWT_JWKS", "jwt_jwks", _optional_str, "Path or https URL of a JWK Set."),
    Setting("CE_JWT_ISSUER", "jwt_issuer", _optional_str, "Required `iss` claim, when set."),
    Setting("CE_JWT_AUDIENCE", "jwt_audience", _optional_str, "Required `aud` claim, when set."),
    Setting(
        "CE_JWT_LEEWAY",
        "jwt_leeway",
        Bounded(float, 0.0, 300.0),
        "Clock skew tolerated on exp/nbf/iat, in seconds.",
    ),
    Setting(
        "CE_TOKEN_CACHE_SIZE",
        "token_cache_size",
        Bounded(int, 0, 10_000_000),
        "Verified tokens kept (until they expire) to skip repeated signature checks; 0 disables.",
    ),
    Setting(
        "CE_FRESHNESS_BOUND",
        "freshness_bound",
        Bounded(float, 0.05, 60.0),
        "Oldest catalog state (seconds since last confirmed against the database) a worker may serve.",
    ),
    Setting(
        "CE_POLL_INTERVAL",
        "poll_interval",
        Bounded(float, 0.01, 30.0),
        "How often a worker checks the database for a new catalog revision, in seconds.",
    ),
    Setting(
        "CE_RESPONSE_CACHE_SIZE",
        "response_cache_size",
        Bounded(int, 0, 10_000_000),
        "Serialized list answers kept (whole lists and pages, each); a change drops only the answers "
        "that show the images it touched.",
    ),
    Setting(
        "CE_CACHE_IMAGES",
        "cache_images",
        Bounded(int, 0, 100_000_000),
        "Customized images held in memory at most (about 560 bytes each with CE_CACHE_COMPRESS, 1.1 KB "
        "without: 1.5 million take about 0.8 GiB; least recently used orgs are dropped and reloaded from the "
        "database on their next request); Public images are always held. A worker holds every org that "
        "fits before it is ready.",
    ),
    Setting(
        "CE_CACHE_COMPRESS",
        "cache_compress",
        _bool,
        "Hold Customized images' JSON compressed (zstd, with a dictionary trained on the first 2,000 "
        "held): about 560 bytes per held image instead of 1.1 KB, for 1-3 µs per image when an answer "
        "showing it is rendered again (answers are cached); Public images are never compressed.",
    ),
    Setting(
        "CE_HTTP_HEADER_TIMEOUT",
        "header_timeout",
        Bounded(float, 1.0, 60.0),
        "Seconds a connection may wait for its next request head: from accept, and again after each "
        "answer (this is the keep-alive idle timeout too: one timer in the HTTP server). A connection "
        "that has not sent a complete head by then is closed. Keep it above clients' pool expiry "
        "(httpx: 5 s), or a client may reuse a connection just as the server closes it.",
    ),
    Setting(
        "CE_HTTP_MAX_HEADER_BYTES",
        "max_header_bytes",
        Bounded(int, 8192, 1_048_576),
        "Largest request line plus headers accepted (bounds URL length too). The HTTP server checks it "
        "between reads of its buffer, so a head may pass up to twice this; past that it is a 431.",
    ),
    Setting(
        "CE_HTTP_BODY_TIMEOUT",
        "body_timeout",
        Bounded(float, 1.0, 300.0),
        "Seconds a request body (POST, PATCH) has to arrive in full, from when its head was read; past "
        "it the answer is 408 and the connection is closed. An answer given before the body was read "
        "(401, 403, 429 …) first reads the rest of it (up to 1 MiB) within the same time, so the "
        "connection stays reusable; failing that, it says Connection: close.",
    ),
    Setting(
        "CE_HTTP_MAX_CONNECTIONS",
        "max_connections",
        Bounded(int, 16, 1_000_000),
        "Connections each worker holds at most (Granian's backpressure). At it, new connections are "
        "not left waiting in the listen queue: the worker closes its longest-idle keep-alive "
        "connections (silent for 1 s or more) to take them, or, with none idle, answers them 503 with "
        "Retry-After: 1 at once; the connections it holds keep being answered. Each takes a file "
        "descriptor: the open-files limit must allow it.",
    ),
    Setting(
        "CE_HTTP_BACKLOG",
        "backlog",
        Bounded(int, 128, 65_535),
        "Listen queue length (capped by the kernel's net.core.somaxconn).",
    ),
    Setting(
        "CE_RATE_LIMIT",
        "rate_limit",
        _rate,
        "Per-org fairness, off when empty: RATE/BURST requests per second per org and worker (e.g. "
        "100/200); past it, 429 with Retry-After. Counted per worker (no shared state on the request "
        "path): an org's fleet-wide ceiling is RATE times the workers it reaches.",
    ),
    Setting(
        "CE_ACCESS_LOG",
        "access_log",
        _bool,
        "One log line per request (in CE_LOG_FORMAT) on stderr.",
    ),
    Setting(
        "CE_ACCESS_LOG_PROBES",
        "access_log_probes",
        _bool,
        "Also log the probes' requests (`/healthz`, `/readyz`, `/metrics`) in the access log.",
    ),
    Setting(
        "CE_LOG_FORMAT",
        "log_format",
        _log_format,
        "`json` or `text` for every log line (the app's, Granian's, the access log); unset: text when "
        "stderr is a terminal, JSON otherwise. Each line has a time (UTC), a level and the logger; an "
        "exception stays on its line.",
    ),
    Setting(
        "CE_CACHE_ORGS",
        "cache_orgs",
        Bounded(int, 1, 100_000_000),
        "Orgs (including those without Customized images) whose images are held in memory at most.",
    ),
    Setting(
        "CE_DB_POOL_SIZE",
        "db_pool_size",
        Bounded(int, 1, 100),
        "PostgreSQL: connections each worker keeps open (the change poller's, shared with requests). "
        "Warm reads need none.",
    ),
    Setting(
        "CE_DB_POOL_OVERFLOW",
        "db_pool_overflow",
        Bounded(int, 0, 100),
        "PostgreSQL: further connections a worker may open while busy (writes, cold org loads), closed "
        "when returned. A worker uses at most CE_DB_POOL_SIZE + CE_DB_POOL_OVERFLOW (+1 with CE_DB_LISTEN).",
    ),
    Setting(
        "CE_DB_LISTEN",
        "db_listen",
        _bool,
        "PostgreSQL: each worker also holds a LISTEN connection and applies a change as soon as it "
        "commits, instead of at the next poll (CE_POLL_INTERVAL); refused with a pgbouncer=true URL "
        "(LISTEN does not pass transaction pooling).",
    ),
    Setting(
        "CE_CORS_ORIGINS",
        "cors_origins",
        _origins,
        "CORS, off when empty: comma-separated origins (scheme://host[:port], e.g. "
        "http://localhost:5173,https://console.example.com) whose pages may call the API, or * for any. "
        "Preflights are answered for every operation (Authorization, Content-Type, If-None-Match and "
        "X-Request-ID allowed); ETag, Link, Location, Retry-After, WWW-Authenticate and X-Request-ID are "
        "exposed; error answers carry the headers too. Credentials mode (cookies) is never allowed: tokens "
        "go in Authorization, which needs none. Other origins get no Access-Control-Allow-Origin.",
    ),
    Setting(
        "CE_ROOT_PATH",
        "root_path",
        _root_path,
        "Path prefix a reverse proxy strips before forwarding (e.g. /gateway when it maps "
        "https://HOST/gateway/v1/images to this service's /v1/images): Location and Link headers then "
        "carry it. Not needed for /api, which the service serves itself (the contract's server is "
        "https://console.gmicloud.ai/api): /api/v1/images answers exactly what /v1/images does, and a "
        "proxy that strips /api may set CE_ROOT_PATH=/api. Overrides the ASGI server's root_path.",
    ),
    Setting(
        "CE_SERVER_INTERFACE",
        "server_interface",
        _interface,
        "How Granian calls the service: `rsgi` (its native interface: `GET /v1/images` and "
        "`GET /v1/images/{id}` answered directly, everything else through an RSGI-to-ASGI bridge into the "
        "same application; the read path pays less per request) or `asgi` (the ASGI application alone). "
        "The answers are the same either way; with CE_CORS_ORIGINS or CE_RATE_LIMIT set, `rsgi` passes "
        "every request through the bridge.",
    ),
)


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'cluster-engine.db'}"


def load_settings(env: Mapping[str, str], **overrides: Any) -> Settings:
    """Build Settings from ``CE_*`` keys of ``env``; keyword overrides (CLI flags) win."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.env)
        if raw is not None and raw != "":
            values[setting.field] = setting.parse(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    data_dir = Path(values.pop("data_dir", None) or default_data_dir()).expanduser()
    database_url = values.pop("database_url", None) or default_database_url(data_dir)
    settings = Settings(data_dir=data_dir, database_url=database_url, **values)
    configured = [k for k in ("jwt_secret", "jwt_public_key", "jwt_jwks") if getattr(settings, k)]
    if len(configured) > 1:
        raise ConfigError("configure only one of CE_JWT_SECRET, CE_JWT_PUBLIC_KEY, CE_JWT_JWKS")
    if not database_url.startswith(("sqlite:", "postgresql:", "postgres:", "postgresql+")):
        raise ConfigError(f"CE_DATABASE_URL must be sqlite:///PATH or postgresql://…, got {database_url!r}")
    if database_url.startswith("postgres"):
        from ..storage.db import uses_pgbouncer

        try:
            pgbouncer = uses_pgbouncer(database_url)
        except ValueError as exc:
            raise ConfigError(f"CE_DATABASE_URL: {exc}") from None
        if pgbouncer and settings.db_listen:
            # LISTEN holds a session; a transaction-pooling PgBouncer gives the server connection to other
            # clients after each statement, so notifications would never arrive (polling still would)
            raise ConfigError(
                "CE_DB_LISTEN=true cannot work through a transaction-pooling PgBouncer (pgbouncer=true in "
                "CE_DATABASE_URL): leave it off (changes arrive by polling, CE_POLL_INTERVAL)"
            )
    if settings.database_read_url is not None:
        _check_read_url(settings)
    return settings


def _check_read_url(settings: Settings) -> None:
    from urllib.parse import parse_qsl, urlsplit

    from ..storage.db import uses_pgbouncer

    read_url = settings.database_read_url
    assert read_url is not None
    if not settings.database_url.startswith("postgres"):
        raise ConfigError(
            "CE_DATABASE_READ_URL needs a PostgreSQL CE_DATABASE_URL (a hot standby of its primary)"
        )
    if not read_url.startswith(("postgresql:", "postgres:")):
        raise ConfigError(f"CE_DATABASE_READ_URL must be postgresql://… (a hot standby), got {read_url!r}")
    try:
        uses_pgbouncer(read_url)
    except ValueError as exc:
        raise ConfigError(f"CE_DATABASE_READ_URL: {exc}") from None
    if read_url == settings.database_url:
        raise ConfigError("CE_DATABASE_READ_URL is CE_DATABASE_URL: leave it unset to read from the primary")
    attrs = dict(parse_qsl(urlsplit(read_url).query)).get("target_session_attrs")
    if attrs in ("read-write", "primary"):
        raise ConfigError(
            f"CE_DATABASE_READ_URL with target_session_attrs={attrs} would read from the primary: name "
            "the standby (target_session_attrs=standby or prefer-standby for several)"
        )
