"""The security battery (issue #8, point 6): JWT attacks, tenancy probes and injection, over HTTP against
real server processes. Every rejection must be the exact contract body (400/401: ``errorStatusMessage``;
403/404: ``{"reason": …}``) or, where the HTTP server itself refuses a request before the app sees it, the
exact status it sends; never a 500.

What tests/test_auth.py already covers is not repeated here: lowercase ``alg: none`` (with and without a
signature), HS512 with the right secret, RS256 against a secret, expiry/nbf/iat without leeway, a
numeric ``kid``, unknown kids, HMAC signed with the PEM or JWK public key (algorithm confusion), the
header not choosing the algorithm, symmetric/unusable keys in a JWK Set, tampered claims, claim types,
the ``MAX_TOKEN_LENGTH`` boundary and non-ASCII garbage tokens. This module adds:

1. JWT attacks: every case variant of ``none`` (also with a valid HS256 signature, and without the third
   segment), on a secret and on a JWK Set served over HTTP; ``kid`` injection (path traversal, SQL,
   4000 characters, NUL, a NUL- or case-variant of a real kid, non-string kids); attacker keys in the
   ``jwk``/``jku``/``x5u``/``x5c`` headers (and no fetch of ``jku``/``x5u``); JWK Set entries with
   ``alg: none`` or private key material (in-process, like test_auth.py's key matrix); the clock leeway
   (``CE_JWT_LEEWAY``, default 0, here 30 s) on exp/nbf/iat; multi-KB JOSE headers; malformed
   base64url/JSON segments; JSON bombs (deep nesting, 5000-digit numbers) before and after the signature
   check; duplicate ``Authorization`` fields; non-ASCII and NUL bytes in the field.
2. Tenancy, on SQLite and PostgreSQL: enumerating another org's ids (GET/PATCH/DELETE answer exactly like
   a random id: status, body and headers apart from the request id), the image untouched afterwards,
   creating into another org, duplicate-name probes, filters naming another org's idc/product, ETags
   replayed by another org (lists and items, ``If-None-Match: *``), another org's pagination cursors.
3. Injection in every parameter (query ``idc``/``product``/``limit``/``cursor``, path ``{id}`` of
   GET/PATCH/DELETE, every JSON field of POST and PATCH), on SQLite and PostgreSQL: SQL metacharacters,
   LIKE wildcards, backslashes, confusables, zero-width/RTL characters, NUL, 10 kB values, double/overlong/
   invalid percent-encoding; 64 KiB+ request heads (431 from the HTTP server); malformed JSON bodies. Each
   rejected request leaves the catalog revision and both orgs' lists unchanged; accepted free-text values
   are stored and served back literally; the last test checks the whole catalog against its starting
   state and that the database still takes writes.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import http.server
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from cluster_engine.cli.main import DEMO_ORG
from cluster_engine.server.auth import MAX_TOKEN_LENGTH, Verifier, mint_token
from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.testing import LiveServer, free_port, samples

from .conftest import OTHER_ORG, STORES, Databases, start_server
from .toolkit import (
    ADMIN,
    EXPIRED_TOKEN,
    INVALID,
    INVALID_TOKEN,
    NOT_FOUND,
    REFUSED,
    ROUTE_NOT_FOUND,
    WRITE,
    assert_401,
    assert_ok,
    assert_reason,
    bearer,
)

ORG_A, ORG_B = DEMO_ORG, OTHER_ORG  # A owns Customized images; B is any other tenant
ADMIN_ORG = uuid.UUID("9a0c3e1d-7b2f-4c6a-8e5d-1f2a3b4c5d6e")
LEEWAY = 30
VOLATILE_HEADERS = {"x-request-id", "date"}


# ================================================================================= shared helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"orgId": str(uuid.uuid4()), "scope": "", "iat": now, "exp": now + 300, **changes}


def forge(
    header: dict[str, Any],
    payload: dict[str, Any] | str,
    key: Any,
    *,
    alg: str | None = None,
) -> str:
    """A hand-made JWS: ``payload`` is claims or an already encoded segment; signed with ``alg`` (default:
    the header's) and ``key``, or with no signature at all (trailing dot) when ``key`` is None."""
    segment = payload if isinstance(payload, str) else b64url_json(payload)
    signing_input = f"{b64url_json(header)}.{segment}"
    if key is None:
        return signing_input + "."
    signature = get_default_algorithms()[alg or header["alg"]].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url(signature)}"


def hs256(secret: str, payload: dict[str, Any] | str | None = None, **header: Any) -> str:
    return forge({"alg": "HS256", "typ": "JWT", **header}, payload or claims(), secret.encode())


def original(value: str) -> str:
    """``originalValue`` as the contract's validationDetail carries it: the value, bounded to 256 chars."""
    return value if len(value) <= 256 else value[:256] + "…"


def assert_400(response: httpx.Response, expected: dict[str, tuple[str, str]]) -> None:
    """Exactly the contract's 400 body, with one validationDetail per field: field → (expression, value)."""
    assert response.status_code == 400, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "group", "message", "validationDetail"}, body
    assert (body["code"], body["group"], body["message"]) == (0, "request", "Invalid request parameters.")
    got: dict[str, tuple[str, str]] = {}
    for item in body["validationDetail"]:
        assert set(item) <= {"field", "expression", "reason", "originalValue", "argument"}, item
        assert isinstance(item["reason"], str) and item["reason"]
        assert item["field"] not in got, f"{item['field']} reported twice: {body}"
        got[item["field"]] = (item["expression"], item["originalValue"])
    assert got == expected


def stable_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in VOLATILE_HEADERS}


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_http(url: str, request_head: bytes, body: bytes = b"") -> RawResponse:
    """Send bytes no HTTP client library would send (oversized, NUL, raw non-ASCII), read the answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request_head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, payload)


def raw_get(url: str, target: bytes, *fields: bytes) -> RawResponse:
    head = b"GET " + target + b" HTTP/1.1\r\nHost: test\r\n"
    head += b"".join(f + b"\r\n" for f in fields) + b"Connection: close\r\n\r\n"
    return raw_http(url, head)


def assert_http_layer_refusal(response: RawResponse, status: int) -> None:
    """Refused by the HTTP server (granian) before the app: bare status, empty body, connection closed."""
    assert response.status == status, response
    assert response.body == b""
    assert response.headers.get("content-length") == "0"
    assert response.headers.get("connection") == "close"


# ================================================================================ 1. JWT attacks


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    assert isinstance(data, dict)
    return {**data, "kid": kid, **extra}


def self_signed_x5c(key: rsa.RSAPrivateKey) -> list[str]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]


class KeyHost:
    """A tiny HTTP server for JWK Sets: the server's real one (/jwks.json) and an attacker's
    (/attacker.json, /attacker.pem); it records every path fetched."""

    def __init__(self) -> None:
        real = [rsa_jwk(rsa_key("real"), "rsa-1", alg="RS256", use="sig")]
        ec_jwk = ECAlgorithm.to_jwk(ec_key("real").public_key(), as_dict=True)
        assert isinstance(ec_jwk, dict)
        real.append({**ec_jwk, "kid": "ec-1"})
        attacker = rsa_key("attacker")
        pem = attacker.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.documents = {
            "/jwks.json": json.dumps({"keys": real}).encode(),
            "/attacker.json": json.dumps({"keys": [rsa_jwk(attacker, "rsa-1", alg="RS256")]}).encode(),
            "/attacker.pem": pem,
        }
        self.hits: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits.append(self.path)
                body = host.documents.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def key_host() -> Iterator[KeyHost]:
    host = KeyHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def hs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """CE_JWT_SECRET (HS256) with a 30 s clock leeway; auth does not depend on the store: SQLite only."""
    env = {"CE_JWT_LEEWAY": str(LEEWAY)}
    with LiveServer.start(tmp_path_factory.mktemp("sec-hs"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def jwks_server(key_host: KeyHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A JWK Set fetched over HTTP (RS256 ``rsa-1``, ES256 ``ec-1``): kids are looked up, not trusted."""
    env = {"CE_JWT_SECRET": "", "CE_JWT_JWKS": key_host.url("/jwks.json")}
    with LiveServer.start(tmp_path_factory.mktemp("sec-jwks"), env=env) as server:
        yield server


