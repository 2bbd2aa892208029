"""The claims report: every claim row is measured or says why it cannot be; every linked plot exists;
each training experiment runs at tiny size and writes a complete report (no result is asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.claims import CLAIMS, NOT_MEASURABLE, VERDICTS, Reports, evaluate_claims, write_claims
from bench.run import BENCHMARKS, run_benchmarks

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
ZOO = ROOT / "artifacts" / "zoo.json"
EXPERIMENTS = sorted(name for name in BENCHMARKS if name.startswith("exp_"))
PLOT_LINK = re.compile(r"\]\(([^)\s]+\.png)\)")


def test_claim_table_is_well_formed() -> None:
    assert len(CLAIMS) >= 40
    for claim in CLAIMS:
        assert claim.claim and claim.source and claim.section
        assert claim.verdict in VERDICTS
        if claim.measure is None:
            assert claim.not_measurable, f"{claim.claim!r}: no measurement and no reason"
        else:
            assert claim.command.startswith("modelserve "), f"{claim.claim!r}: no command to reproduce it"
            assert claim.source_names, f"{claim.claim!r}: does not say which report it reads"


def test_every_committed_claim_is_measured_or_explained() -> None:
    results = evaluate_claims(Reports(REPORTS, ZOO))
    assert len(results) == len(CLAIMS)
    for r in results:
        assert r.verdict in VERDICTS
        assert r.reason, f"{r.claim!r}: verdict without a reason"
        assert not r.measured.startswith(("missing report", "invalid report")), f"{r.claim!r}: {r.measured}"
        if r.measured.startswith(NOT_MEASURABLE):
            assert len(r.measured) > len(NOT_MEASURABLE) + 10, f"{r.claim!r}: not measurable without a reason"
        else:
            assert re.search(r"\d", r.measured), f"{r.claim!r}: measured value has no number: {r.measured}"


def test_committed_report_links_only_existing_plots() -> None:
    text = (REPORTS / "CLAIMS.md").read_text()
    links = PLOT_LINK.findall(text)
    assert links, "CLAIMS.md links no plots"
    for link in links:
        assert (REPORTS / link).is_file(), f"CLAIMS.md links {link}, which does not exist"
    payload = json.loads((REPORTS / "CLAIMS.json").read_text())
    assert len(payload["claims"]) == len(CLAIMS)
    assert {"platform", "torch", "date", "transformers"} <= set(payload["machine"])


@pytest.fixture(scope="module")
def tiny_reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("claims")
    assert run_benchmarks(EXPERIMENTS, tiny=True, out_dir=out, report=True, zoo_path=out / "no-zoo.json") == 0
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_tiny(tiny_reports: Path, name: str) -> None:
    for kind in ("json", "md", "png"):
        assert (tiny_reports / f"{name}.{kind}").stat().st_size > 0, f"{name}.{kind} missing or empty"
    payload = json.loads((tiny_reports / f"{name}.json").read_text())
    assert payload["rows"] and payload["meta"]["tiny"] is True and payload["meta"]["summary"]


def test_tiny_claims_report(tiny_reports: Path) -> None:
    """With only the experiments present, their rows are measured and the serving rows say what is missing."""
    text = (tiny_reports / "CLAIMS.md").read_text()
    for link in PLOT_LINK.findall(text):
        if link.startswith("exp_"):
            assert (tiny_reports / link).is_file()
    results = json.loads((tiny_reports / "CLAIMS.json").read_text())["claims"]
    by_source = {c.claim: c.source_names for c in CLAIMS}
    for r in results:
        names = by_source[r["claim"]]
        if names and all(n.startswith("exp_") for n in names):
            assert not r["measured"].startswith(("missing", "invalid")), r
    assert write_claims(tiny_reports, tiny_reports / "no-zoo.json")["md"].is_file()
