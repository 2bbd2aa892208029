"""Shared benchmark helpers: side-by-side timing, peak allocated memory, and report writing.

Timing: warm-up calls, then repetitions timed with `time.perf_counter`; the median is reported.
When several implementations are compared they are timed interleaved (a, b, a, b, ...) so that the
noise of a shared machine falls on all of them alike (DESIGN.md, Benchmarks).

Peak memory (CPU): the operation runs once under `torch.profiler.profile(profile_memory=True)`, which
records every allocation and free made through PyTorch's CPU allocator, including the temporary
buffers a kernel allocates inside itself. The running sum of those records, in time order, is the
memory the operation holds at each instant; its maximum is the peak. Inputs allocated before the
call are not counted; the output is (it is memory the operation needs). Memory held by non-torch
code (Python objects, BLAS scratch outside the allocator) is not seen.

Servers: `start_service` runs `modelserve serve` in a subprocess for the benchmarks that go through HTTP.

Reports: `write_report` writes `<out>/<name>.json` (rows, metadata and machine information),
`<out>/<name>.md` (a markdown table) and `<out>/<name>.png` (a matplotlib figure, Agg canvas).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]  # the repository: where `python -m service` runs
MEMORY_EVENT = "[memory]"  # name the profiler gives its allocation records


def time_median(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall time of `fn()` in seconds, over `reps` calls after `warmup` untimed calls."""
    return time_interleaved({"fn": fn}, warmup, reps)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Median wall time (s) of each function; every round calls each one once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


@dataclass(frozen=True)
class MemoryProfile:
    peak_bytes: int  # highest torch CPU-allocator memory held at once during the call
    ops: frozenset[str]  # aten ops the call ran (shows which kernel was dispatched)


def profile_memory(fn: Callable[[], object]) -> MemoryProfile:
    """Run `fn()` once under the profiler and return its peak allocated bytes (see module docstring)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result  # freed inside the window, after its allocation counted towards the peak
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == MEMORY_EVENT]
    records = sorted(((event.start_ns(), event.nbytes()) for event in events), key=lambda record: record[0])
    held, peak = 0, 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    ops = frozenset(event.name for event in prof.events() if event.name.startswith("aten::"))
    return MemoryProfile(peak_bytes=peak, ops=ops)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a benchmark's server subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(
    workdir: Path, settings: dict[str, Any], args: list[str], timeout: float
) -> tuple[subprocess.Popen, str, Path]:
    """`python -m service serve` on 127.0.0.1 and a free port, once `/ready` answers 200.

    Settings go through a JSON `--config` file in workdir (None values left out), so nothing is passed
    in environment variables; `args` are more `serve` flags (`--model`, `--adapter`, `--device`).
    Output goes to workdir/server-<port>.log. Returns (process, base URL, log path).
    """
    port = free_port()
    config = workdir / f"settings-{port}.json"
    config.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    argv = [sys.executable, "-m", "service", "serve", "--config", str(config), "--host", "127.0.0.1"]
    log_path, url = workdir / f"server-{port}.log", f"http://127.0.0.1:{port}"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([*argv, "--port", str(port), *args], cwd=ROOT, stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server not ready in {timeout:.0f} s: {log_path.read_text()[-2000:]}")


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    name: str,
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    plot_fn: Callable[[Figure, list[dict[str, Any]]], None],
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md` and `<name>.png` under `out_dir`; return their paths.

    `meta` (configuration, targets and whether they were met, notes) goes into the JSON as is and
    into the markdown as a list above the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    machine = machine_info()
    paths = {kind: out / f"{name}.{kind}" for kind in ("json", "md", "png")}
    payload = {"name": name, "machine": machine, "meta": meta, "rows": rows}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")

    described = [f"- {key}: {json.dumps(value, default=str)}" for key, value in meta.items()]
    host = f"{machine['platform']} ({machine['cpu_count']} CPUs)"
    when = f"Measured {machine['date']} on {host}, torch {machine['torch']}, torch threads: {machine['torch_threads']}."
    header = [f"# {name}", "", when, ""]
    paths["md"].write_text("\n".join([*header, *described, "", markdown_table(rows), ""]))

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    plot_fn(fig, rows)
    fig.savefig(paths["png"], dpi=120)
    return paths
