"""The in-memory route table: one immutable snapshot per served model, swapped atomically.

A request reads the snapshot once; a reload (from the DB) builds new :class:`Route` objects
but keeps each :class:`Upstream` (its pooled connections, breaker) by deployment id.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import aiohttp

from services.gateway.models import GatewayDeployment


class Breaker:
    """Opens after ``failures`` consecutive failures; after ``cooldown_s`` lets one trial
    request through (half-open); a success closes it, a failure reopens it (cooldown doubled,
    up to 8x)."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.threshold = failures
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.open_until = 0.0
        self.trial_in_flight = False

    @property
    def is_open(self) -> bool:
        return self.consecutive >= self.threshold

    def allows(self, now: float | None = None) -> bool:
        if not self.is_open:
            return True
        now = time.monotonic() if now is None else now
        if now >= self.open_until and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        self.trial_in_flight = False
        self.cooldown_s = self.base_cooldown_s

    def failure(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        was_open = self.is_open
        self.consecutive += 1
        self.trial_in_flight = False
        if self.is_open:
            if was_open:
                self.cooldown_s = min(self.cooldown_s * 2, self.base_cooldown_s * 8)
            self.open_until = now + self.cooldown_s


class Upstream:
    """One deployment's OpenAI-compatible endpoint with its own keep-alive connection pool."""

    def __init__(
        self,
        row: GatewayDeployment,
        *,
        pool_size: int,
        connect_timeout_s: float,
        breaker_failures: int,
        breaker_cooldown_s: float,
    ) -> None:
        self.deployment_id = row.deployment_id
        self.model_id = row.model_id
        self.endpoint = row.endpoint
        self.base_url = row.endpoint.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.upstream_model = row.upstream_model
        self.max_context_tokens = row.max_context_tokens
        self.breaker = Breaker(breaker_failures, breaker_cooldown_s)
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.deployment_id_header = row.deployment_id.encode("latin-1", "replace")

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; one per upstream, reused by every request.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size,
                keepalive_timeout=30.0,
                enable_cleanup_closed=True,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def refresh(self, row: GatewayDeployment) -> None:
        self.upstream_model = row.upstream_model
        self.max_context_tokens = row.max_context_tokens

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


@dataclass(frozen=True)
class Route:
    """Where one served model's traffic goes right now."""

    served_model_name: str
    stable: Upstream | None
    canary: Upstream | None = None
    canary_weight: float = 0.0
    canary_step: int = 0
    pinned: Upstream | None = None


def sticky_fraction(user_key: str, salt: str) -> float:
    """A user's fixed position in [0, 1) for one experiment: below the canary weight means
    canary. Growing the weight keeps everyone already on the canary there."""
    digest = hashlib.blake2b(f"{salt}\x00{user_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def user_hash(user_key: str) -> str:
    return hashlib.blake2b(user_key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Choice:
    primary: Upstream
    fallback: Upstream | None  # where to retry once before the first byte
    is_canary: bool
    step: int


def choose(route: Route, user_key: str) -> Choice | None:
    """Pick the deployment for this user: pinned > sticky canary share > stable; a deployment
    whose breaker is open is skipped for the other one. None: nothing can serve."""
    if route.pinned is not None:
        return Choice(route.pinned, None, route.pinned is route.canary, route.canary_step)
    stable, canary = route.stable, route.canary
    in_canary = (
        canary is not None
        and route.canary_weight > 0
        and sticky_fraction(user_key, canary.deployment_id) < route.canary_weight
    )
    if in_canary:
        assert canary is not None
        if canary.breaker.allows():
            return Choice(canary, stable, True, route.canary_step)
        if stable is not None:
            return Choice(stable, stable, False, route.canary_step)
        return None
    if stable is not None and stable.breaker.allows():
        return Choice(stable, stable, False, route.canary_step)
    # Stable is failing: keep users served by a canary that passed its evaluation.
    if canary is not None and route.canary_weight > 0 and canary.breaker.allows():
        return Choice(canary, None, True, route.canary_step)
    return None
