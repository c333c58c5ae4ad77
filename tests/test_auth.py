"""The auth battery: bearer-token verification over HTTP against real server processes.

One server per key configuration (HS256 secret, HS256 with issuer/audience, RS256 / ES256 / EdDSA PEM
public keys, a JWK Set file), plus in-process checks of ``Verifier`` where a server would add nothing
(the key-type matrix, JWK Sets rejected at configuration). Every rejection must be a 401 with the exact
contract body and a ``WWW-Authenticate: Bearer`` challenge, never a 500.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from cluster_engine.server.auth import MAX_TOKEN_LENGTH, Verifier
from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.server.errors import Unauthenticated
from cluster_engine.testing import LiveServer, free_port

from .toolkit import (
    EXPIRED_TOKEN,
    INVALID_TOKEN,
    MISSING,
    OTHER_SCHEME,
    assert_401,
    assert_ok,
    bearer,
)

ISSUER = "https://issuer.example.test/"
AUDIENCE = "cluster-engine-tests"
WRONG_SECRET = secrets.token_urlsafe(48)

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


# ------------------------------------------------------------------------------------------ helpers


class _Drop:
    """Marks a claim to leave out of the token."""


DROP = _Drop()


def claims(**changes: Any) -> dict[str, Any]:
    """Well-formed claims (fresh ``iat``/``exp``) with ``changes`` applied; ``DROP`` removes a claim."""
    now = int(time.time())
    base: dict[str, Any] = {"orgId": str(uuid.uuid4()), "scope": "", "iat": now, "exp": now + 300}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not DROP}


def hs(secret: str, **changes: Any) -> str:
    return jwt.encode(claims(**changes), secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | PrivateKey | None) -> str:
    """A hand-made JWS, for what PyJWT refuses to produce: HMAC with a PEM public key as the secret (the
    algorithm-confusion attack), a non-string ``kid``, or no signature at all when ``key`` is None."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    if key is None:
        return signing_input + "."
    signature = get_default_algorithms()[header["alg"]].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url(signature)}"


def tamper(token: str, **changes: Any) -> str:
    """Change claims in the payload segment, keeping the original header and signature."""
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64url_json({**decoded, **changes})}.{signature}"


def padded(secret: str, length: int) -> str:
    """A validly signed HS256 token of exactly ``length`` characters."""
    base = claims()
    start = max(0, (length - len(jwt.encode(base, secret, algorithm="HS256"))) * 3 // 4 - 16)
    for size in range(start, length):
        for name in ("p", "pp"):
            token = jwt.encode({**base, name: "x" * size}, secret, algorithm="HS256")
            if len(token) == length:
                return token
    raise AssertionError(f"no padding gives a {length}-character token")


@functools.cache
def private_key(kind: str) -> PrivateKey:
    """One generated key per kind for the whole run (RSA generation is the slow part)."""
    if kind == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
    if kind in curves:
        return ec.generate_private_key(curves[kind]())
    if kind == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "Ed448":
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(kind)


def pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: PrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    assert isinstance(data, dict)
    return {**data, "kid": kid, **extra}


def sign(kind: str, payload: dict[str, Any] | None = None, **headers: Any) -> str:
    algorithm = "EdDSA" if kind == "Ed448" else kind
    return jwt.encode(payload or claims(), private_key(kind), algorithm=algorithm, headers=headers or None)


def get_images(server: LiveServer, authorization: str | bytes | None) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    return httpx.get(f"{server.url}/v1/images", headers=headers, timeout=10)


def verifier_for(tmp_path: Path, **env: str) -> Verifier:
    return Verifier(load_settings({"CE_DATA_DIR": str(tmp_path / "data"), **env}))


# ----------------------------------------------------------------------------------------- servers


@dataclass
class KeyedServer:
    """A server that verifies with a public key (PEM) or a JWK Set instead of a shared secret."""

    server: LiveServer
    kind: str
    key_path: Path


def start_with(path: Path, **env: str) -> LiveServer:
    # LiveServer always sets CE_JWT_SECRET; an empty value counts as unset, so only our key is configured.
    return LiveServer.start(path, env={"CE_JWT_SECRET": "", **env})


@pytest.fixture(scope="module", params=["RS256", "ES256", "EdDSA"])
def pem_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyedServer]:
    kind: str = request.param
    path = tmp_path_factory.mktemp(f"pem-{kind}")
    key_path = path / "public.pem"
    key_path.write_bytes(pem(private_key(kind)))
    with start_with(path / "server", CE_JWT_PUBLIC_KEY=str(key_path)) as server:
        yield KeyedServer(server, kind, key_path)


