"""The deploy stack checked for real without Docker: promtool on the Prometheus files, a real Prometheus
scraping a real server under a short Locust load, every dashboard query returning data, and
`docker-compose config` on docker-compose.yml. Installs `prometheus` / `docker-compose` from
Debian's packages when missing (CI runs as root on Debian); skips only where apt-get is unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.zoo import build_zoo

ROOT = Path(__file__).resolve().parents[2]
# Every dashboard query must return a finite value: the server below runs speculative decoding (teacher with
# the student as draft), adapters and a MoE model, so none is 0/0.
NAN_ALLOWED: set[str] = set()


def ensure_debian_package(binary: str, package: str) -> str:
    """Path of `binary`, installing `package` with apt-get when it is missing."""
    path = shutil.which(binary)
    if path:
        return path
    if shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is missing and apt-get is unavailable to install Debian's {package}")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        pytest.skip(f"{binary} is missing and installing {package} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        result = subprocess.run(sudo + argv, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    path = shutil.which(binary)
    assert path, f"{package} installed but {binary} not on PATH"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    zoo = build_zoo(tmp_path_factory.mktemp("deploy_zoo"))
    port = free_port()
    env = {**os.environ, "MODELSERVE_TORCH_THREADS": "1", "MODELSERVE_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--device", "cpu"]
    for name in ("teacher", "student", "moe", "student-a", "student-b", "teacher-a"):
        argv += ["--model" if "-" not in name else "--adapter", f"{name}={zoo[name]}"]
    argv += ["--draft", "teacher=student"]
    log = tmp_path_factory.mktemp("deploy_server") / "server.log"
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"server exited {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not ready in 90 s:\n{log.read_text()}"
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_every_dashboard_query_returns_data(server, tmp_path):
    ensure_debian_package("prometheus", "prometheus")
    ensure_debian_package("promtool", "prometheus")
    out = tmp_path / "queries.json"
    argv = [sys.executable, "deploy/check_dashboard.py", "--target", server, "--prometheus-port", str(free_port())]
    argv += ["--scrape-interval", "1s", "--load-scenario", "smoke", "--load-duration", "15", "--json", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    log = result.stdout[-6000:] + result.stderr[-3000:]
    assert out.is_file(), log
    report = json.loads(out.read_text())
    assert report["rule_problems"] == [], log
    queries = report["queries"]
    panels = {q["panel"] for q in queries}
    assert len(queries) >= 30 and {"Time to first token", "Expert load (tokens/s per layer and expert)"} <= panels
    failed = [q for q in queries if q["status"] in ("empty", "error")]
    assert failed == [], log
    nan = [q for q in queries if q["status"] == "nan"]
    assert all(q["panel"] in NAN_ALLOWED for q in nan), log
    assert result.returncode == 0, log


@pytest.mark.slow
def test_docker_compose_config_is_valid():
    compose = ensure_debian_package("docker-compose", "docker-compose")
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [compose, "-f", "docker-compose.yml", *profile, "config", "-q"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    services = subprocess.run(
        [compose, "-f", "docker-compose.yml", "--profile", "gpu", "config", "--services"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert {"api", "api-gpu", "prometheus", "grafana", "locust-master", "locust-worker"} <= set(services)
    # Open-loop scenarios and a secured server: the user class, rate and key come from the environment.
    env = {**os.environ, "SCENARIO": "burst", "LOCUST_USER_CLASS": "OpenLoopUser", "RATE": "40"}
    env["MODELSERVE_API_KEY"] = "k-123"
    rendered = yaml.safe_load(
        subprocess.run([compose, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True, text=True,
                       env=env, check=True).stdout
    )  # fmt: skip
    master = rendered["services"]["locust-master"]
    command = master["command"] if isinstance(master["command"], str) else " ".join(master["command"])
    assert "--scenario burst --rate 40 OpenLoopUser" in command
    assert master["environment"]["LOCUST_API_KEY"] == "k-123" and "k-123" not in command


@pytest.mark.slow
def test_prometheus_files_are_valid():
    promtool = ensure_debian_package("promtool", "prometheus")
    for kind, path in (("config", "deploy/prometheus/prometheus.yml"), ("rules", "deploy/prometheus/alerts.yml")):
        result = subprocess.run([promtool, "check", kind, path], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
