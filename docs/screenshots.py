"""Make the README's screenshots of the page at `/`: `python docs/screenshots.py` (from the repo root).

Starts a server on the HTTP tests' tiny random zoo (`tests/api/zoo.py`: models `tiny`, `moe`, adapters
`a1`, `a2`; its text is gibberish, the page is the point), drives Debian's chromium with Playwright while
a few threads send requests, and writes `docs/playground.png` (playground + compare) and
`docs/metrics.png` (the live-metrics panel).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.api.conftest import start_server  # noqa: E402
from tests.api.test_page_browser import CHROMIUM_ARGS, ensure_chromium  # noqa: E402
from tests.api.zoo import build_zoo  # noqa: E402


def load(url: str, stop: threading.Event, model: str) -> None:
    """Closed-loop requests until stop is set, so the charts have something to draw."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 32})
            time.sleep(0.05)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        zoo = build_zoo(Path(tmp) / "zoo")
        server = start_server(zoo, Path(tmp), max_batch_size=8)
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(server.url, stop, m)) for m in ("tiny", "moe", "a1", "a2")]
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=ensure_chromium(), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
                page.goto(server.url + "/")
                page.wait_for_selector("#pg-model option[value=a2]", state="attached")
                for t in threads:
                    t.start()
                page.fill("#pg-max", "48")
                page.click("#pg-run")
                page.locator("#cmp-models input[value=a1]").check()
                page.click("#cmp-run")
                time.sleep(14)  # several metric polls under load
                stop.set()
                a = page.locator("#playground").bounding_box()
                b = page.locator("#compare").bounding_box()
                clip = {"x": 0, "y": 0, "width": 1280, "height": max(a["y"] + a["height"], b["y"] + b["height"]) + 12}
                page.screenshot(path=str(ROOT / "docs/playground.png"), clip=clip)
                page.locator("#metrics").screenshot(path=str(ROOT / "docs/metrics.png"))
                browser.close()
        finally:
            stop.set()
            for t in threads:
                if t.is_alive():
                    t.join()
            server.stop()
    print("wrote docs/playground.png and docs/metrics.png")  # noqa: T201


if __name__ == "__main__":
    main()
