"""Who may see the dashboard: an admin-scoped key (``Authorization: Bearer``) or the login
cookie. The cookie is ``<expiry>.<HMAC-SHA256(admin key, expiry)>``: derived from the admin
key (rotating the key signs everyone out), holds no key itself, HttpOnly, SameSite=Strict."""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi import Request

from services.gateway.keys import KeyRing

COOKIE = "tuneloop_ui"
SESSION_S = 12 * 3600
MAX_COOKIE = 200


def _sign(secret: str, expiry: int) -> str:
    return hmac.new(secret.encode(), f"tuneloop-ui:{expiry}".encode(), hashlib.sha256).hexdigest()


def make_cookie(secret: str, *, now: float | None = None) -> str:
    expiry = int((now or time.time()) + SESSION_S)
    return f"{expiry}.{_sign(secret, expiry)}"


def cookie_valid(secret: str, value: str | None, *, now: float | None = None) -> bool:
    if not secret or not value or len(value) > MAX_COOKIE:
        return False
    expiry_text, _, mac = value.partition(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12:
        return False
    expiry = int(expiry_text)
    if expiry < (now or time.time()):
        return False
    return hmac.compare_digest(mac, _sign(secret, expiry))


def is_admin_key(keys: KeyRing, key: str) -> bool:
    info = keys.authenticate(f"Bearer {key}")
    return info is not None and "admin" in info.scopes


def authorised(request: Request, keys: KeyRing, secret: str) -> bool:
    header = request.headers.get("authorization")
    if header:
        info = keys.authenticate(header)
        if info is not None and "admin" in info.scopes:
            return True
    return cookie_valid(secret, request.cookies.get(COOKIE))


def safe_next(target: str | None) -> str:
    """Only a path of the dashboard itself (no open redirect)."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target[:500]
    return "/ui/runs"