JWKS_KIDS = {"rsa-1": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"}


@pytest.fixture(scope="module")
def jwks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    path = tmp_path_factory.mktemp("jwks")
    keys = [
        jwk(private_key("RS256"), "rsa-1", alg="RS256", use="sig"),
        jwk(private_key("ES256"), "ec-1"),  # no "alg": inferred from the curve
        jwk(private_key("EdDSA"), "ed-1"),
    ]
    key_path = path / "jwks.json"
    key_path.write_text(json.dumps({"keys": keys}))
    with start_with(path / "server", CE_JWT_JWKS=str(key_path)) as server:
        yield KeyedServer(server, "jwks", key_path)


@pytest.fixture(scope="module")
def hs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The default configuration (CE_JWT_SECRET, HS256) with the demo catalog, on SQLite: auth does not
    depend on the store, so this battery runs once rather than per store like ``demo_server``."""
    with LiveServer.start(tmp_path_factory.mktemp("hs"), args=["--demo"]) as server:
        yield server


@pytest.fixture(scope="module")
def issuer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"CE_JWT_ISSUER": ISSUER, "CE_JWT_AUDIENCE": AUDIENCE}
    with LiveServer.start(tmp_path_factory.mktemp("issuer"), env=env) as server:
        yield server


# ------------------------------------------------------------------------- HS256: the bad-token table

Builder = Callable[[str], str | bytes | None]


def _now() -> int:
    return int(time.time())


BAD_TOKENS = [
    pytest.param(lambda s: None, MISSING, id="missing-header"),
    pytest.param(lambda s: "Basic dXNlcjpwYXNzd29yZA==", OTHER_SCHEME, id="basic-scheme"),
    pytest.param(lambda s: f"Token {hs(s)}", OTHER_SCHEME, id="other-scheme-with-valid-token"),
    pytest.param(lambda s: hs(s), OTHER_SCHEME, id="valid-token-without-scheme"),
    pytest.param(lambda s: "Bearer", INVALID_TOKEN, id="bearer-empty"),
    pytest.param(lambda s: "Bearer not-a-jwt", INVALID_TOKEN, id="garbage"),
    pytest.param(lambda s: "Bearer a.b.c", INVALID_TOKEN, id="garbage-three-segments"),
    pytest.param(lambda s: bearer(hs(s) + ".x"), INVALID_TOKEN, id="four-segments"),
    pytest.param(lambda s: b"Bearer \xff\xfe.\x80.\x81", INVALID_TOKEN, id="non-ascii-bytes"),
    pytest.param(lambda s: bearer(hs(WRONG_SECRET)), INVALID_TOKEN, id="wrong-secret"),
    pytest.param(lambda s: bearer(forge({"alg": "none"}, claims(), None)), INVALID_TOKEN, id="alg-none"),
    pytest.param(
        lambda s: bearer(forge({"alg": "none", "typ": "JWT"}, claims(), None) + "c2ln"),
        INVALID_TOKEN,
        id="alg-none-with-signature",
    ),
    pytest.param(
        lambda s: bearer(forge({"alg": "HS512", "typ": "JWT"}, claims(), s.encode())),
        INVALID_TOKEN,
        id="hs512-with-the-right-secret",
    ),
    pytest.param(lambda s: bearer(sign("RS256")), INVALID_TOKEN, id="rs256-against-secret"),
    pytest.param(lambda s: bearer(hs(s, exp=_now() - 10)), EXPIRED_TOKEN, id="expired"),
    pytest.param(lambda s: bearer(hs(s, iat=0, exp=1)), EXPIRED_TOKEN, id="expired-long-ago"),
    pytest.param(lambda s: bearer(hs(s, nbf=_now() + 300)), INVALID_TOKEN, id="nbf-in-future"),
    pytest.param(lambda s: bearer(hs(s, iat=_now() + 300)), INVALID_TOKEN, id="iat-in-future"),
    pytest.param(lambda s: bearer(hs(s, exp=DROP)), INVALID_TOKEN, id="missing-exp"),
    pytest.param(lambda s: bearer(hs(s, exp="tomorrow")), INVALID_TOKEN, id="exp-not-a-number"),
    pytest.param(lambda s: bearer(hs(s, exp=None)), INVALID_TOKEN, id="exp-null"),
    pytest.param(
        lambda s: bearer(tamper(hs(s), orgId=str(uuid.uuid4()))), INVALID_TOKEN, id="tampered-orgId"
    ),
    pytest.param(lambda s: bearer(tamper(hs(s), scope="images:admin")), INVALID_TOKEN, id="tampered-scope"),
    pytest.param(
        lambda s: bearer(tamper(hs(s, exp=_now() - 10), exp=_now() + 3600)),
        INVALID_TOKEN,
        id="tampered-exp-of-expired-token",
    ),
    pytest.param(lambda s: bearer(hs(s, orgId=DROP)), INVALID_TOKEN, id="missing-orgId"),
    pytest.param(lambda s: bearer(hs(s, orgId=None)), INVALID_TOKEN, id="orgId-null"),
    pytest.param(lambda s: bearer(hs(s, orgId="not-a-uuid")), INVALID_TOKEN, id="orgId-not-a-uuid"),
    pytest.param(lambda s: bearer(hs(s, orgId="z" * 36)), INVALID_TOKEN, id="orgId-36-chars-not-hex"),
    pytest.param(lambda s: bearer(hs(s, orgId=uuid.uuid4().hex)), INVALID_TOKEN, id="orgId-without-hyphens"),
    pytest.param(lambda s: bearer(hs(s, orgId=42)), INVALID_TOKEN, id="orgId-number"),
    pytest.param(lambda s: bearer(hs(s, scope=["images:write"])), INVALID_TOKEN, id="scope-list"),
    pytest.param(lambda s: bearer(hs(s, scope=7)), INVALID_TOKEN, id="scope-number"),
    pytest.param(lambda s: bearer(hs(s, scope=None)), INVALID_TOKEN, id="scope-null"),
    pytest.param(lambda s: bearer(hs(s, sub=123)), INVALID_TOKEN, id="sub-not-a-string"),
    pytest.param(
        lambda s: bearer(padded(s, MAX_TOKEN_LENGTH + 1)), INVALID_TOKEN, id="oversized-signed-token"
    ),
    pytest.param(lambda s: bearer("a" * 20_000), INVALID_TOKEN, id="oversized-garbage"),
]


@pytest.mark.parametrize(("build", "kind"), BAD_TOKENS)
def test_bad_tokens_are_401(hs_server: LiveServer, build: Builder, kind: str) -> None:
    assert_401(get_images(hs_server, build(hs_server.secret)), kind)


def test_valid_token_lists_images(hs_server: LiveServer, demo_org: uuid.UUID) -> None:
    token = hs(hs_server.secret, orgId=str(demo_org), scope="images:write images:admin", sub="alice")
    body = assert_ok(get_images(hs_server, bearer(token)))
    assert any(image["type"] == "Customized" for image in body)  # the orgId claim is the caller's org


@pytest.mark.parametrize("template", ["bearer {}", "BEARER {}", "Bearer   {}"])
def test_scheme_is_case_insensitive_and_whitespace_tolerant(hs_server: LiveServer, template: str) -> None:
    assert_ok(get_images(hs_server, template.format(hs(hs_server.secret))))


def test_token_length_limit_is_inclusive(hs_server: LiveServer) -> None:
    assert_ok(get_images(hs_server, bearer(padded(hs_server.secret, MAX_TOKEN_LENGTH))))
    assert_401(get_images(hs_server, bearer(padded(hs_server.secret, MAX_TOKEN_LENGTH + 1))))


def test_unconfigured_issuer_and_audience_are_not_checked(hs_server: LiveServer) -> None:
    token = hs(hs_server.secret, iss="https://anyone.test/", aud="anything")
    assert_ok(get_images(hs_server, bearer(token)))


def test_tampering_with_a_cached_token_is_rejected(hs_server: LiveServer) -> None:
    token = hs(hs_server.secret)
    assert_ok(get_images(hs_server, bearer(token)))  # verified, now in the cache
    assert_401(get_images(hs_server, bearer(tamper(token, orgId=str(uuid.uuid4())))))
    assert_ok(get_images(hs_server, bearer(token)))


def test_cached_token_is_not_accepted_after_it_expires(hs_server: LiveServer) -> None:
    exp = int(time.time()) + 2
    if exp - time.time() < 1.2:
        exp += 1
    token = hs(hs_server.secret, exp=exp)
    for _ in range(3):  # the first request verifies and caches; the others are answered from the cache
        assert_ok(get_images(hs_server, bearer(token)))
    assert time.time() < exp, "the test machine is too slow for this timing"
    time.sleep(exp - time.time() + 0.3)
    for _ in range(2):  # the cached entry is dropped, then the signature check says expired as well
        assert_401(get_images(hs_server, bearer(token)), EXPIRED_TOKEN)


def test_exp_beyond_float_range_is_not_a_500(hs_server: LiveServer) -> None:
    response = get_images(hs_server, bearer(hs(hs_server.secret, exp=10**400)))
    assert response.status_code in (200, 401), response.text[:300]
    if response.status_code == 401:
        assert_401(response)


@pytest.mark.parametrize(
    "org", ["{0b7e2f52-4c1a4d52-9a572f1c3c2d9e01}", "0b7e2f524-c1a-4d52-9a57-2f1c3c2d9e01"]
)
def test_orgId_must_be_a_canonical_uuid(hs_server: LiveServer, org: str) -> None:
    assert_401(get_images(hs_server, bearer(hs(hs_server.secret, orgId=org))))


# -------------------------------------------------------------------------------- issuer / audience


@pytest.mark.parametrize(
    ("iss", "aud", "accepted"),
    [
        pytest.param(ISSUER, AUDIENCE, True, id="both-match"),
        pytest.param(ISSUER, ["other", AUDIENCE], True, id="audience-in-list"),
        pytest.param("https://evil.example.test/", AUDIENCE, False, id="wrong-issuer"),
        pytest.param(ISSUER.rstrip("/"), AUDIENCE, False, id="issuer-prefix"),
        pytest.param(DROP, AUDIENCE, False, id="missing-issuer"),
        pytest.param(ISSUER, "other", False, id="wrong-audience"),
        pytest.param(ISSUER, ["other"], False, id="audience-list-without-ours"),
        pytest.param(ISSUER, DROP, False, id="missing-audience"),
    ],
)
def test_issuer_and_audience(issuer_server: LiveServer, iss: Any, aud: Any, accepted: bool) -> None:
    response = get_images(issuer_server, bearer(hs(issuer_server.secret, iss=iss, aud=aud)))
    if accepted:
        assert_ok(response)
    else:
        assert_401(response)


# ----------------------------------------------------------------------------------------- PEM keys


def test_pem_key_accepts_its_tokens(pem_server: KeyedServer) -> None:
    assert_ok(get_images(pem_server.server, bearer(sign(pem_server.kind))))
    assert_401(
        get_images(pem_server.server, bearer(sign(pem_server.kind, claims(exp=_now() - 5)))), EXPIRED_TOKEN
    )


def test_pem_key_rejects_other_keys_and_secrets(pem_server: KeyedServer) -> None:
    server, kind = pem_server.server, pem_server.kind
    other = {"RS256": "ES256", "ES256": "EdDSA", "EdDSA": "RS256"}[kind]
    assert_401(get_images(server, bearer(sign(other))))
    assert_401(get_images(server, bearer(hs(WRONG_SECRET))))
    assert_401(get_images(server, bearer(forge({"alg": "none", "typ": "JWT"}, claims(), None))))
    assert_401(get_images(server, bearer(tamper(sign(kind), orgId=str(uuid.uuid4())))))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_algorithm_confusion_public_key_as_hmac_secret(pem_server: KeyedServer, alg: str) -> None:
    """The classic attack: sign HS* with the server's own public key file as the HMAC secret."""
    key_bytes = pem_server.key_path.read_bytes()
    for secret in (key_bytes, key_bytes.strip()):
        token = forge({"alg": alg, "typ": "JWT"}, claims(), secret)
        assert_401(get_images(pem_server.server, bearer(token)))


@pytest.mark.parametrize("pem_server", ["RS256"], indirect=True)
@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256"])
def test_token_header_does_not_choose_the_algorithm(pem_server: KeyedServer, alg: str) -> None:
    """Signed with the right RSA key, but an algorithm other than the one the key is configured for."""
    token = jwt.encode(claims(), private_key("RS256"), algorithm=alg)
    assert_401(get_images(pem_server.server, bearer(token)))


# ---------------------------------------------------------------------------------------- JWK Sets


@pytest.mark.parametrize(("kid", "kind"), list(JWKS_KIDS.items()))
def test_jwks_accepts_each_key_by_kid(jwks_server: KeyedServer, kid: str, kind: str) -> None:
    assert_ok(get_images(jwks_server.server, bearer(sign(kind, kid=kid))))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: sign("RS256", kid="rsa-2"), id="unknown-kid"),
        pytest.param(lambda: sign("RS256"), id="no-kid-with-several-keys"),
        pytest.param(
            lambda: forge({"alg": "RS256", "kid": 7}, claims(), private_key("RS256")), id="kid-not-a-string"
        ),
        pytest.param(lambda: sign("ES256", kid="rsa-1"), id="kid-of-another-key"),
        pytest.param(lambda: sign("ES384", kid="ec-1"), id="unlisted-key-with-listed-kid"),
        pytest.param(
            lambda: forge({"alg": "HS256", "kid": "rsa-1"}, claims(), pem(private_key("RS256"))),
            id="hmac-with-public-pem",
        ),
        pytest.param(
            lambda: forge(
                {"alg": "HS256", "kid": "rsa-1"},
                claims(),
                json.dumps(jwk(private_key("RS256"), "rsa-1", alg="RS256", use="sig")).encode(),
            ),
            id="hmac-with-public-jwk",
        ),
        pytest.param(lambda: forge({"alg": "none", "kid": "ed-1"}, claims(), None), id="alg-none"),
        pytest.param(lambda: tamper(sign("EdDSA", kid="ed-1"), orgId=str(uuid.uuid4())), id="tampered"),
    ],
)
def test_jwks_rejects(jwks_server: KeyedServer, build: Callable[[], str]) -> None:
    assert_401(get_images(jwks_server.server, bearer(build())))