_CLIENTS: dict[tuple[str, int], httpx.Client] = {}


def http_client(server: LiveServer) -> httpx.Client:
    """One connection pool per server (closed with it): a new httpx client per request costs more than
    the request itself."""
    key = (server.url, server.process.pid)
    if key not in _CLIENTS:
        _CLIENTS[key] = server.client()
    return _CLIENTS[key]


def get_images(server: LiveServer, authorization: str | None) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    return http_client(server).get("/v1/images", headers=headers)


def rs256(payload: dict[str, Any] | None = None, key: str = "real", **header: Any) -> str:
    return forge({"alg": "RS256", "typ": "JWT", **header}, payload or claims(), rsa_key(key))


def test_well_formed_tokens_are_accepted(hs_server: LiveServer, jwks_server: LiveServer) -> None:
    """The control for everything below: the same constructions, correctly signed, are accepted."""
    assert_ok(get_images(hs_server, bearer(hs256(hs_server.secret))))
    assert_ok(get_images(jwks_server, bearer(rs256(kid="rsa-1"))))
    token = forge({"alg": "ES256", "kid": "ec-1"}, claims(), ec_key("real"))
    assert_ok(get_images(jwks_server, bearer(token)))


NONE_VARIANTS = ["none", "None", "NONE", "nOnE"]
NONE_SIGNATURES = ["empty", "garbage", "real-hs256", "two-segments"]


def none_token(alg: str, signature: str, secret: str, **header: Any) -> str:
    unsigned = forge({"alg": alg, "typ": "JWT", **header}, claims(), None)
    if signature == "empty":
        return unsigned
    if signature == "garbage":
        return unsigned + b64url(secrets.token_bytes(32))
    if signature == "two-segments":
        return unsigned[:-1]
    # the signing input correctly HMAC'd with the server's own secret: only the header's alg is wrong
    mac = hmac.new(secret.encode(), unsigned[:-1].encode(), hashlib.sha256).digest()
    return unsigned + b64url(mac)


@pytest.mark.parametrize("signature", NONE_SIGNATURES)
@pytest.mark.parametrize("alg", NONE_VARIANTS)
def test_alg_none_in_every_case_is_rejected(hs_server: LiveServer, alg: str, signature: str) -> None:
    assert_401(get_images(hs_server, bearer(none_token(alg, signature, hs_server.secret))))


@pytest.mark.parametrize("signature", ["empty", "garbage", "two-segments"])
@pytest.mark.parametrize("alg", NONE_VARIANTS)
def test_alg_none_in_every_case_is_rejected_by_a_jwk_set(
    jwks_server: LiveServer, alg: str, signature: str
) -> None:
    assert_401(get_images(jwks_server, bearer(none_token(alg, signature, "", kid="rsa-1"))))


INJECTED_KIDS = [
    pytest.param("../../etc/passwd", id="path-traversal"),
    pytest.param("/dev/null", id="absolute-path"),
    pytest.param("' OR 1=1 --", id="sql"),
    pytest.param("k" * 4000, id="4000-chars"),
    pytest.param("rsa-1\x00", id="real-kid-with-nul"),
    pytest.param("a\x00b", id="nul-inside"),
    pytest.param("RSA-1", id="real-kid-other-case"),
    pytest.param(" rsa-1", id="real-kid-leading-space"),
    pytest.param("http://127.0.0.1:1/jwks.json", id="url"),
]
NON_STRING_KIDS = [
    pytest.param(None, id="null"),
    pytest.param(1.5, id="float"),
    pytest.param(True, id="bool"),
    pytest.param(["rsa-1"], id="list-with-real-kid"),
    pytest.param({"kid": "rsa-1"}, id="object"),
]


@pytest.mark.parametrize("kid", INJECTED_KIDS + NON_STRING_KIDS)
def test_jwks_kid_injection_is_rejected(jwks_server: LiveServer, kid: Any) -> None:
    """Signed with the real ``rsa-1`` key: only the kid is wrong, and it must match a key exactly."""
    assert_401(get_images(jwks_server, bearer(rs256(kid=kid))))


@pytest.mark.parametrize("kid", INJECTED_KIDS)
def test_kid_is_ignored_with_a_single_secret(hs_server: LiveServer, kid: str) -> None:
    """With one configured secret the kid selects nothing: a correctly signed token is accepted whatever
    its (string) kid says, a wrongly signed one is not."""
    assert_ok(get_images(hs_server, bearer(hs256(hs_server.secret, kid=kid))))
    assert_401(get_images(hs_server, bearer(hs256(secrets.token_urlsafe(48), kid=kid))))


@pytest.mark.parametrize("kid", NON_STRING_KIDS)
def test_non_string_kid_is_rejected_with_a_single_secret(hs_server: LiveServer, kid: Any) -> None:
    assert_401(get_images(hs_server, bearer(hs256(hs_server.secret, kid=kid))))


EMBEDDED_KEYS: list[Any] = [
    pytest.param(lambda h: {"jwk": rsa_jwk(rsa_key("attacker"), "rsa-1")}, id="jwk-with-real-kid"),
    pytest.param(lambda h: {"kid": "attacker", "jwk": rsa_jwk(rsa_key("attacker"), "attacker")}, id="jwk"),
    pytest.param(lambda h: {"kid": "rsa-1", "jku": h.url("/attacker.json")}, id="jku"),
    pytest.param(lambda h: {"kid": "attacker", "jku": h.url("/attacker.json")}, id="jku-unknown-kid"),
    pytest.param(lambda h: {"kid": "rsa-1", "x5u": h.url("/attacker.pem")}, id="x5u"),
    pytest.param(lambda h: {"kid": "rsa-1", "x5c": self_signed_x5c(rsa_key("attacker"))}, id="x5c"),
]


