"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) against a
gateway with a finished run, plus its HTTP surface: auth, hostile and malformed input."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.ui import auth
from tests.integration.dashboard.conftest import (
    ADMIN_KEY,
    CATEGORIES,
    FAILED_RUN,
    HOSTILE,
    MODEL,
    RUN,
    Seeded,
)
from tests.integration.streams import eventually

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BEARER = {"Authorization": f"Bearer {ADMIN_KEY}"}


def client(seeded: Seeded, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=seeded.url, timeout=10, **kw)


async def check_refusals(seeded: Seeded) -> None:
    async with client(seeded) as c:
        for path in ("/ui/runs", f"/ui/runs/{RUN}", "/ui/traffic"):
            page = await c.get(path)
            assert page.status_code == 401
            assert "diverged" not in page.text and "tiny" not in page.text
            assert "Sign in" in page.text
        assert (await c.get("/ui/api/runs")).status_code == 401
        assert (await c.get("/ui/api/traffic")).status_code == 401
        forged = {"Cookie": f"{auth.COOKIE}=9999999999.{'0' * 64}"}
        assert (await c.get("/ui/api/runs", headers=forged)).status_code == 401
        expired = auth.make_cookie(ADMIN_KEY, now=time.time() - 2 * auth.SESSION_S)
        assert (await c.get("/ui/api/runs", cookies={auth.COOKIE: expired})).status_code == 401
        huge = {"Cookie": f"{auth.COOKIE}={'1' * 10_000}"}
        assert (await c.get("/ui/api/runs", headers=huge)).status_code == 401
        assert (
            await c.get("/ui/api/runs", headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        # A client-scoped key is not enough.
        made = await c.post("/admin/keys", json={"scopes": ["client"]}, headers=BEARER)
        client_key = made.json()["key"]
        assert (
            await c.get("/ui/api/runs", headers={"Authorization": f"Bearer {client_key}"})
        ).status_code == 401
        bad = await c.post("/ui/login", data={"key": client_key, "next": "/ui/runs"})
        assert bad.status_code == 401 and "not an admin key" in bad.text
        # The static chart library is public (no data in it) and served locally.
        js = await c.get("/ui/static/uPlot.iife.min.js")
        assert js.status_code == 200 and "uPlot" in js.text


async def check_login_and_actions(seeded: Seeded) -> None:
    async with client(seeded) as c:
        login = await c.post("/ui/login", data={"key": ADMIN_KEY, "next": "//evil.example/x"})
        assert login.status_code == 303 and login.headers["location"] == "/ui/runs"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        assert ADMIN_KEY.lower() not in cookie
        runs = (await c.get("/ui/api/runs")).json()["runs"]
        by_id = {r["run_id"]: r for r in runs}
        assert by_id[RUN]["status"] == "done" and by_id[RUN]["origin"] == "upload"
        assert by_id[FAILED_RUN]["status"] == "failed"
        assert by_id[FAILED_RUN]["failure"].startswith("trainer: diverged")
        # A failure reason is data, never markup.
        page = await c.get("/ui/runs")
        assert HOSTILE not in page.text and "&lt;script&gt;" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert (await c.get("/ui/runs/no-such-run")).status_code == 404
        assert (await c.get("/ui/runs/" + "x" * 5000)).status_code == 404
        assert (await c.get("/ui/runs/%3Cscript%3E")).status_code == 404
        # Oversized and malformed login forms.
        form = {"content-type": "application/x-www-form-urlencoded"}
        big = await c.post("/ui/login", content=b"key=" + b"a" * 10_000, headers=form)
        assert big.status_code == 413
        junk = await c.post("/ui/login", content=b"\xff\xfe%%%&&&===", headers=form)
        assert junk.status_code == 401

        act = f"/ui/api/traffic/{MODEL}"
        ok_headers = {"x-tuneloop-ui": "1", "content-type": "application/json"}
        body = {"action": "weight", "deployment_id": seeded.candidate, "weight": 0.4}
        # Without the header a cross-site form could post: refused.
        assert (await c.post(act, json=body)).status_code == 403
        assert (await c.post(act, content=b"{not json", headers=ok_headers)).status_code == 400
        assert (await c.post(act, content=b"[" * 5000, headers=ok_headers)).status_code == 413
        for wrong in (
            {**body, "weight": 7},
            {**body, "action": "drop_tables"},
            {**body, "deployment_id": "../../etc"},
            {**body, "extra": 1},
        ):
            assert (await c.post(act, json=wrong, headers=ok_headers)).status_code == 400, wrong
        missing = {**body, "deployment_id": "dep-nope"}
        assert (await c.post(act, json=missing, headers=ok_headers)).status_code == 404
        other_model = await c.post("/ui/api/traffic/other", json=body, headers=ok_headers)
        assert other_model.status_code == 404
        done = await c.post(act, json=body, headers=ok_headers)
        assert done.status_code == 200, done.text
        assert done.json()["events"][0]["action"] == "advanced"
        routes = (await c.get("/admin/routes", headers=BEARER)).json()["models"][MODEL]
        weights = {r["deployment_id"]: r["weight"] for r in routes}
        assert weights[seeded.candidate] == pytest.approx(0.4)
        rolled = await c.post(
            act, json={"action": "rollback", "deployment_id": seeded.candidate}, headers=ok_headers
        )
        assert rolled.status_code == 200 and rolled.json()["events"][0]["action"] == "rolled_back"
        again = await c.post(
            act, json={"action": "rollback", "deployment_id": seeded.candidate}, headers=ok_headers
        )
        assert again.status_code == 409  # nothing left to roll back
        promoted = await c.post(
            act, json={"action": "promote", "deployment_id": seeded.candidate}, headers=ok_headers
        )
        assert promoted.status_code == 200 and promoted.json()["events"][0]["action"] == "promoted"
        routes = (await c.get("/admin/routes", headers=BEARER)).json()["models"][MODEL]
        states = {r["deployment_id"]: r["state"] for r in routes}
        assert states == {seeded.candidate: "stable", seeded.base_deployment: "previous"}
        # Signing out clears the cookie.
        await c.post("/ui/logout")
        assert (await c.get("/ui/api/runs")).status_code == 401


async def test_http_surface(seeded: Seeded) -> None:
    """Unauthenticated visits are refused; the login cookie works; hostile and malformed input
    (forms, cookies, action bodies, run ids) is answered with 4xx, never executed or 500."""
    await check_refusals(seeded)
    await check_lineage(seeded)
    await check_login_and_actions(seeded)
    await check_stream_away(seeded)


async def check_stream_away(seeded: Seeded) -> None:
    """NATS unreachable: the pages still answer, from what was read, and say it is stale."""
    events = seeded.gw.dashboard.events
    await events.close()
    events.nats_url = "nats://127.0.0.1:1"
    events._checked = 0.0
    async with client(seeded, headers=BEARER) as c:
        page = await c.get("/ui/runs")
    assert page.status_code == 200
    assert RUN in page.text and 'id="stale"' in page.text


async def check_lineage(seeded: Seeded) -> None:
    async with client(seeded, headers=BEARER) as c:
        page = await c.get("/ui/lineage", params={"q": seeded.candidate})
        assert page.status_code == 200
        for ident in ("m-0001", "ad-0001", "ds-0001", "bf16-merged", RUN):
            assert ident in page.text
        hostile = await c.get("/ui/lineage", params={"q": HOSTILE})
        assert hostile.status_code == 404 and HOSTILE not in hostile.text
        assert (await c.get("/ui/lineage", params={"q": "x" * 20_000})).status_code == 404
        # A real answer through the gateway, captured, then traced back from its response id.
        made = await c.post("/admin/keys", json={"scopes": ["client"]})
        as_client = {"Authorization": f"Bearer {made.json()['key']}"}
        answer = await c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers=as_client,
        )
        assert answer.status_code == 200, answer.text
        response_id = answer.json()["id"]
        served_by = answer.headers["x-tuneloop-deployment"]

        async def traced() -> bool:
            r = await c.get("/ui/lineage", params={"q": response_id})
            return r.status_code == 200 and served_by in r.text and "answered by" in r.text

        await eventually(traced, timeout_s=15, what="the captured response's lineage")


async def test_pages_in_chromium(seeded: Seeded, chromium: Path, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    dialogs: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 900})

            async def confirm(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", confirm)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # Unauthenticated: the login form, with a 401.
            refused = await page.goto(f"{seeded.url}/ui/runs")
            assert refused is not None and refused.status == 401
            await page.screenshot(path=str(shots / "0-login.png"))
            await page.fill("input[name=key]", ADMIN_KEY)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{seeded.url}/ui/runs")

            # Runs: the finished run and the failed one, its reason shown as text.
            row = page.locator(f'tr[data-run="{RUN}"]')
            await row.wait_for()
            assert "done" in await row.inner_text()
            failed = page.locator(f'tr[data-run="{FAILED_RUN}"]')
            assert HOSTILE in await failed.locator("td.reason").inner_text()
            assert await page.evaluate("window.__pwned") is None
            await page.screenshot(path=str(shots / "1-runs.png"), full_page=True)

            # Run detail: real charts with the run's data points.
            await row.locator("a").click()
            await page.wait_for_url(f"**/ui/runs/{RUN}")
            await page.wait_for_selector("body[data-ready='1']")
            loss = page.locator("#loss-chart canvas")
            await loss.wait_for()
            plotted = await page.evaluate(
                "() => document.getElementById('loss-chart').uplot.data.slice(1)"
                ".flat().filter(v => v !== null).length"
            )
            assert plotted == seeded.steps
            bars = page.locator("#category-chart-1 canvas")
            await bars.wait_for()
            series = await page.evaluate(
                "() => document.getElementById('category-chart-1').uplot.series.map(s => s.label)"
            )
            assert series == ["category", "base", "fine-tuned"]
            values = await page.evaluate(
                "() => document.getElementById('category-chart-1').uplot.data.slice(1)"
            )
            assert values == [
                [b for b, _ in CATEGORIES.values()],
                [t for _, t in CATEGORIES.values()],
            ]
            assert "bf16-merged" in await page.locator("#quantization").inner_text()
            rejected = await page.locator("#rejected").inner_text()
            assert "duplicate" in rejected and "5" in rejected
            assert "email" in await page.locator("#pii").inner_text()
            assert "canary_started" in await page.locator("#rollout").inner_text()
            # The run's trace from the span file (in-process spans are all "tests" here).
            trace = page.locator("#trace table.trace tr")
            assert await trace.count() > 1
            assert "consume evaluation.completed" in await page.locator("#trace").inner_text()
            await page.screenshot(path=str(shots / "2-run.png"), full_page=True)

            # Traffic reflects a weight change made through the admin API.
            async with httpx.AsyncClient(base_url=seeded.url, timeout=10) as c:
                changed = await c.post(
                    f"/admin/routes/{MODEL}/weight",
                    json={"deployment_id": seeded.candidate, "weight": 0.35},
                    headers=BEARER,
                )
                assert changed.status_code == 200, changed.text
            await page.click("nav a[href='/ui/traffic']")
            await page.wait_for_selector("body[data-ready='1']")

            async def history_shows_the_change() -> bool:
                # The route table is read from the DB at once; the history comes from the
                # stream, which the admin change reaches through the outbox relay a moment later.
                if "weight set by admin" in await page.locator("#history").inner_text():
                    return True
                await page.reload()
                await page.wait_for_selector("body[data-ready='1']")
                return False

            await eventually(history_shows_the_change, timeout_s=20, what="history of the change")
            cand = page.locator(f'tr[data-deployment="{seeded.candidate}"]')
            assert (await cand.locator(".weight").inner_text()).strip() == "35%"
            assert (await cand.locator(".state").inner_text()).strip() == "canary"
            stable = page.locator(f'tr[data-deployment="{seeded.base_deployment}"]')
            assert (await stable.locator(".share").inner_text()).strip() == "65%"
            assert "weight set by admin" in await page.locator("#history").inner_text()
            await page.wait_for_selector("section.model .live-chart canvas")
            span = await page.evaluate(
                "() => { const x = document.querySelector('.live-chart').uplot.scales.x;"
                " return x.max - x.min; }"
            )
            assert 60 <= span < 3600  # seconds: the time this page has been open, not years
            await page.screenshot(path=str(shots / "3-traffic.png"), full_page=True)

            # ...and an admin action from the page, after its confirmation.
            await cand.locator(".weight-input").fill("60")
            async with page.expect_navigation():
                await cand.locator(".set-weight").click()
            assert any("60%" in d for d in dialogs)
            cand = page.locator(f'tr[data-deployment="{seeded.candidate}"]')
            assert (await cand.locator(".weight").inner_text()).strip() == "60%"
            await page.screenshot(path=str(shots / "4-traffic-after.png"), full_page=True)

            # Lineage of the canary: model, adapter, dataset version.
            await page.click("nav a[href='/ui/lineage']")
            await page.fill("input[name=q]", seeded.candidate)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            chain = await page.locator("#lineage").inner_text()
            assert all(k in chain for k in ("deployment", "model", "adapter", "dataset"))
            await page.screenshot(path=str(shots / "5-lineage.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()
    async with httpx.AsyncClient(base_url=seeded.url, timeout=10) as c:
        routes = (await c.get("/admin/routes", headers=BEARER)).json()["models"][MODEL]
    assert {r["deployment_id"]: r["weight"] for r in routes}[seeded.candidate] == pytest.approx(0.6)
    print(f"screenshots: {shots}")