def test_jwks_expired_token_is_code_1(jwks_server: KeyedServer) -> None:
    token = sign("EdDSA", claims(exp=_now() - 5), kid="ed-1")
    assert_401(get_images(jwks_server.server, bearer(token)), EXPIRED_TOKEN)


def write_jwks(tmp_path: Path, keys: list[dict[str, Any]]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


OCT_KEY = {"kty": "oct", "kid": "hmac-1", "k": b64url(secrets.token_bytes(32)), "alg": "HS256"}


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([OCT_KEY], id="only-oct"),
        pytest.param(lambda: [jwk(private_key("RS256"), "rsa-1"), OCT_KEY], id="oct-among-public-keys"),
    ],
)
def test_jwks_with_symmetric_key_is_a_config_error(tmp_path: Path, keys: Any) -> None:
    path = write_jwks(tmp_path, keys() if callable(keys) else keys)
    with pytest.raises(ConfigError, match="oct"):
        verifier_for(tmp_path, CE_JWT_JWKS=str(path))


def test_serve_refuses_a_jwks_with_symmetric_key(tmp_path: Path) -> None:
    path = write_jwks(tmp_path, [OCT_KEY])
    env = {
        **os.environ,
        "CE_DATA_DIR": str(tmp_path / "data"),
        "CE_JWT_SECRET": "",
        "CE_JWT_PUBLIC_KEY": "",
        "CE_JWT_JWKS": str(path),
    }
    command = [sys.executable, "-m", "cluster_engine", "serve", "--port", str(free_port())]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "JWT key configuration" in result.stderr and "oct" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "keys", [pytest.param([], id="empty"), pytest.param([{"kty": "XYZ", "kid": "x"}], id="unusable-kty")]
)
def test_jwks_without_usable_keys_is_a_config_error(tmp_path: Path, keys: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError):
        verifier_for(tmp_path, CE_JWT_JWKS=str(write_jwks(tmp_path, keys)))


