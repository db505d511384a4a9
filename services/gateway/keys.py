"""API keys (hashed at rest, scoped, optional model allow-list) and per-key rate limits.

A key reads ``tl_<key_id>_<secret>``; only its sha256 is stored. Every replica keeps all
active keys in memory (reloaded from the DB when the table changes), so authenticating a
request costs one hash and one dict lookup, and an unknown key never reaches the DB.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.gateway.models import GatewayApiKey
from shared.db import utcnow

SCOPES = frozenset({"client", "admin"})
KEY_PREFIX = "tl_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    name: str = ""

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once
    info: KeyInfo


def _info(row: GatewayApiKey) -> KeyInfo:
    return KeyInfo(
        key_id=row.key_id,
        scopes=frozenset(s for s in row.scopes.split(",") if s),
        models=frozenset(json.loads(row.models)) if row.models else None,
        rpm=row.rpm,
        tpm=row.tpm,
        name=row.name,
    )


async def create_key(
    session: AsyncSession,
    *,
    name: str = "",
    scopes: set[str] | frozenset[str] = frozenset({"client"}),
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> NewKey:
    bad = set(scopes) - SCOPES
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {sorted(SCOPES)}")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    now = utcnow()
    row = GatewayApiKey(
        key_id=key_id,
        key_hash=hash_key(key),
        name=name[:200],
        scopes=",".join(sorted(scopes)),
        models=json.dumps(sorted(models)) if models is not None else None,
        rpm=rpm,
        tpm=tpm,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    await session.flush()
    return NewKey(key=key, info=_info(row))


async def revoke_key(session: AsyncSession, key_id: str) -> bool:
    row = await session.get(GatewayApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    now = utcnow()
    row.revoked_at = now
    row.updated_at = now
    return True


async def list_keys(session: AsyncSession) -> list[GatewayApiKey]:
    result = await session.exec(select(GatewayApiKey).order_by(col(GatewayApiKey.created_at)))
    return list(result.all())


class KeyRing:
    """Every active key, by hash, plus the operator's admin key from the settings."""

    def __init__(self, admin_key: str | None) -> None:
        self._by_hash: dict[str, KeyInfo] = {}
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._admin = KeyInfo(key_id="admin", scopes=frozenset({"admin", "client"}))
        self.version: tuple[object, ...] | None = None

    def authenticate(self, authorization: str | None) -> KeyInfo | None:
        if not authorization or len(authorization) > 512:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hash_key(key.strip())
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return self._admin
        return self._by_hash.get(digest)

    def add(self, key: str, info: KeyInfo) -> None:
        self._by_hash[hash_key(key)] = info

    async def reload(self, session: AsyncSession, *, force: bool = False) -> bool:
        """Re-read the keys when the table changed (count or newest update)."""
        result = await session.exec(
            select(func.count(), func.max(col(GatewayApiKey.updated_at)))  # type: ignore[call-overload]
        )
        count, newest = result.one()
        version = (int(count), newest.isoformat() if isinstance(newest, datetime) else newest)
        if version == self.version and not force:
            return False
        rows = await list_keys(session)
        self._by_hash = {r.key_hash: _info(r) for r in rows if r.revoked_at is None}
        self.version = version
        return True


@dataclass
class Bucket:
    capacity: float
    rate_per_s: float
    level: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def retry_after_s(self, need: float = 1.0) -> int:
        return max(1, math.ceil((need - self.level) / self.rate_per_s))


class RateLimiter:
    """Token buckets per key and replica: requests per minute (taken before the call) and
    tokens per minute (charged after it, from the usage; a key in debt waits)."""

    def __init__(self, default_rpm: int | None = None, default_tpm: int | None = None) -> None:
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, table: dict[str, Bucket], key_id: str, per_minute: int) -> Bucket:
        bucket = table.get(key_id)
        if bucket is None or bucket.capacity != per_minute:
            bucket = table[key_id] = Bucket(per_minute, per_minute / 60.0, float(per_minute))
        return bucket

    def check(self, key: KeyInfo) -> int | None:
        """Take one request; returns Retry-After seconds when the key is over a limit."""
        now = time.monotonic()
        rpm = key.rpm or self.default_rpm
        tpm = key.tpm or self.default_tpm
        if tpm:
            tokens = self._bucket(self._tokens, key.key_id, tpm)
            tokens.refill(now)
            if tokens.level <= 0:
                return tokens.retry_after_s(1.0)
        if rpm:
            requests = self._bucket(self._requests, key.key_id, rpm)
            requests.refill(now)
            if requests.level < 1.0:
                return requests.retry_after_s(1.0)
            requests.level -= 1.0
        return None

    def charge_tokens(self, key_id: str, key_tpm: int | None, tokens: int) -> None:
        tpm = key_tpm or self.default_tpm
        if not tpm or tokens <= 0:
            return
        bucket = self._bucket(self._tokens, key_id, tpm)
        bucket.refill(time.monotonic())
        bucket.level -= tokens
