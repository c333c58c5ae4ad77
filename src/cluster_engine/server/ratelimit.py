"""Per-org fairness (``CE_RATE_LIMIT=RATE/BURST``, off by default): a token bucket per org, per worker.

``RateLimit`` sits in front of the read path (inside KeepAliveGuard and CORS) when the setting is on
(when it is off it is not mounted, so the read path pays nothing). For a request whose ``Authorization``
header the verifier accepts it takes one token from that org's bucket; with none left the answer is
``429 {"reason": …}`` with ``Retry-After`` (whole seconds until a token is back) and the request goes no
further. Requests without a valid token pass through untouched and are refused by the endpoint as usual
(their failures are counted there, once).

Buckets are per worker: no lock and no shared state on the request path (one dict lookup and a few float
operations; each worker runs one event loop). An org's fleet-wide ceiling is therefore RATE times the number
of workers it reaches, which for a looping client over many connections is every worker. Memory is bounded:
at ``max_orgs`` buckets, those that have refilled (indistinguishable from a new one) are dropped, and if that
frees too little, all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .auth import Verifier
from .errors import ApiError, TooManyRequests

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
JSON = b"application/json"
LOG_INTERVAL = 10.0  # at most one log line per org per this many seconds, and MAX_LOG_LINES in all
MAX_LOG_LINES = 20
DEFAULT_MAX_ORGS = 100_000


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int

    @classmethod
    def parse(cls, raw: str) -> Rate:
        """``RATE/BURST`` (``100/200``) or ``RATE`` (burst = RATE, at least 1)."""
        text, _, burst_text = raw.strip().partition("/")
        per_second = float(text)
        burst = int(burst_text) if burst_text else max(1, math.ceil(per_second))
        if not (0 < per_second <= 1_000_000 and 1 <= burst <= 10_000_000):
            raise ValueError("RATE must be in (0, 1e6] and BURST in [1, 1e7]")
        return cls(per_second, burst)

    def __str__(self) -> str:
        return f"{self.per_second:g}/{self.burst}"


class Buckets:
    """Token buckets keyed by org. ``take(org)`` is 0.0 when the request may go, else seconds to wait."""

    def __init__(
        self, rate: Rate, *, max_orgs: int = DEFAULT_MAX_ORGS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second, self.burst = rate.per_second, float(rate.burst)
        self.max_orgs, self.clock = max_orgs, clock
        self._buckets: dict[str, list[float]] = {}  # org -> [tokens, at]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, org: str) -> float:
        now = self.clock()
        bucket = self._buckets.get(org)
        if bucket is None:
            if len(self._buckets) >= self.max_orgs:
                self._sweep(now)
            self._buckets[org] = [self.burst - 1.0, now]
            return 0.0
        tokens = bucket[0] + (now - bucket[1]) * self.per_second
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.per_second

    def _sweep(self, now: float) -> None:
        full = [
            org
            for org, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.per_second >= self.burst
        ]
        for org in full:
            del self._buckets[org]
        if len(self._buckets) > self.max_orgs * 3 // 4:  # mostly throttled orgs: start over (bounded)
            self._buckets.clear()


class RateLimit:
    """ASGI app in front of ``app``: one token per authenticated request, 429 past the org's share."""

    def __init__(
        self,
        app: Any,
        buckets: Buckets,
        verifier: Verifier,
        on_throttle: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app, self.buckets, self.verifier = app, buckets, verifier
        self.on_throttle, self.clock = on_throttle, clock
        self._logged: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"authorization":
                    try:
                        # the private form does not count failures: the endpoint will, once
                        org = self.verifier._authenticate(value).org
                    except ApiError:
                        break
                    wait = self.buckets.take(org)
                    if wait:
                        return await self._refuse(org, wait, send)
                    break
        await self.app(scope, receive, send)

    async def _refuse(self, org: str, wait: float, send: Any) -> None:
        if self.on_throttle is not None:
            self.on_throttle()
        self._log(org)
        error = TooManyRequests(max(1, math.ceil(wait)))
        body = error.body()
        headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _log(self, org: str) -> None:
        """Name the throttled org, at most once per LOG_INTERVAL each and MAX_LOG_LINES per interval."""
        now = self.clock()
        last = self._logged.get(org)
        if last is not None and now - last < LOG_INTERVAL:
            return
        if len(self._logged) >= MAX_LOG_LINES:
            self._logged = {o: t for o, t in self._logged.items() if now - t < LOG_INTERVAL}
            if len(self._logged) >= MAX_LOG_LINES:
                return
        self._logged[org] = now
        log.warning(
            "rate limit: org %s is over %s requests/s (burst %s); answering 429",
            org,
            f"{self.buckets.per_second:g}",
            f"{self.buckets.burst:g}",
        )
