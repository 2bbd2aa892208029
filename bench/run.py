"""Run the registered benchmarks by name and write their reports (`modelserve bench`).

A benchmark is a module with `run(tiny: bool, out_dir: Path) -> dict[str, Path]` that measures and
calls `bench.common.write_report`. To add one, add its name and module to `BENCHMARKS`; modules are
imported only when selected, so `--only attention` does not pay for importing `transformers`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "attention": "bench.attention",
    "moe_dispatch": "bench.moe_dispatch",
    "http_overhead": "bench.http_overhead",
    "multi_lora": "bench.multi_lora",
    "batching": "bench.batching",
    "decode": "bench.decode",
    "speculative": "bench.speculative",
}
# Every benchmark runs on one CPU thread: the machines are shared, the claims are ratios of
# implementations timed side by side, and one thread keeps both the noise and the load bounded.
BENCH_THREADS = 1


def run_benchmarks(names: list[str] | None, tiny: bool, out_dir: str | Path, report: bool) -> int:
    """Run the named benchmarks (all when None or empty) into out_dir; 0 on success, 2 on an unknown name."""
    selected = list(dict.fromkeys(names or BENCHMARKS))
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        log.error("unknown benchmark %s; known: %s", ", ".join(unknown), ", ".join(BENCHMARKS))
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    try:
        for name in selected:
            paths = importlib.import_module(BENCHMARKS[name]).run(tiny=tiny, out_dir=Path(out_dir))
            log.info("%s: wrote %s", name, ", ".join(str(path) for path in paths.values()))
    finally:
        torch.set_num_threads(previous_threads)
    if report:
        log.warning("--report: CLAIMS.md is not written yet (a later issue adds it); the reports above are complete")
    return 0