@pytest.mark.parametrize("embed", EMBEDDED_KEYS)
def test_keys_embedded_in_the_header_are_ignored(
    jwks_server: LiveServer, key_host: KeyHost, embed: Callable[[KeyHost], dict[str, Any]]
) -> None:
    """Signed by the attacker's key, which the header points at or carries: rejected, never fetched."""
    token = rs256(key="attacker", **embed(key_host))
    assert_401(get_images(jwks_server, bearer(token)))
    assert_401(get_images(jwks_server, bearer(token)))  # and again: a refused token is not cached
    assert not [path for path in key_host.hits if path.startswith("/attacker")], key_host.hits


def test_embedded_keys_are_ignored_with_a_single_secret(hs_server: LiveServer, key_host: KeyHost) -> None:
    attacker_secret = secrets.token_bytes(32)
    oct_jwk = {"kty": "oct", "k": b64url(attacker_secret), "kid": "attacker"}
    for header in (
        {"jwk": oct_jwk},
        {"kid": "attacker", "jku": key_host.url("/attacker.json")},
        {"x5c": self_signed_x5c(rsa_key("attacker"))},
    ):
        token = forge({"alg": "HS256", "typ": "JWT", **header}, claims(), attacker_secret)
        assert_401(get_images(hs_server, bearer(token)))
    token = rs256(key="attacker", jwk=rsa_jwk(rsa_key("attacker"), "attacker"))
    assert_401(get_images(hs_server, bearer(token)))
    assert not [path for path in key_host.hits if path.startswith("/attacker")], key_host.hits


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(
            lambda: {**rsa_jwk(rsa_key("real"), "rsa-1"), "alg": "none"}, id="public-key-with-alg-none"
        ),
        pytest.param(
            lambda: {**RSAAlgorithm.to_jwk(rsa_key("real"), as_dict=True), "kid": "rsa-1", "alg": "RS256"},
            id="private-key",
        ),
        pytest.param(lambda: {**rsa_jwk(rsa_key("real"), "rsa-1"), "use": "enc"}, id="encryption-key"),
    ],
)
def test_jwk_set_with_unusable_entries_is_a_config_error(
    tmp_path: Path, entry: Callable[[], dict[str, Any]]
) -> None:
    """Like the symmetric keys test_auth.py covers: refused at configuration with a ConfigError (which
    ``serve`` reports as "JWT key configuration: …"), not loaded and not a traceback."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [entry()]}))
    with pytest.raises(ConfigError):
        Verifier(load_settings({"CE_DATA_DIR": str(tmp_path / "data"), "CE_JWT_JWKS": str(path)}))


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        pytest.param({"exp": -10}, "ok", id="exp-10s-ago-within-leeway"),
        pytest.param({"exp": -(LEEWAY + 60)}, "expired", id="exp-beyond-leeway"),
        pytest.param({"nbf": 10}, "ok", id="nbf-10s-ahead-within-leeway"),
        pytest.param({"nbf": LEEWAY + 60}, "invalid", id="nbf-beyond-leeway"),
        pytest.param({"iat": 10}, "ok", id="iat-10s-ahead-within-leeway"),
        pytest.param({"iat": LEEWAY + 60}, "invalid", id="iat-beyond-leeway"),
        pytest.param({"iat": LEEWAY + 86400 * 365}, "invalid", id="iat-next-year"),
        pytest.param({"nbf": "soon"}, "invalid", id="nbf-not-a-number"),
        pytest.param({"iat": "now"}, "invalid", id="iat-not-a-number"),
        pytest.param({"nbf": None}, "invalid", id="nbf-null"),
    ],
)
def test_time_claims_and_the_configured_leeway(
    hs_server: LiveServer, changes: dict[str, Any], outcome: str
) -> None:
    now = int(time.time())
    payload = claims(**{k: now + v if isinstance(v, int) else v for k, v in changes.items()})
    response = get_images(hs_server, bearer(hs256(hs_server.secret, payload)))
    if outcome == "ok":
        assert_ok(response)
    else:
        assert_401(response, EXPIRED_TOKEN if outcome == "expired" else INVALID_TOKEN)


def test_multi_kilobyte_jose_header(hs_server: LiveServer) -> None:
    """A 5 KB header JSON is only bytes under the signature; past MAX_TOKEN_LENGTH it is refused unread."""
    fits = hs256(hs_server.secret, padding="p" * 5000)
    assert 6000 < len(fits) <= MAX_TOKEN_LENGTH
    assert_ok(get_images(hs_server, bearer(fits)))
    assert_401(get_images(hs_server, bearer(hs256(secrets.token_urlsafe(48), padding="p" * 5000))))
    too_long = hs256(hs_server.secret, padding="p" * 6500)
    assert len(too_long) > MAX_TOKEN_LENGTH
    assert_401(get_images(hs_server, bearer(too_long)))
    many = hs256(hs_server.secret, **{f"h{i}": i for i in range(500)})
    assert len(many) <= MAX_TOKEN_LENGTH
    assert_ok(get_images(hs_server, bearer(many)))


def test_authorization_beyond_the_header_limit_is_431(hs_server: LiveServer) -> None:
    """CE_HTTP_MAX_HEADER_BYTES (64 KiB): granian refuses the request head before the app runs."""
    url = hs_server.url
    just_over = raw_get(url, b"/v1/images", b"Authorization: Bearer " + b"a" * (MAX_TOKEN_LENGTH + 1))
    assert just_over.status == 401 and json.loads(just_over.body) == INVALID
    # hyper checks the limit between reads of its growing buffer: a head is refused once it is past it at
    # such a check, at the latest past twice the limit (HTTP/1 mode, see cli.serve)
    assert_http_layer_refusal(raw_get(url, b"/v1/images", b"Authorization: Bearer " + b"a" * 140_000), 431)
    assert_http_layer_refusal(raw_get(url, b"/v1/images", b"X-Padding: " + b"a" * 140_000), 431)


HEADER_ARRAY = b64url(b'["HS256"]')
HEADER_STRING = b64url(b'"HS256"')
HEADER_BIG_NUMBER = b64url(b'{"alg":"HS256","x":' + b"9" * 5000 + b"}")


def _malformed(secret: str) -> dict[str, str]:
    header, payload, signature = hs256(secret).split(".")
    return {
        "bang-in-header": f"{header[:4]}!{header[4:]}.{payload}.{signature}",
        "bang-in-payload": f"{header}.{payload[:4]}!{payload[4:]}.{signature}",
        "bang-in-signature": f"{header}.{payload}.{signature[:4]}!{signature[4:]}",
        "standard-alphabet-signature": f"{header}.{payload}.{signature}+/",
        "double-padding-on-signature": f"{header}.{payload}.{signature}==",
        "padding-inside-header": f"{header[:4]}=={header[4:]}.{payload}.{signature}",
        "space-inside-token": f"{header} .{payload}.{signature}",
        "empty-segments": "..",
        "empty-header": f".{payload}.{signature}",
        "empty-payload": f"{header}..{signature}",
        "header-not-json": b64url(b"alg=HS256") + f".{payload}.{signature}",
        "header-json-array": f"{HEADER_ARRAY}.{payload}.{signature}",
        "header-json-string": f"{HEADER_STRING}.{payload}.{signature}",
        "header-json-null": f"{b64url(b'null')}.{payload}.{signature}",
        "header-not-utf8": b64url(b"\xff\xfe{}") + f".{payload}.{signature}",
        "signed-payload-array": hs256(secret, b64url(b"[1,2]")),
        "signed-payload-not-json": hs256(secret, b64url(b"orgId=x")),
        "signed-payload-not-utf8": hs256(secret, b64url(b'{"orgId":"\xff"}')),
        "signed-payload-null": hs256(secret, b64url(b"null")),
        "unknown-crit-extension": hs256(secret, crit=["x-attack"], **{"x-attack": 1}),
        "unencoded-payload-b64-false": hs256(secret, b64=False, crit=["b64"]),
    }


MALFORMED_IDS = list(_malformed("x" * 32))


@pytest.mark.parametrize("case", MALFORMED_IDS)
def test_malformed_segments_are_rejected(hs_server: LiveServer, case: str) -> None:
    assert_401(get_images(hs_server, bearer(_malformed(hs_server.secret)[case])))


def _claims_with(raw_claim: bytes) -> str:
    """A payload segment: valid claims plus one member spliced in verbatim."""
    text = json.dumps(claims(), separators=(",", ":")).encode()
    return b64url(text[:-1] + b',"x":' + raw_claim + b"}")


@pytest.mark.parametrize(
    ("build", "accepted"),
    [
        pytest.param(
            lambda s: b64url(b"[" * 2500 + b"]" * 2500) + f".{b64url_json(claims())}.sig",
            False,
            id="header-nested-2500-deep",
        ),
        pytest.param(
            lambda s: f"{HEADER_BIG_NUMBER}.{b64url_json(claims())}.sig",
            False,
            id="header-5000-digit-number",
        ),
        pytest.param(
            lambda s: forge({"alg": "HS256"}, _claims_with(b"[" * 1500 + b"]" * 1500), b"wrong" * 8),
            False,
            id="unsigned-claims-nested-1500-deep",
        ),
        pytest.param(
            lambda s: hs256(s, _claims_with(b"[" * 1500 + b"]" * 1500)),
            False,
            id="signed-claims-nested-1500-deep",
        ),
        pytest.param(
            lambda s: hs256(s, _claims_with(b'{"":' * 1100 + b"1" + b"}" * 1100)),
            False,
            id="signed-claims-objects-1100-deep",
        ),
        pytest.param(
            lambda s: hs256(s, _claims_with(b"9" * 5000)), False, id="signed-claims-5000-digit-number"
        ),
        pytest.param(
            lambda s: hs256(s, _claims_with(b"[" * 100 + b"]" * 100)), True, id="signed-claims-100-deep"
        ),
    ],
)
def test_json_bombs(hs_server: LiveServer, build: Callable[[str], str], accepted: bool) -> None:
    token = build(hs_server.secret)
    assert len(token) <= MAX_TOKEN_LENGTH  # the bomb reaches the parser, not the length check
    response = get_images(hs_server, bearer(token))
    if accepted:
        assert_ok(response)
    else:
        assert_401(response)


DUPLICATES = [
    pytest.param(["bad", "good"]),
    pytest.param(["good", "bad"]),
    pytest.param(["good", "other-org"]),
    pytest.param(["good", "good"]),
]


def _duplicate_fields(server: LiveServer, order: list[str], scopes: Sequence[str]) -> list[tuple[str, str]]:
    tokens = {
        "good": mint_token(server.secret, ORG_A, scopes=list(scopes)),
        "other-org": mint_token(server.secret, ORG_B, scopes=list(scopes)),
        "bad": "not-a-token",
    }
    return [("Authorization", bearer(tokens[name])) for name in order]


@pytest.mark.parametrize("order", DUPLICATES, ids=lambda order: "-then-".join(order))
def test_duplicate_authorization_fields_are_refused_on_reads(hs_server: LiveServer, order: list[str]) -> None:
    """Authorization is a singleton field (RFC 9110 §11.6.2): with two, which one a proxy checked and
    which one the service uses may differ, so the request carries no usable credentials."""
    response = http_client(hs_server).get("/v1/images", headers=_duplicate_fields(hs_server, order, ()))
    assert_401(response, REFUSED)


@pytest.mark.parametrize("order", DUPLICATES, ids=lambda order: "-then-".join(order))
def test_duplicate_authorization_fields_are_refused_on_writes(
    hs_server: LiveServer, order: list[str]
) -> None:
    headers = _duplicate_fields(hs_server, order, (WRITE, ADMIN))
    response = http_client(hs_server).post("/v1/images", headers=headers, json={})
    assert_401(response, REFUSED)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        pytest.param("Bearer é".encode(), 401, id="utf8-token"),
        pytest.param(b"Bearer \xe9\xe8\xff", 401, id="latin1-token"),
        pytest.param(b"B\xe9arer {good}", 401, id="latin1-in-scheme"),
        pytest.param("Bearer {good}é".encode(), 401, id="valid-token-with-utf8-suffix"),
        pytest.param(b"Bearer {good}\x00", 400, id="valid-token-with-nul"),
        pytest.param(b"Bearer \x00{good}", 400, id="nul-before-token"),
        pytest.param(b"Bearer {good}\x7f", 400, id="valid-token-with-del"),
    ],
)
def test_non_ascii_and_control_bytes_in_authorization(
    hs_server: LiveServer, value: bytes, status: int
) -> None:
    """Latin-1 and UTF-8 bytes reach the verifier and fail it (401); NUL and DEL are not allowed in a field
    value at all (RFC 9110 §5.5), so granian refuses the request with a bare 400 before the app sees it."""
    good = mint_token(hs_server.secret, ORG_A).encode()
    response = raw_get(hs_server.url, b"/v1/images", b"Authorization: " + value.replace(b"{good}", good))
    if status == 400:
        assert_http_layer_refusal(response, 400)
    else:
        assert response.status == 401
        assert response.headers["content-type"] == "application/json"
        assert json.loads(response.body) == INVALID


# =============================================================================== shared target


@dataclass
class Target:
    """A server with the demo catalog (org A owns two Customized images) plus a secret image of A's in an
    idc and product nobody else uses, on one store; and the lists every org saw at the start."""

    server: LiveServer
    store: str
    http: httpx.Client
    secret: dict[str, Any]
    baseline: dict[uuid.UUID, bytes] = field(default_factory=dict)
    tokens: dict[tuple[uuid.UUID, tuple[str, ...]], str] = field(default_factory=dict)

    def headers(self, org: uuid.UUID, scopes: Sequence[str] = ()) -> dict[str, str]:
        key = (org, tuple(scopes))
        if key not in self.tokens:
            self.tokens[key] = mint_token(self.server.secret, org, scopes=list(scopes))
        return {"Authorization": bearer(self.tokens[key])}

    def request(
        self,
        method: str,
        target: str,
        org: uuid.UUID,
        scopes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        all_headers = {**self.headers(org, scopes), **(headers or {})}
        return self.http.request(method, target, headers=all_headers, **kwargs)

    def patch(self, org: uuid.UUID, scopes: Sequence[str], image_id: str, patch: Any) -> httpx.Response:
        return self.request(
            "PATCH",
            f"/v1/images/{image_id}",
            org,
            scopes,
            headers={"Content-Type": "application/merge-patch+json"},
            content=json.dumps(patch).encode(),
        )

    def list_body(self, org: uuid.UUID) -> bytes:
        response = self.request("GET", "/v1/images", org)
        assert response.status_code == 200
        return response.content

    def revision(self) -> int:
        revision = self.http.get("/readyz").json()["revision"]
        assert isinstance(revision, int)
        return revision

    def state(self) -> tuple[int, bytes, bytes]:
        """What a rejected request must not change: the catalog revision and both orgs' lists."""
        return self.revision(), self.list_body(ORG_A), self.list_body(ORG_B)

    def create(
        self, org: uuid.UUID, body: dict[str, Any], scopes: Sequence[str] = (WRITE,)
    ) -> dict[str, Any]:
        response = self.request("POST", "/v1/images", org, scopes, json=body)
        assert response.status_code == 201, response.text
        image: dict[str, Any] = response.json()
        return image

    def delete(self, image_id: str) -> None:
        response = self.request("DELETE", f"/v1/images/{image_id}", ADMIN_ORG, (ADMIN,))
        assert response.status_code == 204, response.text