def test_single_key_jwks_accepts_a_token_without_kid(tmp_path: Path) -> None:
    path = write_jwks(tmp_path, [jwk(private_key("ES256"), "only")])
    verifier = verifier_for(tmp_path, CE_JWT_JWKS=str(path))
    org = uuid.uuid4()
    assert verifier.verify(sign("ES256", claims(orgId=str(org)))).org_id == org
    with pytest.raises(Unauthenticated):
        verifier.verify(sign("ES256", kid="other"))


# ------------------------------------------------------------------------- key-type matrix (in-process)


@pytest.mark.parametrize("kind", ["RS256", "ES256", "ES384", "ES512", "EdDSA", "Ed448"])
def test_key_type_matrix(tmp_path: Path, kind: str) -> None:
    key_path = tmp_path / "public.pem"
    key_path.write_bytes(pem(private_key(kind)))
    verifier = verifier_for(tmp_path, CE_JWT_PUBLIC_KEY=str(key_path))
    org = uuid.uuid4()
    principal = verifier.verify(sign(kind, claims(orgId=str(org), scope="images:write  images:admin")))
    assert principal.org_id == org
    assert principal.scopes == frozenset({"images:write", "images:admin"})
    forged = forge({"alg": "HS256", "typ": "JWT"}, claims(), key_path.read_bytes())
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(forged)
    assert not raised.value.expired


