"""Benchmark: a soak run of a real server under mixed traffic, adapter churn and dropped clients (issue 11).

`modelserve serve` runs in a subprocess on 127.0.0.1 with an API key, an admin key and an adapter root.
Served: the demo zoo in `artifacts/` when it is built (full size), else (and always at tiny size) two
random models (a dense llama with three `peft`-written LoRA adapters, and a mixtral). For `duration_s`
(10 minutes full, 5 s tiny) a fixed set of threads, each with its own connection, drives it:

- completion clients: mixed models and adapters (base models, the pinned adapters, and whatever the
  churn has loaded right now), half of them streaming; greedy or sampled, a few to a few dozen tokens;
- droppers: open a stream and close the connection after its first chunk, or send a non-streaming
  request with a read timeout far shorter than the generation;
- churn: copies an adapter under the adapter root with a fresh name, loads it through
  `POST /v1/load_lora_adapter` (admin key), lets the clients use it, then unloads it through
  `POST /v1/unload_lora_adapter` (a 409 "in use" is retried) and deletes the copy.

Recorded: every response status by code (and 5xx separately: the server failing; an error event
inside a 200 stream counts as one too), completed requests, transport errors, and every
`sample_interval_s` the server's RSS (`VmRSS` of /proc/PID/status) and the request rate. At the end,
after the traffic stops: `modelserve_num_requests_running` from /metrics (it must come back to 0),
then SIGTERM and the exit code. Targets, each reported as met or not: 0 server errors; RSS growth
(median of the last `window_s` vs median of the first `window_s` after `warmup_s`) below 5%; running
back to 0. A tiny run only proves the harness works: its RSS windows are seconds long.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

from bench.common import start_service, write_report
from bench.serving import TINY_DENSE, TINY_MOE, ZOO, make_peft_adapters, random_model

NAME = "soak"
USER_KEY, ADMIN_KEY = "soak-user-key", "soak-admin-key"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    warmup_s: float = 60.0  # RSS before this is start-up growth (allocator pools, first batches), not a leak
    window_s: float = 60.0  # RSS growth compares the median of the first window after warm-up with the last
    sample_interval_s: float = 5.0  # RSS and request-rate samples (the report's rows)
    log_interval_s: float = 30.0
    clients: int = 6  # completion clients; every other one streams
    droppers: int = 2
    churn_resident: int = 2  # churn adapters loaded at once; the oldest is unloaded beyond this
    churn_pause_s: float = 2.0
    max_tokens: tuple[int, int] = (4, 32)
    request_timeout_s: float = 120.0  # a client giving up: counted as a transport error (a hang)
    drain_wait_s: float = 30.0  # after the traffic, how long running may take to reach 0
    server_threads: int | None = 2  # the server's torch threads (None: torch's default)
    startup_timeout_s: float = 300.0
    max_rss_growth: float = 0.05
    tiny: bool = False


TINY = SoakConfig(
    duration_s=5.0,
    warmup_s=1.0,
    window_s=1.5,
    sample_interval_s=0.25,
    log_interval_s=1.0,
    clients=3,
    droppers=1,
    churn_resident=1,
    churn_pause_s=0.2,
    max_tokens=(2, 8),
    drain_wait_s=15.0,
    server_threads=1,
    startup_timeout_s=120.0,
    tiny=True,
)


@dataclass
class Tally:
    """What the traffic threads saw, each change under the lock: response statuses ("200", "404", and
    "load 200", "unload 409" for the admin calls), transport errors by type, and counts."""

    statuses: Counter = field(default_factory=Counter)
    transport_errors: Counter = field(default_factory=Counter)
    # completed, dropped, loads, unloads; status_5xx; stream_errors (an error event, or a chunk that is
    # not JSON, inside a 200 stream: the server failed the request after its headers)
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self, code: int, call: str = "") -> None:
        with self.lock:
            self.statuses[f"{call} {code}".strip()] += 1
            self.counts["status_5xx"] += code >= 500

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def transport_error(self, exc: Exception) -> None:
        with self.lock:
            self.transport_errors[type(exc).__name__] += 1

    def server_errors(self) -> int:
        return self.counts["status_5xx"] + self.counts["stream_errors"]


@dataclass
class Zoo:
    models: dict[str, Path]  # served with --model (empty: the demo zoo from artifacts/)
    pinned: dict[str, Path]  # served with --adapter (loaded at start)
    churn_sources: list[Path]  # adapter directories the churn copies
    prompts: list[str]
    origin: str  # "zoo" or "random"


def build_zoo(workdir: Path, tiny: bool) -> Zoo:
    """The demo zoo when it is built (and not tiny), else random models and peft adapters in workdir."""
    zoo_adapters = sorted(p for p in (ZOO / "adapters").glob("*") if (p / "adapter_config.json").is_file())
    if not tiny and (ZOO / "zoo.json").is_file() and zoo_adapters:
        prompts = ["def main():", "The quick brown fox", "import os\n", "In this module we", "class Config:"]
        return Zoo({}, {}, zoo_adapters, prompts, "zoo")
    dense = random_model("dense", TINY_DENSE, workdir, seed=0)
    moe = random_model("moe", TINY_MOE, workdir, seed=1)
    adapters = make_peft_adapters(dense.directory, workdir / "adapters", count=3, rank=4, std=0.02, seed=0)
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(3, TINY_DENSE.vocab_size)}" for _ in range(n)) for n in (4, 9, 16, 30)]
    models = {"dense": dense.directory, "moe": moe.directory}
    return Zoo(models, {"pinned-a": adapters[0], "pinned-b": adapters[1]}, adapters, prompts, "random")


def start_server(zoo: Zoo, workdir: Path, config: SoakConfig) -> tuple[subprocess.Popen, str, Path]:
    # Roots: the churn's copies, and where the start-up adapters live (so an evicted one may come back).
    roots = {workdir / "churn", *(d.parent.resolve() for d in (*zoo.pinned.values(), *zoo.churn_sources))}
    settings = {
        "api_keys": [USER_KEY],
        "admin_api_keys": [ADMIN_KEY],
        "adapter_roots": sorted(str(root) for root in roots),
        "log_level": "warning",
        "torch_threads": config.server_threads,
        "artifacts_dir": None if zoo.models else str(ZOO.resolve()),
    }
    (workdir / "churn").mkdir()
    args = ["--device", "cpu"] if config.tiny else []
    args += [x for name, d in zoo.models.items() for x in ("--model", f"{name}={d}")]
    args += [x for name, d in zoo.pinned.items() for x in ("--adapter", f"{name}={d}")]
    return start_service(workdir, settings, args, config.startup_timeout_s)


class Soak:
    """The traffic threads, the sampler and the shared state between them."""

    def __init__(self, url: str, zoo: Zoo, workdir: Path, config: SoakConfig, pid: int) -> None:
        self.url, self.zoo, self.workdir, self.config, self.pid = url, zoo, workdir, config, pid
        self.tally = Tally()
        self.stop = threading.Event()
        self.churned: list[str] = []  # churn adapters loaded now, oldest first (clients may pick them)
        self.targets: list[str] = []  # base models and pinned adapters
        self.samples: list[dict[str, Any]] = []

    def client(self, key: str = USER_KEY, read_timeout: float | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        timeout = httpx.Timeout(self.config.request_timeout_s, read=read_timeout or self.config.request_timeout_s)
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def body(self, rng: random.Random, stream: bool) -> dict[str, Any]:
        model = rng.choice(self.targets + list(self.churned))
        body = {"model": model, "prompt": rng.choice(self.zoo.prompts), "stream": stream}
        return body | {"max_tokens": rng.randint(*self.config.max_tokens), "temperature": rng.choice([0.0, 0.7, 1.0])}

    # ---- traffic
    def completions(self, index: int) -> None:
        rng, stream = random.Random(index), index % 2 == 1
        with self.client() as http:
            while not self.stop.is_set():
                try:
                    self.one_request(http, self.body(rng, stream))
                except httpx.HTTPError as exc:
                    self.tally.transport_error(exc)
                    self.stop.wait(0.1)  # a server gone is reported, not hammered

    def one_request(self, http: httpx.Client, body: dict[str, Any]) -> None:
        if not body["stream"]:
            response = http.post("/v1/completions", json=body)
            self.tally.status(response.status_code)
            self.tally.count("completed", int(response.status_code == 200))
            return
        with http.stream("POST", "/v1/completions", json=body) as response:
            self.tally.status(response.status_code)
            if response.status_code != 200:
                response.read()
                return
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    self.tally.count("completed")
                elif line.startswith("data: "):
                    try:
                        failed = "error" in json.loads(line[6:])
                    except ValueError:
                        failed = True
                    self.tally.count("stream_errors", int(failed))

    def dropper(self, index: int) -> None:
        rng = random.Random(1000 + index)
        while not self.stop.is_set():
            body = self.body(rng, stream=rng.random() < 0.5) | {"max_tokens": self.config.max_tokens[1]}
            try:
                with self.client(read_timeout=None if body["stream"] else 0.02) as http:
                    if body["stream"]:
                        with http.stream("POST", "/v1/completions", json=body) as response:
                            self.tally.status(response.status_code)
                            next(response.iter_lines(), None)  # first chunk, then the connection closes
                    else:
                        self.tally.status(http.post("/v1/completions", json=body).status_code)
            except httpx.TimeoutException:
                pass  # the point: the client is gone before the answer
            except httpx.HTTPError as exc:
                self.tally.transport_error(exc)
                self.stop.wait(0.1)
            self.tally.count("dropped")

    def churn(self) -> None:
        root = self.workdir / "churn"
        with self.client(ADMIN_KEY) as http:
            for i in itertools.count():
                if self.stop.wait(self.config.churn_pause_s):
                    break
                try:
                    self.churn_step(http, root, i)
                except httpx.HTTPError as exc:
                    self.tally.transport_error(exc)

    def churn_step(self, http: httpx.Client, root: Path, i: int) -> None:
        if len(self.churned) >= self.config.churn_resident:
            name = self.churned.pop(0)  # the clients stop picking it before it goes
            response = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            self.tally.status(response.status_code, "unload")
            if response.status_code == 409:  # in use: try again next time
                self.churned.append(name)
            else:
                self.tally.count("unloads", int(response.status_code == 200))
                shutil.rmtree(root / name, ignore_errors=True)
            return
        name = f"churn-{i}"
        shutil.copytree(self.zoo.churn_sources[i % len(self.zoo.churn_sources)], root / name)
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)})
        self.tally.status(response.status_code, "load")
        if response.status_code == 200:
            self.tally.count("loads")
            self.churned.append(name)

    # ---- measurement
    def rss_mib(self) -> float:
        """The server's resident set size (VmRSS), NaN once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return float("nan")
        return next((int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmRSS:")), float("nan"))

    def sample(self, started: float) -> None:
        previous, last_log = (0.0, 0), 0.0
        while not self.stop.wait(self.config.sample_interval_s):
            now = time.monotonic() - started
            completed = self.tally.counts["completed"]
            rate = (completed - previous[1]) / max(now - previous[0], 1e-9)
            previous = (now, completed)
            row = {"t_s": round(now, 2), "rss_mib": round(self.rss_mib(), 2), "requests": completed}
            row |= {"req_per_s": round(rate, 2), "server_errors": self.tally.server_errors()}
            self.samples.append(row)
            if now - last_log >= self.config.log_interval_s:
                last_log = now
                progress = (NAME, now, self.config.duration_s, completed, row["server_errors"], row["rss_mib"])
                log.info("%s: %.0f/%.0f s, %d requests, %d server errors, RSS %.1f MiB", *progress)

    def run(self) -> None:
        with self.client() as http:
            listed = http.get("/v1/models").json()["data"]
        self.targets = [m["id"] for m in listed]
        started = time.monotonic()
        threads = [threading.Thread(target=self.completions, args=(i,)) for i in range(self.config.clients)]
        threads += [threading.Thread(target=self.dropper, args=(i,)) for i in range(self.config.droppers)]
        threads += [threading.Thread(target=self.churn), threading.Thread(target=self.sample, args=(started,))]
        for thread in threads:
            thread.start()
        self.stop.wait(self.config.duration_s)
        self.stop.set()
        for thread in threads:
            thread.join()


def running_after_drain(url: str, wait_s: float) -> tuple[float, float]:
    """(modelserve_num_requests_running summed over models, seconds it took to reach 0 or wait_s)."""
    start = time.monotonic()
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        running = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "modelserve_num_requests_running"
        )
        waited = time.monotonic() - start
        if running == 0 or waited >= wait_s:
            return running, waited
        time.sleep(0.25)


def traceback_kinds(text: str) -> Counter:
    """{exception line: count} of the tracebacks in a log (the first unindented line after each header)."""
    lines, kinds = text.splitlines(), Counter()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            following = (x for x in lines[i + 1 :] if x and not x.startswith((" ", "\t")))
            kinds[next(following, "?")[:160]] += 1
    return kinds


def rss_growth(rows: list[dict[str, Any]], config: SoakConfig) -> dict[str, Any]:
    end = rows[-1]["t_s"] if rows else 0.0
    first = [r["rss_mib"] for r in rows if config.warmup_s <= r["t_s"] < config.warmup_s + config.window_s]
    last = [r["rss_mib"] for r in rows if r["t_s"] > end - config.window_s]
    if not first or not last:
        return {"growth": None, "met": False, "note": "too few samples"}
    base, final = statistics.median(first), statistics.median(last)
    growth = final / base - 1
    met = growth < config.max_rss_growth
    return dict(baseline_mib=base, last_mib=final, growth=growth, at_most=config.max_rss_growth, met=met)


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    rss, rate = fig.subplots(1, 2)
    t = [r["t_s"] for r in rows]
    rss.plot(t, [r["rss_mib"] for r in rows], color="#4c72b0")
    rss.set_xlabel("time (s)")
    rss.set_ylabel("server RSS (MiB)")
    rss.set_title("server memory over the soak")
    rate.plot(t, [r["req_per_s"] for r in rows], color="#55a868")
    rate.set_xlabel("time (s)")
    rate.set_ylabel("completed requests / s")
    rate.set_title("request rate")
    for ax in (rss, rate):
        ax.grid(True, alpha=0.3)


def run(tiny: bool, out_dir: str | Path) -> dict[str, Path]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    config = TINY if tiny else SoakConfig()
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        workdir = Path(tmp)
        zoo = build_zoo(workdir, tiny)
        server, url, server_log = start_server(zoo, workdir, config)
        try:
            soak = Soak(url, zoo, workdir, config, server.pid)
            soak.run()
            running, drain_s = running_after_drain(url, config.drain_wait_s)
        finally:
            server.send_signal(signal.SIGTERM)
            server_exit = server.wait(120)
        tracebacks = traceback_kinds(server_log.read_text(errors="replace"))
    tally, rows, counts = soak.tally, soak.samples, soak.tally.counts
    errors, growth = tally.server_errors(), rss_growth(rows, config)
    meta = {
        "config": asdict(config),
        "origin": zoo.origin,
        "targets_served": soak.targets,
        "requests_completed": counts["completed"],
        "statuses": dict(sorted(tally.statuses.items())),
        "transport_errors": dict(tally.transport_errors),
        "stream_errors": counts["stream_errors"],
        "dropped_clients": counts["dropped"],
        "adapter_loads": counts["loads"],
        "adapter_unloads": counts["unloads"],
        "tracebacks_in_server_log": sum(tracebacks.values()),
        "traceback_exceptions": dict(tracebacks.most_common(5)),
        "server_exit_code_after_sigterm": server_exit,
        "target": {
            "server_errors": {"count": errors, "met": errors == 0},
            "rss_growth": growth,
            "running_at_end": {"value": running, "seconds_to_drain": round(drain_s, 2), "met": running == 0},
        },
    }
    percent = float("nan") if growth["growth"] is None else 100 * growth["growth"]
    summary = (NAME, counts["completed"], errors, percent, running)
    log.info("%s: %d requests, %d server errors, RSS growth %.2f%%, running at the end %g", *summary)
    return write_report(NAME, rows, out_dir, plot, meta)
