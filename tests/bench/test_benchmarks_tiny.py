"""Each benchmark runs once at tiny size through `modelserve bench` and writes a complete report.

No timing is asserted (DESIGN.md, Benchmarks): only that the reports exist, carry their fields, and
that the MoE implementations compared agreed on the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import BENCHMARKS, run_benchmarks
from modelserve.cli import main

MACHINE_FIELDS = {"platform", "cpu_count", "torch", "date"}
ATTENTION_FIELDS = {"length", "eager_ms", "sdpa_ms", "speedup", "eager_peak_mib", "sdpa_peak_mib", "memory_ratio"}
HTTP_FIELDS = {"path", "median_ms", "p10_ms", "p90_ms", "overhead_ms"}
MOE_FIELDS = {"tokens", "ours_ms", "hf_grouped_mm_ms", "hf_eager_ms", "speedup_vs_hf_grouped_mm", "speedup_vs_hf_eager"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    argv = ["bench", "--tiny", "--out", str(out)]
    for name in ("attention", "moe_dispatch", "speculative", "http_overhead", "soak", "prefix_cache", "quantization"):
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
    assert [row["path"] for row in payload["rows"]] == ["client", "http", "http_stream"]
    for row in payload["rows"]:
        assert HTTP_FIELDS <= set(row) and row["median_ms"] > 0
    assert payload["meta"]["same_text_http_and_client"] is True
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


def test_prefix_cache_report(reports: Path) -> None:
    """TTFT with a cached prefix, concurrency under a KV budget, decode on the paged vs the old slot layout."""
    payload = load(reports, "prefix_cache")
    meta, rows = payload["meta"], payload["rows"]
    assert [row["paged"] for row in rows][:3] == ["warm: prefix cached", "paged", "paged"]
    assert all(row["ratio"] > 0 for row in rows)
    assert meta["ttft_cached_tokens"] == [meta["config"]["prefix_len"]]  # the warm request hit the whole prefix
    assert meta["correctness"] == {"same_first_token_cold_warm": True, "same_ids_paged_slot": True}
    concurrency = rows[1]
    assert concurrency["baseline_value"] == meta["config"]["budget_tokens"] // meta["config"]["max_model_len"]
    assert concurrency["paged_value"] > concurrency["baseline_value"]
    for costs in meta["decode"].values():  # the baseline is the old layout computing the same logits
        assert costs["paged_slots_max_abs_diff"] < 1e-4 and costs["paged_scattered_max_abs_diff"] < 1e-4
    assert len(meta["notes"]) == 3 + len(meta["decode"]) and all("met" in t for t in meta["target"].values())
    assert "| measure |" in (reports / "prefix_cache.md").read_text()


def test_quantization_report(reports: Path) -> None:
    """float32, bfloat16 and int8 (float32 or bfloat16 activations) of one random model; the kernel options."""
    payload = load(reports, "quantization")
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == ["float32", "bfloat16", "int8", "int8_bf16act"]
    for row in rows.values():
        assert row["disk_mb"] > 0 and row["memory_mb"] > 0 and row["b1_step_ms"] > 0 and row["val_bpb"] > 0
    assert rows["int8"]["smaller_in_memory"] > 3.0 and rows["bfloat16"]["smaller_in_memory"] > 1.9
    assert abs(rows["int8"]["bpb_change"]) < 0.05 and 0 <= rows["int8"]["greedy_agreement"] <= 1
    meta = payload["meta"]
    assert len(meta["target"]) == 6 and meta["kernel_options"]
    assert {"float32", "bfloat16", "dyn_int8", "ours"} <= set(meta["kernel_options"][0])
    assert "| model | variant |" in (reports / "quantization.md").read_text()


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert {"attention", "moe_dispatch", "http_overhead"} <= set(BENCHMARKS)
    assert run_benchmarks(["no_such_benchmark"], tiny=True, out_dir=tmp_path, report=False) == 2
    assert not any(tmp_path.iterdir())


def test_speculative_report(reports: Path) -> None:
    payload = load(reports, "speculative")
    variants = [row["variant"] for row in payload["rows"]]
    assert variants[0] == "teacher" and len(variants) >= 2
    assert "teacher (code editing)" in variants and any(v.startswith("ngram") for v in variants)
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
