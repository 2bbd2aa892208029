"""Benchmark: causal self-attention, plain math path ("eager") vs the SDPA flash path ("sdpa").

Both paths are called through `models.attention.attend` exactly as the model calls it for a plain
causal batch (`mask=None`), on the same random q, k, v, batch 1, 8 heads of 64, float32 on CPU.
Per sequence length it reports the median time of each path (timed interleaved), the peak memory
the call allocates (`bench.common.profile_memory`), their ratios and the largest output difference.
The issue's target, at 4096 tokens the flash path at least 4x faster and 4x smaller at peak, is
checked and written down as met or not; nothing here is tuned to meet it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import profile_memory, time_interleaved, write_report
from models.attention import attend

NAME = "attention"
IMPLEMENTATIONS = ("eager", "sdpa")
MIB = 2**20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionBenchConfig:
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    # Warm-up calls per path; the first one also gives the outputs compared for max_abs_diff.
    warmup: int = 2
    reps: int = 7
    # From this length on one math-path call takes seconds, so fewer calls keep the run bounded.
    long_length: int = 4096
    long_warmup: int = 1
    long_reps: int = 3
    target_length: int = 4096
    target_speedup: float = 4.0
    target_memory_ratio: float = 4.0
    seed: int = 0

    def schedule(self, length: int) -> tuple[int, int]:
        """(warm-up calls, timed repetitions) for one sequence length."""
        if length >= self.long_length:
            return self.long_warmup, self.long_reps
        return self.warmup, self.reps


TINY = AttentionBenchConfig(lengths=(64, 128), warmup=1, reps=2)


def measure_length(config: AttentionBenchConfig, length: int) -> tuple[dict[str, Any], set[str]]:
    """One table row for `length`, and the SDPA kernels the profiler saw."""
    generator = torch.Generator().manual_seed(config.seed + length)
    shape = (config.batch, config.heads, length, config.head_dim)  # (B, H, T, D)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    scale = config.head_dim**-0.5
    calls = {impl: (lambda impl=impl: attend(q, k, v, None, scale, impl)) for impl in IMPLEMENTATIONS}
    warmup, reps = config.schedule(length)

    outputs = {impl: call() for impl, call in calls.items()}  # (B, H, T, D) each; counts as a warm-up call
    max_abs_diff = (outputs["eager"] - outputs["sdpa"]).abs().max().item()
    del outputs
    seconds = time_interleaved(calls, warmup=max(warmup - 1, 0), reps=reps)
    memory = {impl: profile_memory(call) for impl, call in calls.items()}
    kernels = {op for op in memory["sdpa"].ops if "scaled_dot_product" in op}

    eager_ms, sdpa_ms = seconds["eager"] * 1e3, seconds["sdpa"] * 1e3
    eager_mib, sdpa_mib = memory["eager"].peak_bytes / MIB, memory["sdpa"].peak_bytes / MIB
    row = {
        "length": length,
        "eager_ms": eager_ms,
        "sdpa_ms": sdpa_ms,
        "speedup": eager_ms / sdpa_ms,
        "eager_peak_mib": eager_mib,
        "sdpa_peak_mib": sdpa_mib,
        "memory_ratio": eager_mib / sdpa_mib,
        "max_abs_diff": max_abs_diff,
        "reps": reps,
    }
    return row, kernels


def target_verdict(config: AttentionBenchConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    verdict: dict[str, Any] = {
        "length": config.target_length,
        "speedup_at_least": config.target_speedup,
        "memory_ratio_at_least": config.target_memory_ratio,
    }
    row = next((r for r in rows if r["length"] == config.target_length), None)
    if row is None:
        return {**verdict, "measured": False}
    return {
        **verdict,
        "measured": True,
        "speedup": row["speedup"],
        "memory_ratio": row["memory_ratio"],
        "speed_met": row["speedup"] >= config.target_speedup,
        "memory_met": row["memory_ratio"] >= config.target_memory_ratio,
    }


def plot(fig: Figure, rows: list[dict[str, Any]]) -> None:
    time_ax, memory_ax = fig.subplots(1, 2)
    lengths = [r["length"] for r in rows]
    for impl, marker in zip(IMPLEMENTATIONS, ("o", "s")):
        time_ax.plot(lengths, [r[f"{impl}_ms"] for r in rows], marker=marker, label=impl)
        memory_ax.plot(lengths, [r[f"{impl}_peak_mib"] for r in rows], marker=marker, label=impl)
    for ax, ylabel, title in (
        (time_ax, "median time (ms)", "causal attention time"),
        (memory_ax, "peak allocated (MiB)", "causal attention peak memory"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    config = TINY if tiny else AttentionBenchConfig()
    rows, kernels = [], set()
    with torch.inference_mode():
        for length in tqdm(config.lengths, desc=NAME, unit="length"):
            row, seen = measure_length(config, length)
            rows.append(row)
            kernels |= seen
            log.info(
                "%s T=%d: %.3g ms vs %.3g ms (%.2fx)", NAME, length, row["eager_ms"], row["sdpa_ms"], row["speedup"]
            )
    meta = {
        "config": asdict(config),
        "dtype": "float32",
        "device": "cpu",
        "sdpa_kernels": sorted(kernels),
        "target": target_verdict(config, rows),
        "columns": "speedup = eager_ms / sdpa_ms; memory_ratio = eager_peak_mib / sdpa_peak_mib; "
        "peak = torch CPU-allocator bytes held at once during one call, output included",
    }
    return write_report(NAME, rows, out_dir, plot, meta)
