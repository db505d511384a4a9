"""Key parsing and hashing, scopes, model allow-lists, rate limits."""

from __future__ import annotations

import time

from services.gateway.keys import KeyInfo, KeyRing, RateLimiter, hash_key


def test_authenticate_by_hash_and_admin_key():
    ring = KeyRing("admin-secret")
    info = KeyInfo(key_id="k1", scopes=frozenset({"client"}), models=frozenset({"m"}))
    ring.add("tl_k1_secret", info)
    assert ring.authenticate("Bearer tl_k1_secret") is info
    assert ring.authenticate("bearer tl_k1_secret") is info
    assert ring.authenticate("Bearer admin-secret").scopes == {"admin", "client"}
    for bad in (
        None,
        "",
        "tl_k1_secret",
        "Basic tl_k1_secret",
        "Bearer ",
        "Bearer tl_k1_secreT",
        "Bearer " + "x" * 600,
        "Bearer \x00\udcff",
    ):
        assert ring.authenticate(bad) is None
    assert info.allows_model("m") and not info.allows_model("other")
    assert len(hash_key("x")) == 64


def test_request_rate_limit_with_retry_after():
    limiter = RateLimiter()
    key = KeyInfo(key_id="k", scopes=frozenset({"client"}), rpm=3)
    assert [limiter.check(key) for _ in range(3)] == [None, None, None]
    retry = limiter.check(key)
    assert retry is not None and 1 <= retry <= 20
    unlimited = KeyInfo(key_id="u", scopes=frozenset({"client"}))
    assert all(limiter.check(unlimited) is None for _ in range(1000))


def test_token_limit_charged_after_the_fact():
    limiter = RateLimiter()
    key = KeyInfo(key_id="k", scopes=frozenset({"client"}), tpm=100)
    assert limiter.check(key) is None
    limiter.charge_tokens("k", 100, 150)  # in debt
    retry = limiter.check(key)
    assert retry is not None and retry >= 30
    bucket = limiter._tokens["k"]
    bucket.updated -= 60  # a minute later
    bucket.refill(time.monotonic())
    assert limiter.check(key) is None