def image_body(org: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    """A valid POST /v1/images body (an ImageCreateReq) with a fresh name; ``overrides`` replace fields."""
    return samples.image_body(org, **{"name": f"sec-{uuid.uuid4().hex[:12]}", **overrides})


SECRET_IDC = "tenant-a-private-idc"
SECRET_PRODUCT = "tenant-a.private.product"


@pytest.fixture(scope="module", params=STORES)
def target(
    request: pytest.FixtureRequest, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    directory: Path = tmp_path_factory.mktemp(f"security-{request.param}")
    with start_server(databases, request.param, directory, "--demo") as server:
        target = Target(server=server, store=request.param, http=server.client(), secret={})
        body = image_body(ORG_A, idc=SECRET_IDC, name="a-private-image", supportedProducts=[SECRET_PRODUCT])
        target.secret = target.create(ORG_A, body)
        for org in (ORG_A, ORG_B, ADMIN_ORG):
            target.baseline[org] = target.list_body(org)
        yield target


def customized_of_a(target: Target) -> list[dict[str, Any]]:
    images = json.loads(target.baseline[ORG_A])
    owned = [i for i in images if i["type"] == "Customized"]
    assert len(owned) == 3  # the demo's two and the secret one
    return owned


# ============================================================================== 2. tenancy probes


def test_other_orgs_ids_answer_exactly_like_missing_ones(target: Target) -> None:
    for image in customized_of_a(target):
        own = target.request("GET", f"/v1/images/{image['id']}", ORG_A)
        assert own.status_code == 200 and own.json() == image
        variants = [
            (image["id"], {}),
            (image["id"].upper(), {}),
            (image["id"], {"If-None-Match": own.headers["etag"]}),
            (image["id"], {"If-None-Match": "*"}),
        ]
        for image_id, headers in variants:
            missing_id = str(uuid.uuid4())
            missing_id = missing_id.upper() if image_id.isupper() else missing_id
            hidden = target.request("GET", f"/v1/images/{image_id}", ORG_B, headers=headers)
            missing = target.request("GET", f"/v1/images/{missing_id}", ORG_B, headers=headers)
            assert hidden.status_code == missing.status_code == 404, (image_id, headers)
            assert hidden.content == missing.content
            assert hidden.json() == NOT_FOUND
            assert stable_headers(hidden) == stable_headers(missing)


@pytest.mark.parametrize(
    ("scopes", "status"),
    [pytest.param((WRITE,), 404, id="images-write"), pytest.param((), 403, id="no-scope")],
)
def test_patch_and_delete_across_orgs_reveal_nothing_and_change_nothing(
    target: Target, scopes: tuple[str, ...], status: int
) -> None:
    before = target.state()
    items = {i["id"]: target.request("GET", f"/v1/images/{i['id']}", ORG_A) for i in customized_of_a(target)}
    attempts: list[tuple[str, Any]] = [
        ("PATCH", {"OSVersion": "hacked"}),
        ("PATCH", {"name": "!! not a valid name"}),  # validation must not run before the visibility check
        ("PATCH", {"orgId": str(ORG_B)}),
        ("PATCH", []),
        ("DELETE", None),
    ]
    for image_id in items:
        for method, patch in attempts:
            responses = []
            for probe in (image_id, str(uuid.uuid4())):
                if method == "PATCH":
                    responses.append(target.patch(ORG_B, scopes, probe, patch))
                else:
                    responses.append(target.request("DELETE", f"/v1/images/{probe}", ORG_B, scopes))
            hidden, missing = responses
            assert hidden.status_code == missing.status_code == status, (method, patch, hidden.text)
            assert hidden.content == missing.content
            # A 403 is sent before the body is read, and granian then closes the connection or not,
            # depending on timing; otherwise the headers match too.
            ignored = {"connection"} if status == 403 else set()
            assert {k: v for k, v in stable_headers(hidden).items() if k not in ignored} == {
                k: v for k, v in stable_headers(missing).items() if k not in ignored
            }
            if status == 404:
                assert hidden.json() == NOT_FOUND
            else:
                assert set(hidden.json()) == {"reason"}
    assert target.state() == before
    for image_id, response in items.items():
        again = target.request("GET", f"/v1/images/{image_id}", ORG_A)
        assert (again.content, again.headers["etag"]) == (response.content, response.headers["etag"])


def test_creating_into_another_org(target: Target) -> None:
    before = target.state()
    response = target.request("POST", "/v1/images", ORG_B, (WRITE,), json=image_body(ORG_A))
    assert_reason(response, 403, "images:write creates images for the caller's own org only")
    response = target.request(
        "POST", "/v1/images", ORG_B, (WRITE,), json=image_body(ORG_A, type="Customized")
    )
    assert_reason(response, 403, "images:write creates images for the caller's own org only")
    response = target.request("POST", "/v1/images", ORG_B, (WRITE,), json=image_body(ORG_B, type="Public"))
    assert_reason(response, 403, "publishing Public images needs the images:admin scope")
    response = target.request("POST", "/v1/images", ORG_B, (), json=image_body(ORG_B))
    assert_reason(response, 403, "this operation needs the images:write or images:admin scope")
    assert target.state() == before
    # images:admin may create for any org: the image is A's, and B still can't see it
    created = target.create(ADMIN_ORG, image_body(ORG_A), scopes=(ADMIN,))
    try:
        assert created["orgId"] == str(ORG_A) and created["type"] == "Customized"
        assert created["id"] in {i["id"] for i in json.loads(target.list_body(ORG_A))}
        assert target.list_body(ORG_B) == before[2]
        assert target.request("GET", f"/v1/images/{created['id']}", ORG_B).json() == NOT_FOUND
    finally:
        target.delete(created["id"])


def test_duplicate_names_do_not_reveal_other_orgs_names(target: Target) -> None:
    """Names are unique per idc and owner: B reusing A's secret name and idc gets a 201, not a 409."""
    secret = target.secret
    body = image_body(ORG_B, idc=secret["idc"], name=secret["name"])
    created = target.create(ORG_B, body)
    try:
        conflict = target.request("POST", "/v1/images", ORG_B, (WRITE,), json=body)
        assert_reason(conflict, 409, conflict.json().get("reason", ""))  # B's own duplicate is a 409
    finally:
        target.delete(created["id"])


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"idc": SECRET_IDC}, id="idc"),
        pytest.param({"product": SECRET_PRODUCT}, id="product"),
        pytest.param({"idc": SECRET_IDC, "product": SECRET_PRODUCT}, id="idc-and-product"),
        pytest.param({"idc": SECRET_IDC, "limit": "1"}, id="idc-paginated"),
        pytest.param({"product": SECRET_PRODUCT, "limit": "1000"}, id="product-paginated"),
    ],
)
def test_filters_naming_another_orgs_idc_or_product_reveal_nothing(
    target: Target, query: dict[str, str]
) -> None:
    own = target.request("GET", "/v1/images", ORG_A, params=query)
    assert [i["id"] for i in own.json()] == [target.secret["id"]]
    probe = target.request("GET", "/v1/images", ORG_B, params=query)
    never_used = {k: ("never-used-" + v if k != "limit" else v) for k, v in query.items()}
    control = target.request("GET", "/v1/images", ORG_B, params=never_used)
    assert probe.status_code == control.status_code == 200
    assert probe.json() == control.json() == []
    assert probe.headers["etag"] == control.headers["etag"]
    assert "link" not in probe.headers


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({}, id="whole-list"),
        pytest.param({"idc": "us-west-1"}, id="idc-with-a-demo-customized-image"),
        pytest.param({"idc": SECRET_IDC}, id="secret-idc"),
        pytest.param({"limit": "1000"}, id="paginated"),
    ],
)
def test_etag_from_one_org_is_not_a_validator_for_another(target: Target, query: dict[str, str]) -> None:
    a_first = target.request("GET", "/v1/images", ORG_A, params=query)
    etag = a_first.headers["etag"]
    a_again = target.request("GET", "/v1/images", ORG_A, params=query, headers={"If-None-Match": etag})
    assert a_again.status_code == 304  # the control: the validator works for its own org
    b_plain = target.request("GET", "/v1/images", ORG_B, params=query)
    assert b_plain.content != a_first.content  # the visible sets differ
    for validator in (etag, f"W/{etag}", f'"x", {etag}'):
        replay = target.request(
            "GET", "/v1/images", ORG_B, params=query, headers={"If-None-Match": validator}
        )
        assert replay.status_code == 200, validator
        assert replay.content == b_plain.content
        assert replay.headers["etag"] == b_plain.headers["etag"] != etag


