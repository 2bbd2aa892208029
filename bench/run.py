"""Run the registered benchmarks by name and write their reports (`modelserve bench`).

A benchmark is a module with `run(tiny: bool, out_dir: Path) -> dict[str, Path]` that measures and
calls `bench.common.write_report`. To add one, add its name and module to `BENCHMARKS`; modules are
imported only when selected, so `--only attention` does not pay for importing `transformers`.
The `exp_*` entries are the seeded training experiments of `bench.experiments`.

The claims report (`bench.claims`): `modelserve bench --report` runs the selected benchmarks and
experiments (all of them without `--only`; that is `make bench`) and then writes `CLAIMS.md` and
`CLAIMS.json` into the same folder; `modelserve bench --claims-only` runs nothing and rewrites them
from the JSON already there (and the zoo summary, `artifacts/zoo.json`, snapshotted to the folder).
"""

from __future__ import annotations

import importlib
import logging
import os
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
    "quantization": "bench.quantization",
    "speculative": "bench.speculative",
    "ray_scale": "bench.ray_scale",
    "soak": "bench.soak",
    "prefix_cache": "bench.prefix_cache",
    "throughput": "bench.throughput",
    "structured_output": "bench.structured_output",
    "exp_mup": "bench.experiments.mup",
    "exp_sam": "bench.experiments.sam",
    "exp_residual": "bench.experiments.residual",
    "exp_layerwise_lr": "bench.experiments.layerwise_lr",
    "exp_schedule": "bench.experiments.schedule",
    "exp_norm": "bench.experiments.norm",
    "exp_regularisation": "bench.experiments.regularisation",
}
# Every benchmark runs on one CPU thread: the machines are shared, the claims are ratios of
# implementations timed side by side, and one thread keeps both the noise and the load bounded.
BENCH_THREADS = 1
# The training experiments report losses, not absolute times (their one timing, SAM's cost per step,
# is a ratio measured in the same run), so they may use both cores of the 2-core machines.
EXPERIMENT_THREADS = 2


def run_benchmarks(
    names: list[str] | None,
    tiny: bool,
    out_dir: str | Path,
    report: bool,
    claims_only: bool = False,
    zoo_path: str | Path = "artifacts/zoo.json",
) -> int:
    """Run the named benchmarks (all when None or empty) into out_dir; 0 on success, 2 on an unknown name.

    report: then write CLAIMS.md/CLAIMS.json from out_dir; claims_only: only that, running nothing.
    """
    if claims_only:
        return _write_claims(out_dir, zoo_path)
    selected = list(dict.fromkeys(names or BENCHMARKS))
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        log.error("unknown benchmark %s; known: %s", ", ".join(unknown), ", ".join(BENCHMARKS))
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    try:
        for name in selected:
            threads = min(EXPERIMENT_THREADS, os.cpu_count() or 1) if name.startswith("exp_") else BENCH_THREADS
            torch.set_num_threads(threads)
            paths = importlib.import_module(BENCHMARKS[name]).run(tiny=tiny, out_dir=Path(out_dir))
            log.info("%s: wrote %s", name, ", ".join(str(path) for path in paths.values()))
    finally:
        torch.set_num_threads(previous_threads)
    if report:
        return _write_claims(out_dir, zoo_path)
    return 0


def _write_claims(out_dir: str | Path, zoo_path: str | Path) -> int:
    from bench.claims import write_claims

    paths = write_claims(out_dir, zoo_path)
    log.info("claims report: wrote %s", ", ".join(str(path) for path in paths.values()))
    return 0
