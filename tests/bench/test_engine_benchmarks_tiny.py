"""The engine benchmarks (multi_lora, batching, decode, throughput) run once at tiny size and write complete reports.

No timing is asserted (DESIGN.md, Benchmarks): only that each report exists with its fields and
targets, and that the correctness checks the benchmarks make on the way found nothing wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import BENCHMARKS
from modelserve.cli import main

NAMES = ("multi_lora", "batching", "decode", "throughput")
SPLIT_FIELDS = {"decode_step_ms", "decode_forward_ms", "decode_other_ms"}
MULTI_LORA_FIELDS = {"block", "setup", "requests", "distinct_adapters", "tokens", "median_s", "tokens_per_s", "vs_base"}
BATCHING_FIELDS = {"mode", "concurrency", "requests", "tokens", "median_s", "tokens_per_s", "vs_sequential"}
DECODE_FIELDS = {
    "model",
    "params_total_m",
    "engine_decode_tok_s",
    "hf_decode_tok_s",
    "decode_speedup",
    "engine_e2e_tok_s",
    "hf_e2e_tok_s",
    "identical_tokens",
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    argv = ["bench", "--tiny", "--out", str(out)]
    for name in NAMES:
        argv += ["--only", name]
    assert main(argv) == 0
    return out


def load(reports: Path, name: str) -> dict:
    for kind in ("json", "md", "png"):
        assert (reports / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind} missing or empty"
    payload = json.loads((reports / f"{name}.json").read_text())
    assert payload["name"] == name and payload["rows"]
    assert {"platform", "cpu_count", "torch", "date"} <= set(payload["machine"])
    return payload


def test_registered() -> None:
    assert set(NAMES) <= set(BENCHMARKS)


def test_multi_lora_report(reports: Path) -> None:
    payload = load(reports, "multi_lora")
    rows = payload["rows"]
    for row in rows:
        assert MULTI_LORA_FIELDS | SPLIT_FIELDS <= set(row)
        assert row["tokens"] == row["requests"] * 4  # max_tokens 4, ignore_eos: every side generates all of them
    setups = {row["setup"] for row in rows if row["block"] == "target"}
    assert {"engine base", "engine base, LoRA layers", "engine mixed", "peft sequential"} == setups
    assert [row["distinct_adapters"] for row in rows if row["block"] == "curve"] == [0, 1, 2]
    target = payload["meta"]["target"]
    assert {"mixed_vs_base", "mixed_vs_base_met", "mixed_vs_peft", "mixed_vs_peft_met"} <= set(target)
    checks = payload["meta"]["correctness"]
    assert checks["engine_mixed_vs_peft"]["identical"] == 2  # each adapter's ids equal peft's for that adapter
    assert checks["engine_base_vs_base_with_lora_layers"]["identical"] == 2
    assert set(payload["meta"]["diagnosis"]["kernel_forward_ms"]) == {
        "no LoRA layers",
        "LoRA layers, no adapter",
        "segment kernel",
        "gather kernel",
    }
    assert "| block |" in (reports / "multi_lora.md").read_text()


def test_batching_report(reports: Path) -> None:
    payload = load(reports, "batching")
    rows = payload["rows"]
    for row in rows:
        assert BATCHING_FIELDS | SPLIT_FIELDS <= set(row)
    assert [(row["mode"], row["concurrency"]) for row in rows] == [
        ("sequential batch-1", 1),
        ("concurrent", 1),
        ("concurrent", 2),
    ]
    assert {"speedup", "speedup_at_least", "met"} <= set(payload["meta"]["target"])
    check = payload["meta"]["correctness"]["concurrent_vs_sequential"]
    assert check["identical"] == check["requests"] == 2
    assert "| mode |" in (reports / "batching.md").read_text()


def test_decode_report(reports: Path) -> None:
    payload = load(reports, "decode")
    rows = payload["rows"]
    assert [row["model"] for row in rows] == ["dense", "moe", "dense_equal_total_params"]
    for row in rows:
        assert DECODE_FIELDS <= set(row)
        assert row["identical_tokens"] is True
    moe, dense = rows[1], rows[2]
    assert moe["params_active_m"] < moe["params_total_m"]
    assert abs(dense["params_total_m"] - moe["params_total_m"]) / moe["params_total_m"] < 0.01
    target = payload["meta"]["target"]
    assert {"decode_speedup", "met", "moe_vs_dense_decode_ratio_engine"} <= set(target)
    assert "| model |" in (reports / "decode.md").read_text()


def test_throughput_report(reports: Path) -> None:
    payload = load(reports, "throughput")
    rows = {row["variant"]: row for row in payload["rows"]}
    assert set(rows) == {"static", "http", "compiled", "eager", "floor"}
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0
        if name != "floor":  # the floor times products and reads: no output
            assert row["identical_to_transformers"] == 4  # every side's greedy output equals the static batch's
    target = payload["meta"]["target"]
    assert {"http_vs_static_batch", "met_vs_static", "http_vs_inprocess", "met_http_vs_inprocess"} <= set(target)
    assert target["largest_ratio_at_floor"] > 0