def _walk(target: Target, org: uuid.UUID) -> list[tuple[dict[str, Any], str | None]]:
    """Every image of ``org``'s list one page at a time, with the cursor each page's Link header gave."""
    pages: list[tuple[dict[str, Any], str | None]] = []
    params: dict[str, str] = {"limit": "1"}
    while True:
        response = target.request("GET", "/v1/images", org, params=params)
        [image] = response.json()
        link = response.headers.get("link")
        cursor = None
        if link is not None:
            match = re.search(r"[?&]cursor=([^&>]+)", link)
            assert match is not None, link
            cursor = match.group(1)
        pages.append((image, cursor))
        if cursor is None:
            return pages
        params = {"limit": "1", "cursor": cursor}


def test_cursors_from_another_org_reveal_nothing(target: Target) -> None:
    a_pages = _walk(target, ORG_A)
    b_list = json.loads(target.list_body(ORG_B))
    assert [image for image, _ in a_pages] == json.loads(target.list_body(ORG_A))
    probed = 0
    for image, cursor in a_pages:
        if image["type"] != "Customized" or cursor is None:
            continue
        probed += 1
        key = (image["createdAt"], image["id"])
        after = [i for i in b_list if (i["createdAt"], i["id"]) > key]
        response = target.request("GET", "/v1/images", ORG_B, params={"cursor": cursor, "limit": "1000"})
        assert response.status_code == 200
        assert response.json() == after  # a position in B's own list, nothing of A's
        assert "link" not in response.headers
        response = target.request(
            "GET", "/v1/images", ORG_B, params={"cursor": cursor, "limit": "1000", "idc": image["idc"]}
        )
        assert response.json() == [i for i in after if i["idc"] == image["idc"]]
    assert probed >= 2


