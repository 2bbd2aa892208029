"""The page at `/` in a real browser: Debian's chromium driven by Playwright for Python.

Checks what a user sees against real servers (`server`, `auth_server` from conftest): the page loads
with no console errors and no request leaving 127.0.0.1; a prompt streams into the output with its
timings; compare shows two answers; the metrics panel updates after requests; a wrong key shows the
server's own error message; a 503 from `/ready` shows a clear banner; adapter admin with the admin key;
no horizontal scrolling on a phone-sized window. Chromium is installed with apt when missing (as root);
the test is skipped, saying why, only where apt-get cannot be used. Screenshots go to pytest's tmp dir
(`docs/screenshots.py` makes the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import ADMIN_KEY, USER_KEY

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def ensure_chromium() -> str:
    """The chromium binary, installed from Debian's archive when missing; skips only without apt."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no /usr/bin/chromium, and apt-get (as root) is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright missing: pip install -r requirements-dev.txt"
    )
    executable = ensure_chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page with its console errors and every URL it requested recorded."""

    def __init__(self, page, base: str) -> None:
        self.page, self.base, self.errors, self.urls = page, base, [], []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))

    def check(self, allowed_status: tuple[int, ...] = ()) -> None:
        """No request left the server's origin; no console error except the browser's own line for an
        expected error status (Chromium logs "Failed to load resource ... status of 401")."""
        foreign = [u for u in self.urls if not (u.startswith(self.base + "/") or u.startswith("data:"))]
        assert not foreign, f"requests leaving {self.base}: {foreign}"
        expected = [f"status of {code} " for code in allowed_status]
        errors = [e for e in self.errors if not any(x in e for x in expected)]
        assert not errors, f"console errors: {errors}"


@pytest.fixture
def open_page(browser) -> Iterator:
    contexts = []

    def open_(server, **context_args) -> Watched:
        # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's CSP forbids (the
        # CSP itself is checked in test_page_headers; foreign requests are still recorded and refused here)
        options = {"viewport": {"width": 1280, "height": 1100}, "bypass_csp": True, **context_args}
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        watched = Watched(page, server.url)
        page.goto(server.url + "/")
        return watched

    yield open_
    for context in contexts:
        context.close()


def wait_models(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#pg-model option').length >= {count}")


def test_page_headers(server):
    """The page and its assets are served from the package, with a same-origin-only CSP."""
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "metrics.js", "app.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    missing = httpx.get(server.url + "/static/index.html.bak")
    assert missing.status_code == 404 and "message" in missing.json()["error"]


def test_playground_streams_and_metrics_update(server, open_page, tmp_path):
    w = open_page(server)
    page = w.page
    wait_models(page, 4)  # tiny, moe, a1, a2
    assert page.locator("#ready").inner_text() == "ready"
    options = page.locator("#pg-model option").evaluate_all("os => os.map(o => o.value)")
    assert options[:2] == ["tiny", "moe"] and set(options[2:]) == {"a1", "a2"}
    page.wait_for_selector("#m-req-total")
    before = int(page.locator("#m-req-total").inner_text())

    page.select_option("#pg-model", "a1")
    page.fill("#pg-max", "24")
    page.fill("#pg-prompt", "hello world")
    page.click("#pg-run")
    page.wait_for_function("document.querySelector('#pg-stats').textContent.includes('finish')")
    stats = page.locator("#pg-stats").inner_text()
    assert re.search(r"TTFT \d+ ms .* tok/s .* \d+ prompt \+ \d+ generated", stats), stats
    assert page.locator("#pg-output").inner_text().strip(), "no text streamed into the output"

    page.select_option("#pg-mode", "chat")
    page.select_option("#pg-model", "moe")  # feeds the expert heatmap
    page.click("#pg-run")
    page.wait_for_function("document.querySelector('#pg-stats').textContent.includes('finish')")
    assert re.search(r"\d+ generated", page.locator("#pg-stats").inner_text())

    page.wait_for_function(f"+document.querySelector('#m-req-total').textContent >= {before + 2}", timeout=15_000)
    assert int(page.locator("#m-tok-total").inner_text()) > 0
    page.wait_for_selector("#m-moe figure[data-model=moe] canvas", state="attached", timeout=15_000)
    assert "tiny" in page.locator("#m-adapters").inner_text()
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    w.check()


def test_compare_shows_two_answers(server, open_page):
    w = open_page(server)
    page = w.page
    wait_models(page, 4)
    checked = page.locator("#cmp-models input:checked").evaluate_all("cs => cs.map(c => c.value)")
    assert checked == ["tiny", "moe"]
    page.fill("#pg-max", "12")
    page.click("#cmp-run")
    page.wait_for_function(
        "[...document.querySelectorAll('#cmp-results .card .stats')].filter(s => s.textContent.includes('finish'))"
        ".length === 2"
    )
    cards = page.locator("#cmp-results .card")
    assert cards.count() == 2
    for i in range(2):
        assert cards.nth(i).locator("pre").inner_text().strip()
        assert re.search(r"\d+ generated", cards.nth(i).locator(".stats").inner_text())
    w.check()


def test_wrong_key_shows_server_error_and_admin_works(auth_server, zoo, open_page):
    expected = httpx.get(auth_server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).json()
    message = expected["error"]["message"]
    w = open_page(auth_server)
    page = w.page
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    # The page's first load (no key yet) already shows a 401: wait for the wrong key's own message.
    page.wait_for_function("m => document.querySelector('#banner').textContent.includes(m)", arg=message)
    assert message in page.locator("#banner").inner_text()
    page.click("#pg-run")
    page.wait_for_function("document.querySelector('#pg-output').classList.contains('error')")
    assert message in page.locator("#pg-output").inner_text()

    page.fill("#api-key", USER_KEY)
    page.dispatch_event("#api-key", "change")
    wait_models(page, 2)  # tiny, moe, a1
    page.wait_for_function("document.querySelector('#banner').hidden")
    page.fill("#pg-max", "8")
    page.click("#pg-run")
    page.wait_for_function("document.querySelector('#pg-stats').textContent.includes('finish')")

    page.fill("#ad-name", "a3")
    page.fill("#ad-path", str(zoo["a3"]))
    page.click("#ad-load")  # the user key is not an admin key
    page.wait_for_function("document.querySelector('#ad-result').classList.contains('error')")
    assert "401" in page.locator("#ad-result").inner_text()
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#ad-load")
    page.wait_for_function("[...document.querySelectorAll('#pg-model option')].some(o => o.value === 'a3')")
    page.click("#ad-unload")
    page.wait_for_function("![...document.querySelectorAll('#pg-model option')].some(o => o.value === 'a3')")
    w.check(allowed_status=(401,))


def test_not_ready_banner_and_narrow_window(server, open_page):
    w = open_page(server, viewport={"width": 375, "height": 800})
    page = w.page
    wait_models(page, 4)
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], f"horizontal scrolling at 375 px: {width}"
    page.route(
        "**/ready",
        lambda route: route.fulfill(status=503, json={"status": "not ready", "detail": "loading models"}),
    )
    page.wait_for_function("document.querySelector('#banner').textContent.includes('not ready')", timeout=10_000)
    assert "loading models" in page.locator("#banner").inner_text()
    assert page.locator("#ready").inner_text() == "not ready"
    w.check(allowed_status=(503,))
