"""HTTP test fixtures: a tiny zoo on disk and real `python -m service serve` subprocesses on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.zoo import build_zoo

ROOT = Path(__file__).resolve().parents[2]
USER_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kwargs})

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def metric_sum(metrics: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    zoo: dict[str, Path], tmp: Path, adapters=("a1", "a2"), ready_timeout: float = 60, **settings
) -> Server:
    """A real `modelserve serve` process on the tiny zoo, returned once /ready answers 200; settings become
    MODELSERVE_* variables (log_level="info" shows start-up progress in the log a failure prints)."""
    port = free_port()
    env = {**os.environ, "MODELSERVE_TORCH_THREADS": "1", "MODELSERVE_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    env["MODELSERVE_ADAPTER_ROOTS"] = json.dumps([str(zoo["a1"].parent)])
    env.update({f"MODELSERVE_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()})
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--device", "cpu"]
    argv += ["--model", f"tiny={zoo['tiny']}", "--model", f"moe={zoo['moe']}"]
    for name in adapters:
        argv += ["--adapter", f"{name}={zoo[name]}"]
    log = tmp / f"server-{port}.log"
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    headers = {"Authorization": f"Bearer {settings['api_keys'][0]}"} if settings.get("api_keys") else {}
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/ready", headers=headers, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready in {ready_timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("api_zoo"))


@pytest.fixture(scope="session")
def server(zoo, tmp_path_factory) -> Iterator[Server]:
    """The shared open server: 24 running + 8 waiting per model."""
    srv = start_server(zoo, tmp_path_factory.mktemp("server"), max_batch_size=24, max_waiting=8)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def auth_server(zoo, tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        zoo, tmp_path_factory.mktemp("auth"), adapters=("a1",), api_keys=[USER_KEY], admin_api_keys=[ADMIN_KEY]
    )
    yield srv
    srv.stop()
