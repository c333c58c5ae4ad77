"""Bearer-token verification (JWT) → ``Principal(org_id, scopes)``, and minting of development tokens.

Algorithms come from the configured key, never from the token's header: an HMAC secret accepts only
HS256, an RSA key RS256, an EC key the ES* matching its curve, an Ed25519 key EdDSA; a JWK Set gives
each key's own algorithm and never accepts symmetric keys. ``exp`` and ``orgId`` are required.
Verified tokens are cached until they expire (bounded), since signature checks dominate small responses.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .config import ConfigError, Settings
from .errors import Unauthenticated
from .validation import parse_uuid

log = logging.getLogger(__name__)

SCOPE_WRITE = "images:write"
SCOPE_ADMIN = "images:admin"
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: uuid.UUID
    scopes: frozenset[str]
    subject: str | None = None
    org: str = ""  # str(org_id), computed once per token rather than per request

    def __post_init__(self) -> None:
        if not self.org:
            object.__setattr__(self, "org", str(self.org_id))

    def can(self, scope: str) -> bool:
        return scope in self.scopes


# ------------------------------------------------------------------------------------------- keys


def _algorithm_for(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name not in by_curve:
            raise ConfigError(f"unsupported EC curve {key.curve.name}")
        return by_curve[key.curve.name]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    raise ConfigError(f"unsupported public key type {type(key).__name__}")


class _KeySource:
    """Gives the (key, algorithms) to verify one token with."""

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        raise NotImplementedError


class _StaticKey(_KeySource):
    def __init__(self, key: Any, algorithm: str) -> None:
        self.key, self.algorithms = key, [algorithm]

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        return self.key, self.algorithms


class _JwkSet(_KeySource):
    """A JWK Set from a file (read once) or a URL (fetched and cached by PyJWT's client)."""

    def __init__(self, location: str) -> None:
        self.client: jwt.PyJWKClient | None = None
        self.keys: dict[str | None, jwt.PyJWK] = {}
        if location.startswith(("https://", "http://")):
            self.client = jwt.PyJWKClient(location, cache_keys=True, lifespan=300, timeout=5)
        else:
            try:
                jwk_set = jwt.PyJWKSet.from_json(Path(location).read_text())
            except (jwt.PyJWKError, jwt.PyJWKSetError, NotImplementedError, ValueError) as exc:
                raise ConfigError(f"CE_JWT_JWKS holds an unusable key: {exc}") from None
            for key in jwk_set.keys:
                problem = _unusable(key)
                if problem:
                    raise ConfigError(f"CE_JWT_JWKS must hold public signing keys only ({problem})")
                self.keys[key.key_id] = key
            if not self.keys:
                raise ConfigError("CE_JWT_JWKS holds no usable keys")

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        if self.client is not None:
            jwk = self.client.get_signing_key_from_jwt(token)
        else:
            kid = jwt.get_unverified_header(token).get("kid")
            if kid is None and len(self.keys) == 1:
                jwk = next(iter(self.keys.values()))
            elif not isinstance(kid, str) or kid not in self.keys:
                raise jwt.InvalidTokenError("unknown kid")
            else:
                jwk = self.keys[kid]
        problem = _unusable(jwk)
        if problem:
            raise jwt.InvalidTokenError(f"JWK Set key not accepted: {problem}")
        return jwk.key, [jwk.algorithm_name]


def _unusable(jwk: jwt.PyJWK) -> str | None:
    """Why a JWK Set entry may not verify tokens, or None: only public keys meant for signatures."""
    if jwk.key_type == "oct":
        return "found a symmetric 'oct' key"
    if jwk.public_key_use not in (None, "sig"):
        return f"key {jwk.key_id!r} is for use {jwk.public_key_use!r}, not 'sig'"
    if hasattr(jwk.key, "private_bytes"):  # cryptography's private key classes (RSA, EC, OKP)
        return f"key {jwk.key_id!r} holds private key material"
    return None


def read_dev_secret(path: Path, *, create: bool) -> str:
    """The generated development secret (mode 0600), created on first use when ``create`` is set."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def signing_secret(settings: Settings, *, create: bool = False) -> str | None:
    """The HMAC secret tokens are minted and checked with, or None when a public key/JWKS is configured."""
    if settings.jwt_secret:
        return settings.jwt_secret
    if settings.jwt_public_key or settings.jwt_jwks:
        return None
    return read_dev_secret(settings.dev_secret_path, create=create)


def _key_source(settings: Settings) -> _KeySource:
    if settings.jwt_public_key:
        key = serialization.load_pem_public_key(Path(settings.jwt_public_key).read_bytes())
        return _StaticKey(key, _algorithm_for(key))
    if settings.jwt_jwks:
        return _JwkSet(settings.jwt_jwks)
    secret = signing_secret(settings)
    assert secret is not None
    return _StaticKey(secret, "HS256")


# --------------------------------------------------------------------------------------- verifier


# What the read path hands the verifier when a request carries several Authorization fields: one that no
# real header can equal (HTTP field values cannot hold NUL). Authorization is a singleton field (RFC 9110
# §11.6.2); with two, the one a proxy checked and the one we would use may differ, so neither counts.
SEVERAL_AUTHORIZATIONS = b"\x00several"


class Verifier:
    def __init__(self, settings: Settings) -> None:
        self.keys = _key_source(settings)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        self.cache_size = settings.token_cache_size
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self.on_failure: Callable[[Unauthenticated], None] | None = None  # e.g. a metrics hook

    def authenticate(self, authorization: bytes | None) -> Principal:
        """Verify a raw ``Authorization`` header value; raise ``Unauthenticated`` for anything wrong."""
        try:
            return self._authenticate(authorization)
        except Unauthenticated as failure:
            if self.on_failure is not None:
                self.on_failure(failure)
            raise

    def _authenticate(self, authorization: bytes | None) -> Principal:
        if not authorization:
            raise Unauthenticated(missing=True, detail="no Authorization header")
        if authorization is SEVERAL_AUTHORIZATIONS:
            raise Unauthenticated(detail="several Authorization headers")
        cached = self._cache.get(authorization)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires + self.leeway:
                return principal
            del self._cache[authorization]
            raise Unauthenticated(expired=True, detail="token expired")
        principal, expires = self._verify_header(authorization.decode("latin-1"))
        if self.cache_size:
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[authorization] = (principal, expires)
        return principal

    def _verify_header(self, authorization: str) -> tuple[Principal, float]:
        scheme, _, token = authorization.partition(" ")
        token = token.strip(" \t")  # HTTP whitespace only (not Latin-1's NBSP or NEL)
        if scheme.lower() != "bearer":  # RFC 6750 §3.1: no error code for another auth scheme
            raise Unauthenticated(missing=True, detail="not a bearer token")
        if not token:
            raise Unauthenticated(detail="empty bearer token")
        return self._check(token)

    def verify(self, token: str) -> Principal:
        """Check a token's signature and claims; its principal, or ``Unauthenticated``."""
        return self._check(token)[0]

    def _check(self, token: str) -> tuple[Principal, float]:
        """The token's principal and expiry (epoch seconds)."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(detail="token too long")
        try:
            key, algorithms = self.keys.key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(expired=True, detail="token expired") from None
        except Exception as exc:  # fail closed: whatever went wrong, the token is not accepted
            raise Unauthenticated(detail=f"{exc.__class__.__name__}: {exc}") from None
        try:
            expires = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            expires = math.inf if isinstance(claims["exp"], int) else 0.0
        return _principal(claims), expires


def _principal(claims: dict[str, Any]) -> Principal:
    org = claims.get("orgId")
    scope = claims.get("scope", "")
    subject = claims.get("sub")
    org_id = parse_uuid(org) if isinstance(org, str) else None
    if org_id is None:
        raise Unauthenticated(detail="orgId claim missing or not a UUID")
    if not isinstance(scope, str) or (subject is not None and not isinstance(subject, str)):
        raise Unauthenticated(detail="scope or sub claim malformed")
    return Principal(org_id=org_id, scopes=frozenset(scope.split()), subject=subject)


def mint_token(
    secret: str,
    org_id: uuid.UUID,
    *,
    scopes: list[str] | tuple[str, ...] = (),
    ttl: float = 3600,
    subject: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token with the claims this service reads (``orgId``, ``scope``, ``exp``)."""
    now = int(time.time())
    claims: dict[str, Any] = {"orgId": str(org_id), "iat": now, "exp": now + int(ttl)}
    if scopes:
        claims["scope"] = " ".join(scopes)
    if subject:
        claims["sub"] = subject
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
