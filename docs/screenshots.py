"""Make the README's screenshots of the page at `/`: `python docs/screenshots.py` (from the repo root).

Serves the trained demo zoo of `artifacts/` (`make build` makes it; `python -m service serve`, CPU), drives
Debian's chromium with Playwright, and writes:

- `docs/playground.png`: the playground streaming the teacher's greedy completion of a Python prompt with
  its time to first token, inter-token latency and tokens/s, and compare running the task prompt
  `upper: f a s t =` on the teacher, the student, the MoE model and the student's `student-upper` adapter
  (the bases continue it as code, the adapter answers ` F A S T`);
- `docs/metrics.png`: the live-metrics panel after about 40 s of closed-loop traffic from three threads
  (16-token completions) over every base model and adapter (the teacher greedy, so the student drafts for it).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.api.test_page_browser import CHROMIUM_ARGS, ensure_chromium  # noqa: E402

PLAYGROUND_PROMPT = "class Queue:\n    def __init__(self"
COMPARE_PROMPT = "upper: f a s t ="
COMPARED = ("teacher", "student", "moe", "student-upper")
# (model, prompt, temperature) of the background load: every base model and adapter of the zoo.
LOAD = [
    ("teacher", "def read_config(path):\n    ", 0.0),
    ("student", 'The "with" statement', 0.8),
    ("moe", "import os\n\n\ndef main():\n    ", 0.8),
    ("student-int8", "class Stack:\n    ", 0.8),
    ("student-upper", "upper: w o r k =", 0.0),
    ("student-lower", "lower: D E M O =", 0.0),
    ("student-code", "def parse(text):\n    ", 0.8),
    ("moe-english", "Frame objects", 0.8),
]


def serve(port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server was not ready in 300 s; see {log}")


def load(url: str, stop: threading.Event, jobs: list[tuple[str, str, float]]) -> None:
    """Closed-loop requests until stop is set, so the charts have something to draw."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            for model, prompt, temperature in jobs:
                body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": temperature}
                client.post("/v1/completions", json=body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8131)
    args = parser.parse_args()
    if not (ROOT / "artifacts" / "teacher" / "config.json").is_file():
        raise SystemExit("no demo zoo in artifacts/: run `make build` first")
    url = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.gettempdir()) / f"modelserve-screenshots-{args.port}.log"
    server = serve(args.port, log)
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(url, stop, LOAD[i::3])) for i in range(3)]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=ensure_chromium(), args=CHROMIUM_ARGS)
            # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's CSP forbids.
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1, bypass_csp=True)
            page.goto(url + "/")
            page.wait_for_selector("#pg-model option[value=student-upper]", state="attached")
            page.select_option("#pg-model", "teacher")
            page.select_option("#pg-mode", "completion")
            page.fill("#pg-max", "48")
            page.fill("#pg-temp", "0")
            page.fill("#pg-prompt", PLAYGROUND_PROMPT)
            page.click("#pg-run")
            page.wait_for_function("document.querySelector('#pg-stats').textContent.includes('finish')", timeout=60_000)
            for box in page.locator("#cmp-models input").all():
                box.set_checked(box.get_attribute("value") in COMPARED)
            page.fill("#cmp-prompt", COMPARE_PROMPT)
            page.click("#cmp-run")
            page.wait_for_function("!document.getElementById('cmp-run').disabled", timeout=60_000)
            a = page.locator("#playground").bounding_box()
            b = page.locator("#compare").bounding_box()
            clip = {"x": 0, "y": 0, "width": 1280, "height": max(a["y"] + a["height"], b["y"] + b["height"]) + 12}
            page.screenshot(path=str(ROOT / "docs/playground.png"), clip=clip)
            for t in threads:
                t.start()
            time.sleep(40)  # twenty metric polls under load
            page.locator("#metrics").screenshot(path=str(ROOT / "docs/metrics.png"))
            browser.close()
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        server.send_signal(signal.SIGINT)
        server.wait(30)
    sys.stdout.write("wrote docs/playground.png and docs/metrics.png\n")


if __name__ == "__main__":
    main()