# ================================================================================= 3. injection


@dataclass(frozen=True)
class Payload:
    id: str
    value: str  # as the server must see it, decoded
    encoded: str | None = None  # the raw percent-encoding to send in a URL (default: quote(value))

    def in_url(self) -> str:
        return self.encoded if self.encoded is not None else quote(self.value, safe="")


PAYLOADS = [
    Payload("sql-or", "' OR '1'='1"),
    Payload("sql-drop", '"; DROP TABLE images; --'),
    Payload("sql-comment", "us-west-1'--"),
    Payload("sql-union", "x' UNION SELECT id FROM images --"),
    Payload("like-percent", "%"),
    Payload("like-underscore", "_"),
    Payload("like-pattern", "us_west_1"),
    Payload("backslash", "\\"),
    Payload("backslash-quote", "\\'"),
    Payload("cyrillic-a", "us-e\u0430st-1"),
    Payload("fullwidth-digits", "\uff11\uff10"),
    Payload("zero-width-joiner", "us-west\u200d-1"),
    Payload("rtl-override", "\u202eus-west-1"),
    Payload("nul", "\x00"),
    Payload("nul-suffix", "us-west-1\x00"),
    Payload("long-10k", "a" * 10_000),
]
URL_TRICKS = [
    Payload("double-encoded-quote", "%27", "%2527"),
    Payload("double-encoded-slash", "..%2F..%2F", "..%252F..%252F"),
    Payload("overlong-utf8-dot", "\ufffd\ufffd", "%C0%AE"),
    Payload("invalid-utf8", "\ufffd", "%FF"),
    Payload("truncated-escape", "%", "%"),
    Payload("bad-escape", "%zz", "%zz"),
]
URL_PAYLOADS = PAYLOADS + URL_TRICKS

