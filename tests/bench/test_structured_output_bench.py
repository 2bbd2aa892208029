"""The structured-output benchmark at tiny size: a complete report, the chosen library measured in the engine."""

from __future__ import annotations

import json
from pathlib import Path

from bench.run import BENCHMARKS
from bench.structured_output import run


def test_structured_output_report(tmp_path: Path) -> None:
    assert BENCHMARKS["structured_output"] == "bench.structured_output"
    paths = run(tiny=True, out_dir=tmp_path)
    for kind in ("json", "md", "png"):
        assert paths[kind].stat().st_size > 0
    payload = json.loads(paths["json"].read_text())
    libraries = [r for r in payload["rows"] if r["kind"] == "library"]
    engine = [r for r in payload["rows"] if r["kind"] == "engine"]
    chosen = [r for r in libraries if r["library"] == payload["meta"]["chosen"]]
    assert len(chosen) == 2 and all(r["doc_accepted"] and r["refuses_control_char"] for r in chosen)
    assert all(r["refuses_surrogate"] and r["mask_us"] > 0 and r["compile_ms"] > 0 for r in chosen)
    assert len(engine) == 2 and all(r["overhead_ratio"] > 0 for r in engine)
