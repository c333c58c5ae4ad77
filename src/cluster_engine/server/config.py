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


_SETTING = "cluster_engine.setting"  # the key of a Settings field's Setting in its metadata


def setting(env: str, parser: Parser, *, help: str, default: Any = dataclasses.MISSING) -> Any:
    """A ``Settings`` field that the variable ``env`` sets (``default``: none, the field is required)."""
    return dataclasses.field(default=default, metadata={_SETTING: Setting(env, "", parser, help)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, each declared once: its field (name, type, default) and, through ``setting``, its
    ``CE_*`` variable, parser (with bounds) and help."""

    data_dir: Path = setting(  # noqa: RUF009 (a dataclasses.field, as the other fields')
        "CE_DATA_DIR", _path, help="Directory for the embedded database and the generated development secret."
    )
    database_url: str = setting(
        "CE_DATABASE_URL",
        _str,
        help="sqlite:///PATH (embedded default: DATA_DIR/cluster-engine.db) or postgresql://…; for a "
        "failover pair, libpq's multi-host form "
        "postgresql://USER@H1:P1,H2:P2/DB?target_session_attrs=read-write "
        "(see deploy/ha/). Add pgbouncer=true to the query when the URL points at a PgBouncer in "
        "transaction-pooling mode (no prepared statements, statement timeout per transaction; see README).",
    )
    database_read_url: str | None = setting(
        "CE_DATABASE_READ_URL",
        _optional_str,
        default=None,
        help="PostgreSQL only: a hot standby of CE_DATABASE_URL's primary (postgresql://…, pgbouncer=true "
        "allowed) that change polling and org loads read from; writes, migrations and audit stay on the "
        "primary. Each poll still asks the primary for its catalog revision (one indexed row) and reads "
        "the changes from the standby only once the standby shows that revision, so a standby that lags "
        "(replay paused, a slow link) or fails never makes a worker serve data older than "
        "CE_FRESHNESS_BOUND: reads then go to the primary (the standby is tried again every 2 s). Each "
        "worker keeps a pool on the standby as well (CE_DB_POOL_SIZE, CE_DB_POOL_OVERFLOW).",
    )
    jwt_secret: str | None = setting(
        "CE_JWT_SECRET", _optional_str, default=None, help="Shared secret for HS256 tokens."
    )
    jwt_public_key: str | None = setting(
        "CE_JWT_PUBLIC_KEY",
        _optional_str,
        default=None,
        help="Path of a PEM public key (RSA → RS256, EC → ES256/384/512, Ed25519 → EdDSA).",
    )
    jwt_jwks: str | None = setting(
        "CE_JWT_JWKS", _optional_str, default=None, help="Path or https URL of a JWK Set."
    )
    jwt_issuer: str | None = setting(
        "CE_JWT_ISSUER", _optional_str, default=None, help="Required `iss` claim, when set."
    )
    jwt_audience: str | None = setting(
        "CE_JWT_AUDIENCE", _optional_str, default=None, help="Required `aud` claim, when set."
    )
    jwt_leeway: float = setting(
        "CE_JWT_LEEWAY",
        Bounded(float, 0.0, 300.0),
        default=0.0,
        help="Clock skew tolerated on exp/nbf/iat, in seconds.",
    )
    token_cache_size: int = setting(
        "CE_TOKEN_CACHE_SIZE",
        Bounded(int, 0, 10_000_000),
        default=50_000,
        help="Verified tokens kept (until they expire) to skip repeated signature checks; 0 disables.",
    )
    freshness_bound: float = setting(
        "CE_FRESHNESS_BOUND",
        Bounded(float, 0.05, 60.0),
        default=1.0,
        help="Oldest catalog state (seconds since last confirmed against the database) a worker may serve.",
    )
    poll_interval: float = setting(
        "CE_POLL_INTERVAL",
        Bounded(float, 0.01, 30.0),
        default=0.25,
        help="How often a worker checks the database for a new catalog revision, in seconds.",
    )
    response_cache_size: int = setting(
        "CE_RESPONSE_CACHE_SIZE",
        Bounded(int, 0, 10_000_000),
        default=4096,
        help="Serialized list answers kept (whole lists and pages, each); a change drops only the answers "
        "that show the images it touched.",
    )
    cache_images: int = setting(
        "CE_CACHE_IMAGES",
        Bounded(int, 0, 100_000_000),
        default=1_500_000,
        help="Customized images held in memory at most (about 560 bytes each with CE_CACHE_COMPRESS, 1.1 KB "
        "without: 1.5 million take about 0.8 GiB; least recently used orgs are dropped and reloaded from the "
        "database on their next request); Public images are always held. A worker holds every org that "
        "fits before it is ready.",
    )
    cache_compress: bool = setting(
        "CE_CACHE_COMPRESS",
        _bool,
        default=True,
        help="Hold Customized images' JSON compressed (zstd, with a dictionary trained on the first 2,000 "
        "held): about 560 bytes per held image instead of 1.1 KB, for 1-3 µs per image when an answer "
        "showing it is rendered again (answers are cached); Public images are never compressed.",
    )
    header_timeout: float = setting(
        "CE_HTTP_HEADER_TIMEOUT",
        Bounded(float, 1.0, 60.0),
        default=10.0,
        help="Seconds a connection may wait for its next request head: from accept, and again after each "
        "answer (this is the keep-alive idle timeout too: one timer in the HTTP server). A connection "
        "that has not sent a complete head by then is closed. Keep it above clients' pool expiry "
        "(httpx: 5 s), or a client may reuse a connection just as the server closes it.",
    )
    max_header_bytes: int = setting(
        "CE_HTTP_MAX_HEADER_BYTES",
        Bounded(int, 8192, 1_048_576),
        default=65_536,
        help="Largest request line plus headers accepted (bounds URL length too). The HTTP server checks it "
        "between reads of its buffer, so a head may pass up to twice this; past that it is a 431.",
    )
    body_timeout: float = setting(
        "CE_HTTP_BODY_TIMEOUT",
        Bounded(float, 1.0, 300.0),
        default=10.0,
        help="Seconds a request body (POST, PATCH) has to arrive in full, from when its head was read; past "
        "it the answer is 408 and the connection is closed. An answer given before the body was read "
        "(401, 403, 429 …) first reads the rest of it (up to 1 MiB) within the same time, so the "
        "connection stays reusable; failing that, it says Connection: close.",
    )
    max_connections: int = setting(
        "CE_HTTP_MAX_CONNECTIONS",
        Bounded(int, 16, 1_000_000),
        default=10_000,
        help="Connections each worker holds at most (Granian's backpressure). At it, new connections are "
        "not left waiting in the listen queue: the worker closes its longest-idle keep-alive "
        "connections (silent for 1 s or more) to take them, or, with none idle, answers them 503 with "
        "Retry-After: 1 at once; the connections it holds keep being answered. Each takes a file "
        "descriptor: the open-files limit must allow it.",
    )
    backlog: int = setting(
        "CE_HTTP_BACKLOG",
        Bounded(int, 128, 65_535),
        default=1024,
        help="Listen queue length (capped by the kernel's net.core.somaxconn).",
    )
    rate_limit: str | None = setting(
        "CE_RATE_LIMIT",
        _rate,
        default=None,
        help="Per-org fairness, off when empty: RATE/BURST requests per second per org and worker (e.g. "
        "100/200); past it, 429 with Retry-After. Counted per worker (no shared state on the request "
        "path): an org's fleet-wide ceiling is RATE times the workers it reaches.",
    )
    access_log: bool = setting(
        "CE_ACCESS_LOG", _bool, default=True, help="One log line per request (in CE_LOG_FORMAT) on stderr."
    )
    access_log_probes: bool = setting(
        "CE_ACCESS_LOG_PROBES",
        _bool,
        default=False,
        help="Also log the probes' requests (`/healthz`, `/readyz`, `/metrics`) in the access log.",
    )
    log_format: str | None = setting(
        "CE_LOG_FORMAT",
        _log_format,
        default=None,
        help="`json` or `text` for every log line (the app's, Granian's, the access log); unset: text when "
        "stderr is a terminal, JSON otherwise. Each line has a time (UTC), a level and the logger; an "
        "exception stays on its line.",
    )
    cache_orgs: int = setting(
        "CE_CACHE_ORGS",
        Bounded(int, 1, 100_000_000),
        default=100_000,
        help="Orgs (including those without Customized images) whose images are held in memory at most.",
    )
    db_pool_size: int = setting(
        "CE_DB_POOL_SIZE",
        Bounded(int, 1, 100),
        default=1,
        help="PostgreSQL: connections each worker keeps open (the change poller's, shared with requests). "
        "Warm reads need none.",
    )
    db_pool_overflow: int = setting(
        "CE_DB_POOL_OVERFLOW",
        Bounded(int, 0, 100),
        default=1,
        help="PostgreSQL: further connections a worker may open while busy (writes, cold org loads), closed "
        "when returned. A worker uses at most CE_DB_POOL_SIZE + CE_DB_POOL_OVERFLOW (+1 with CE_DB_LISTEN).",
    )
    db_listen: bool = setting(
        "CE_DB_LISTEN",
        _bool,
        default=False,
        help="PostgreSQL: each worker also holds a LISTEN connection and applies a change as soon as it "
        "commits, instead of at the next poll (CE_POLL_INTERVAL); refused with a pgbouncer=true URL "
        "(LISTEN does not pass transaction pooling).",
    )
    cors_origins: tuple[str, ...] = setting(
        "CE_CORS_ORIGINS",
        _origins,
        default=(),
        help="CORS, off when empty: comma-separated origins (scheme://host[:port], e.g. "
        "http://localhost:5173,https://console.example.com) whose pages may call the API, or * for any. "
        "Preflights are answered for every operation (Authorization, Content-Type, If-None-Match and "
        "X-Request-ID allowed); ETag, Link, Location, Retry-After, WWW-Authenticate and X-Request-ID are "
        "exposed; error answers carry the headers too. Credentials mode (cookies) is never allowed: tokens "
        "go in Authorization, which needs none. Other origins get no Access-Control-Allow-Origin.",
    )
    root_path: str = setting(
        "CE_ROOT_PATH",
        _root_path,
        default="",
        help="Path prefix a reverse proxy strips before forwarding (e.g. /gateway when it maps "
        "https://HOST/gateway/v1/images to this service's /v1/images): Location and Link headers then "
        "carry it. Not needed for /api, which the service serves itself (the contract's server is "
        "https://console.gmicloud.ai/api): /api/v1/images answers exactly what /v1/images does, and a "
        "proxy that strips /api may set CE_ROOT_PATH=/api. Overrides the ASGI server's root_path.",
    )
    server_interface: str = setting(
        "CE_SERVER_INTERFACE",
        _interface,
        default="rsgi",
        help="How Granian calls the service: `rsgi` (its native interface: `GET /v1/images` and "
        "`GET /v1/images/{id}` answered directly, everything else through an RSGI-to-ASGI bridge into the "
        "same application; the read path pays less per request) or `asgi` (the ASGI application alone). "
        "The answers are the same either way; with CE_CORS_ORIGINS or CE_RATE_LIMIT set, `rsgi` passes "
        "every request through the bridge.",
    )

    @property
    def dev_secret_path(self) -> Path:
        return self.data_dir / "jwt-secret"


# every variable, in the order declared (docs/configuration.md's), each with the field it sets
SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(field.metadata[_SETTING], field=field.name) for field in dataclasses.fields(Settings)
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
