"""Each benchmark runs once at tiny size through `modelserve bench` and writes a complete report.

No timing is asserted (DESIGN.md, Benchmarks): only that the reports exist, carry their fields, and
that the MoE implementations compared agreed on the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import BENCHMARKS, run_benchmarks
from service.cli import main

MACHINE_FIELDS = {"platform", "cpu_count", "torch", "date"}
ATTENTION_FIELDS = {"length", "eager_ms", "sdpa_ms", "speedup", "eager_peak_mib", "sdpa_peak_mib", "memory_ratio"}
HTTP_FIELDS = {"path", "median_ms", "p10_ms", "p90_ms", "overhead_ms"}
MOE_FIELDS = {"tokens", "ours_ms", "hf_grouped_mm_ms", "hf_eager_ms", "speedup_vs_hf_grouped_mm", "speedup_vs_hf_eager"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    argv = ["bench", "--tiny", "--out", str(out)]
    for name in ("attention", "moe_dispatch", "speculative", "http_overhead", "soak"):
        argv += ["--only", name]
    assert main(argv) == 0
    return out


def load(reports: Path, name: str) -> dict:
    for kind in ("json", "md", "png"):
        assert (reports / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind} missing or empty"
    payload = json.loads((reports / f"{name}.json").read_text())
    assert payload["name"] == name
    assert MACHINE_FIELDS <= set(payload["machine"])
    assert payload["rows"]
    return payload


def test_attention_report(reports: Path) -> None:
    payload = load(reports, "attention")
    assert [row["length"] for row in payload["rows"]] == [64, 128]
    for row in payload["rows"]:
        assert ATTENTION_FIELDS <= set(row)
        assert row["eager_peak_mib"] > 0 and row["sdpa_peak_mib"] > 0
        assert row["max_abs_diff"] < 1e-4
    assert payload["meta"]["target"]["measured"] is False  # the 4096-token target is not run at tiny size
    assert "| length |" in (reports / "attention.md").read_text()


def test_moe_dispatch_report(reports: Path) -> None:
    payload = load(reports, "moe_dispatch")
    for row in payload["rows"]:
        assert MOE_FIELDS <= set(row)
        assert row["max_abs_diff_hf_grouped_mm"] < 1e-5
        assert row["max_abs_diff_hf_eager"] < 1e-5
    assert "| tokens |" in (reports / "moe_dispatch.md").read_text()


def test_http_overhead_report(reports: Path) -> None:
    payload = load(reports, "http_overhead")
    assert [row["path"] for row in payload["rows"]] == ["engine", "http", "http_stream"]
    for row in payload["rows"]:
        assert HTTP_FIELDS <= set(row) and row["median_ms"] > 0
    assert payload["meta"]["same_text_http_and_engine"] is True
    assert payload["meta"]["server_exit_code_after_sigterm"] == 0
    assert "met" in payload["meta"]["target"]
    assert "| path |" in (reports / "http_overhead.md").read_text()


def test_soak_report(reports: Path) -> None:
    """A few seconds of mixed traffic, adapter churn and dropped clients: no server error, nothing left running."""
    payload = load(reports, "soak")
    meta, target = payload["meta"], payload["meta"]["target"]
    assert target["server_errors"] == {"count": 0, "met": True}, meta["statuses"]
    assert target["running_at_end"]["met"] is True
    assert "growth" in target["rss_growth"]  # a verdict is written; seconds-long windows prove nothing
    assert meta["requests_completed"] > 0 and meta["adapter_loads"] > 0 and meta["dropped_clients"] > 0
    assert all(row["rss_mib"] > 0 for row in payload["rows"])
    assert meta["server_exit_code_after_sigterm"] == 0
    assert "| t_s |" in (reports / "soak.md").read_text()


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert {"attention", "moe_dispatch", "http_overhead"} <= set(BENCHMARKS)
    assert run_benchmarks(["no_such_benchmark"], tiny=True, out_dir=tmp_path, report=False) == 2
    assert not any(tmp_path.iterdir())


def test_speculative_report(reports: Path) -> None:
    payload = load(reports, "speculative")
    variants = [row["variant"] for row in payload["rows"]]
    assert variants[0] == "teacher" and len(variants) >= 2
    assert all(row["identical_tokens"] for row in payload["rows"])  # greedy speculation never changes tokens
    assert "target" in payload["meta"]


def test_gpu_check_script_runs_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.py is run for real only on a GPU machine; on the CPU it must still pass (minus compile)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--skip", "compile", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"hf_parity", "flash_bf16", "engine_bf16_speculative"} <= set(checks)