def _unsupported_public_key(kind: str) -> bytes:
    if kind == "secp256k1":
        public: Any = ec.generate_private_key(ec.SECP256K1()).public_key()
    elif kind == "dsa":
        public = dsa.generate_private_key(key_size=1024).public_key()
    else:
        public = x25519.X25519PrivateKey.generate().public_key()
    return bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize("kind", ["secp256k1", "dsa", "x25519"])
def test_unsupported_public_keys_are_config_errors(tmp_path: Path, kind: str) -> None:
    key_path = tmp_path / "public.pem"
    key_path.write_bytes(_unsupported_public_key(kind))
    with pytest.raises(ConfigError):
        verifier_for(tmp_path, CE_JWT_PUBLIC_KEY=str(key_path))


# ---------------------------------------------------------------------------------- `token` command


def test_cli_token_is_accepted(hs_server: LiveServer, demo_org: uuid.UUID) -> None:
    result = hs_server.cli("token", "--org", str(demo_org), "--scope", "images:write", "--ttl", "90m")
    token = result.stdout.strip()
    claims_ = jwt.decode(token, hs_server.secret, algorithms=["HS256"])
    assert claims_["orgId"] == str(demo_org)
    assert claims_["scope"] == "images:write"
    assert claims_["exp"] - claims_["iat"] == 90 * 60
    body = assert_ok(get_images(hs_server, bearer(token)))
    assert any(image["type"] == "Customized" for image in body)


def test_cli_token_carries_configured_issuer_and_audience(issuer_server: LiveServer) -> None:
    token = issuer_server.cli("token", "--org", str(uuid.uuid4())).stdout.strip()
    assert_ok(get_images(issuer_server, bearer(token)))


def assert_token_command_refuses(server: LiveServer) -> None:
    result = server.cli("token", "--org", str(uuid.uuid4()), "--ttl", "90m", check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "public key or JWKS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("pem_server", ["RS256"], indirect=True)
def test_cli_token_refuses_with_public_key(pem_server: KeyedServer) -> None:
    assert_token_command_refuses(pem_server.server)


def test_cli_token_refuses_with_jwks(jwks_server: KeyedServer) -> None:
    assert_token_command_refuses(jwks_server.server)