# The contract's constraints (components/schemas idcName, productName, name, partition, ImageCreateReq).
IDC_RE, PRODUCT_RE = re.compile(r"[a-zA-Z0-9._-]+"), re.compile(r"[a-zA-Z0-9._-]+")
NAME_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_\-. ]*)?[A-Za-z0-9]")


def query_expression(param: str, value: str) -> str | None:
    """The validationDetail expression the contract gives a query value (None: it is valid)."""
    if param in ("idc", "product"):
        regex, longest = (IDC_RE, 50) if param == "idc" else (PRODUCT_RE, 256)
        if len(value) > longest:
            return "max"
        return None if regex.fullmatch(value) else "pattern"
    return {"limit": "range", "cursor": "cursor"}[param]


@pytest.mark.parametrize("payload", URL_PAYLOADS, ids=lambda p: p.id)
@pytest.mark.parametrize("param", ["idc", "product", "limit", "cursor"])
def test_query_injection(target: Target, param: str, payload: Payload) -> None:
    before = target.state()
    response = target.request("GET", f"/v1/images?{param}={payload.in_url()}", ORG_A)
    expression = query_expression(param, payload.value)
    if expression is None:  # e.g. "_" or "us_west_1": valid names that match nothing, LIKE-style or not
        assert response.status_code == 200 and response.json() == []
    else:
        assert_400(response, {param: (expression, original(payload.value))})
    assert target.state() == before


def test_like_wildcards_match_only_literally(target: Target) -> None:
    for param, literal, wildcard in [
        ("idc", "us-west-1", "us_west_1"),
        ("idc", "us-west-1", "us-west-_"),
        ("product", "gpu.h100.8x", "gpu_h100_8x"),
        ("product", "gpu.h100.8x", "gpu.h100.__"),
        ("idc", SECRET_IDC, SECRET_IDC.replace("-", "_")),
    ]:
        assert target.request("GET", "/v1/images", ORG_A, params={param: literal}).json() != []
        assert target.request("GET", "/v1/images", ORG_A, params={param: wildcard}).json() == []


@pytest.mark.parametrize(
    "payload",
    [*URL_PAYLOADS, Payload("encoded-slash-traversal", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd")],
    ids=lambda p: p.id,
)
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_path_id_injection(target: Target, method: str, payload: Payload) -> None:
    before = target.state()
    kwargs: dict[str, Any] = {"json": {"OSVersion": "1"}} if method == "PATCH" else {}
    response = target.request(method, f"/v1/images/{payload.in_url()}", ORG_A, (WRITE, ADMIN), **kwargs)
    if "/" in payload.value:  # no longer one path segment: no route matches
        assert_reason(response, 404, ROUTE_NOT_FOUND["reason"])
    else:
        assert_400(response, {"id": ("uuid", original(payload.value))})
    assert target.state() == before


# Every string field of a POST body, where it sits, and the contract's rule for it.
BODY_FIELDS: list[tuple[str, str]] = [
    ("idc", "idc"),
    ("orgId", "uuid"),
    ("path", "text"),
    ("name", "name"),
    ("OSSeries", "text"),
    ("OSVersion", "text"),
    ("OSArchitecture", "text"),
    ("BootMode", "enum"),
    ("SystemDiskSize", "text"),
    ("DefaultPartitionTable[0].name", "name"),
    ("DefaultPartitionTable[0].mountPoint", "text-1024"),
    ("DefaultPartitionTable[0].size", "text-256"),
    ("DefaultPartitionTable[0].fileSystem", "text-256"),
    ("icon", "uri"),
    ("supportedProducts[0]", "product"),
    ("type", "enum"),
]
FREE_TEXT = [f for f, rule in BODY_FIELDS if rule.startswith("text")]
MUTABLE = [f for f, _ in BODY_FIELDS if f not in ("idc", "orgId", "type")]


def body_expression(rule: str, value: str) -> str | None:
    if "\x00" in value:  # the service's own rule for every string field, array items included
        return "printable"
    if rule.startswith("text"):
        longest = int(rule.split("-")[1]) if "-" in rule else None
        return "max" if longest is not None and len(value) > longest else None
    if rule in ("idc", "product", "name"):
        regex, longest = {"idc": (IDC_RE, 50), "product": (PRODUCT_RE, 256), "name": (NAME_RE, 255)}[rule]
        return "max" if len(value) > longest else None if regex.fullmatch(value) else "pattern"
    return {"uuid": "uuid", "enum": "oneof", "uri": "uri"}[rule]  # no payload is a UUID, enum or URI


def set_field(body: dict[str, Any], path: str, value: str) -> None:
    if path.startswith("DefaultPartitionTable[0]."):
        body["DefaultPartitionTable"] = [{**body["DefaultPartitionTable"][0], path.split(".", 1)[1]: value}]
    elif path == "supportedProducts[0]":
        body["supportedProducts"] = [value]
    else:
        body[path] = value


def get_field(image: dict[str, Any], path: str) -> Any:
    if path.startswith("DefaultPartitionTable[0]."):
        return image["DefaultPartitionTable"][0][path.split(".", 1)[1]]
    if path == "supportedProducts[0]":
        return image["supportedProducts"][0]
    return image[path]


def expected_details(fields: Sequence[str], value: str) -> dict[str, tuple[str, str]]:
    rules = dict(BODY_FIELDS)
    expected = {f: body_expression(rules[f], value) for f in fields}
    return {f: (e, original(value)) for f, e in expected.items() if e is not None}


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.id)
def test_post_body_injection(target: Target, payload: Payload) -> None:
    before = target.state()
    body = image_body(ORG_A)
    for path, _ in BODY_FIELDS:
        set_field(body, path, payload.value)
    everywhere = target.request("POST", "/v1/images", ORG_A, (WRITE,), json=body)
    assert_400(everywhere, expected_details([f for f, _ in BODY_FIELDS], payload.value))
    assert target.state() == before

    body = image_body(ORG_A)
    for path in FREE_TEXT:
        set_field(body, path, payload.value)
    response = target.request("POST", "/v1/images", ORG_A, (WRITE,), json=body)
    expected = expected_details(FREE_TEXT, payload.value)
    if expected:
        assert_400(response, expected)
        assert target.state() == before
        return
    assert response.status_code == 201, response.text
    created = response.json()
    try:  # stored and served back byte for byte, visible to its owner only
        stored = target.request("GET", f"/v1/images/{created['id']}", ORG_A).json()
        assert stored == created
        assert all(get_field(stored, path) == payload.value for path in FREE_TEXT)
        assert created in json.loads(target.list_body(ORG_A))
        assert target.list_body(ORG_B) == before[2]
    finally:
        target.delete(created["id"])
    assert target.state()[1:] == before[1:]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.id)
def test_patch_body_injection(target: Target, payload: Payload) -> None:
    image = target.create(ORG_A, image_body(ORG_A))
    try:
        before = target.state()
        patch = image_body(ORG_A, name=image["name"])
        for path in MUTABLE:
            set_field(patch, path, payload.value)
        patch = {k: v for k, v in patch.items() if k in {p.split("[")[0] for p in MUTABLE}}
        response = target.patch(ORG_A, (WRITE,), image["id"], patch)
        assert_400(response, expected_details(MUTABLE, payload.value))
        assert target.state() == before
        assert target.request("GET", f"/v1/images/{image['id']}", ORG_A).json() == image

        patch = image_body(ORG_A)
        for path in FREE_TEXT:
            set_field(patch, path, payload.value)
        patch = {k: v for k, v in patch.items() if k in {p.split("[")[0] for p in FREE_TEXT}}
        response = target.patch(ORG_A, (WRITE,), image["id"], patch)
        expected = expected_details(FREE_TEXT, payload.value)
        if expected:
            assert_400(response, expected)
            assert target.state() == before
        else:
            assert response.status_code == 200, response.text
            stored = target.request("GET", f"/v1/images/{image['id']}", ORG_A).json()
            assert stored == response.json()
            assert all(get_field(stored, path) == payload.value for path in FREE_TEXT)
            assert {k: v for k, v in stored.items() if k not in patch} == {
                k: v for k, v in image.items() if k not in patch
            }
            assert target.list_body(ORG_B) == before[2]
    finally:
        target.delete(image["id"])


@pytest.mark.parametrize(
    ("request_target", "fields"),
    [
        # past twice the limit: hyper may let a head up to that through (see the 431 test above)
        pytest.param(b"/v1/images?idc=" + b"a" * 140_000, (), id="query-value-140k"),
        pytest.param(b"/v1/images?product=" + b"p" * 200_000, (), id="query-value-200k"),
        pytest.param(b"/v1/images/" + b"a" * 140_000, (), id="path-id-140k"),
        pytest.param(b"/v1/images", (b"X-Filler: " + b"x" * 140_000,), id="header-140k"),
    ],
)
def test_request_heads_beyond_the_limit_are_431(
    target: Target, request_target: bytes, fields: tuple[bytes, ...]
) -> None:
    """CE_HTTP_MAX_HEADER_BYTES (64 KiB) bounds the request line plus headers: granian answers a bare 431."""
    before = target.state()
    auth = b"Authorization: " + target.headers(ORG_A)["Authorization"].encode()
    assert_http_layer_refusal(raw_get(target.server.url, request_target, auth, *fields), 431)
    assert target.state() == before


@pytest.mark.parametrize(
    ("request_target", "status", "field_name", "value"),
    [
        pytest.param(b"/v1/images?idc=" + b"a" * 10_000, 400, "idc", "a" * 10_000, id="query-value-10k"),
        pytest.param(b"/v1/images/" + b"a" * 10_000, 400, "id", "a" * 10_000, id="path-id-10k"),
        pytest.param("/v1/images/\u00e9".encode(), 400, "id", "\u00e9", id="raw-utf8-in-path"),
        pytest.param(b"/v1/images/\x00", 0, None, None, id="raw-nul-in-path"),
        pytest.param(b"/v1/images?idc=\x00", 0, None, None, id="raw-nul-in-query"),
        pytest.param(b"/v1/images?idc=\xff", 0, None, None, id="raw-invalid-utf8-in-query"),
        pytest.param(b"/v1/images?idc=a b", 0, None, None, id="raw-space-in-query"),
    ],
)
def test_raw_request_targets(
    target: Target, request_target: bytes, status: int, field_name: str | None, value: str | None
) -> None:
    """Bytes httpx would escape: within the limit and well-formed they reach validation (a contract 400);
    NUL, raw bytes ≥ 0x80 in the query and spaces are malformed HTTP, refused by granian with a bare 400."""
    before = target.state()
    auth = b"Authorization: " + target.headers(ORG_A)["Authorization"].encode()
    response = raw_get(target.server.url, request_target, auth)
    if field_name is None:
        assert_http_layer_refusal(response, 400)
    else:
        assert value is not None
        assert response.status == status
        body = json.loads(response.body)
        assert body["group"] == "request" and body["code"] == 0
        assert [(d["field"], d["originalValue"]) for d in body["validationDetail"]] == [
            (field_name, original(value))
        ]
    assert target.state() == before


def _json_body_error(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text[:300]
    body = response.json()
    assert (body["code"], body["group"]) == (0, "request")
    assert [(d["field"], d["expression"]) for d in body["validationDetail"]] == [("body", "json")]


MALFORMED_BODIES = [
    pytest.param(b'{"idc": "us-west-1\\u0000"', id="truncated"),
    pytest.param(b'{"idc": "a\x00b"}', id="raw-nul-in-string"),
    pytest.param(b'{"idc": "\\ud800"}', id="lone-surrogate-escape"),
    pytest.param(b'{"idc": ' + b"9" * 5000 + b"}", id="5000-digit-number"),
    pytest.param(b'{"idc": "\xff"}', id="invalid-utf8"),
    pytest.param(
        b'{"idc": "\xc0\xae"}',
        id="overlong-utf8",
    ),
    pytest.param(
        b"[" * 5000 + b"]" * 5000,
        id="nested-5000-deep",
    ),
]


@pytest.mark.parametrize("content", MALFORMED_BODIES)
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_malformed_json_bodies_are_400(target: Target, method: str, content: bytes) -> None:
    before = target.state()
    if method == "POST":
        response = target.request(
            "POST",
            "/v1/images",
            ORG_A,
            (WRITE,),
            content=content,
            headers={"Content-Type": "application/json"},
        )
    else:
        response = target.request(
            "PATCH",
            f"/v1/images/{target.secret['id']}",
            ORG_A,
            (WRITE,),
            content=content,
            headers={"Content-Type": "application/merge-patch+json"},
        )
    assert response.status_code != 500, response.text
    _json_body_error(response)
    assert target.state() == before


def test_catalog_is_unchanged_and_the_database_still_works(target: Target) -> None:
    """Runs last on each store: every org's list is what it was before the battery, the read model
    matches the database, and the database still takes a write of a value full of metacharacters."""
    for org, body in target.baseline.items():
        assert target.list_body(org) == body, f"{target.store}: {org}'s list changed"
    revision = target.server.wait_synced()
    assert target.revision() == revision
    literal = "'; DROP TABLE images; -- %_\\ \u202e\u0430"
    created = target.create(ORG_B, image_body(ORG_B, path=literal))
    try:
        assert target.revision() == revision + 1
        assert target.request("GET", f"/v1/images/{created['id']}", ORG_B).json()["path"] == literal
        assert json.loads(target.list_body(ORG_B))[-1] == created
        assert target.list_body(ORG_A) == target.baseline[ORG_A]
    finally:
        target.delete(created["id"])
    assert target.list_body(ORG_B) == target.baseline[ORG_B]
