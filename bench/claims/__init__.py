"""The claims report (issue 7): every claim of the technique sheet, what its primary source reports,
what modelserve measured, and a verdict; written to `reports/CLAIMS.md` and `reports/CLAIMS.json`.

The claims' text is data, `claims.yaml`: one entry per number or attribution of the sheet
(`/work/shared/seed/...`, quoted as written), with its primary source, the reports it reads and the
command that makes them, and a fixed verdict where no measurement decides it. Code only computes:
a measured claim's value comes from its `measure` function and, where a measurement decides the
verdict, its `judge` (with the rule in the reason), both found by claim id in `measures_*.py`
(`table.py` binds them). A claim nothing here can measure says why (`not_measurable`).
This module renders the table; inputs are the reports' JSON (`reports/<name>.json`, written by
`modelserve bench`) and the zoo summary (`artifacts/zoo.json`), read through `reports.Reports`.

Verdicts: "holds", "holds in part", "does not hold", "not measurable here".
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.claims.reports import ZOO_SNAPSHOT, Reports
from bench.claims.table import NOT_MEASURABLE, VERDICTS, Claim, Headline, Table, load_table
from bench.common import machine_info

__all__ = ["CLAIMS", "NOT_MEASURABLE", "VERDICTS", "Claim", "ClaimResult", "Reports", "evaluate_claims", "write_claims"]

TABLE: Table = load_table()
CLAIMS: list[Claim] = TABLE.claims
HEADLINE: list[Headline] = TABLE.headline
# What a measure or judge raises on a report that lacks the rows it reads (a --tiny run, an old report).
INVALID_DATA = (StopIteration, TypeError, ValueError, ZeroDivisionError)


@dataclass
class ClaimResult:
    section: str
    claim: str
    source: str
    measured: str
    command: str
    verdict: str
    reason: str
    plots: list[str]


def evaluate_claims(reports: Reports) -> list[ClaimResult]:
    """One result per claim, in table order: measured value, verdict and reason."""
    results = []
    for c in CLAIMS:
        verdict, reason = c.verdict, c.reason
        if c.measure is None:
            measured = f"{NOT_MEASURABLE}: {c.not_measurable}"
        else:
            try:
                measured = c.measure(reports)
                if c.judge is not None:
                    verdict, reason = c.judge(reports)
            except KeyError as missing:
                measured = f"missing report or field {missing}: run `{c.command}`"
                verdict, reason = NOT_MEASURABLE, f"the report (or its field {missing}) was not produced in this run"
            except INVALID_DATA as error:
                measured = f"invalid report data ({error!r}): rerun `{c.command}`"
                verdict, reason = NOT_MEASURABLE, "the report lacks the rows this claim reads (a --tiny run?)"
        if c.measure is None and c.verdict == NOT_MEASURABLE:
            reason = reason or c.not_measurable
        results.append(ClaimResult(c.section, c.claim, c.source, measured, c.command, verdict, reason, list(c.plots)))
    return results


def headline_rows(reports: Reports, results: list[ClaimResult]) -> list[dict[str, str]]:
    by_id = {claim.id: result for claim, result in zip(CLAIMS, results)}
    rows = []
    for h in HEADLINE:
        r = by_id[h.verdict_from]
        try:
            measured = h.measure(reports)
        except (KeyError, *INVALID_DATA):
            measured = r.measured
        rows.append(
            {"technique": h.technique, "sheet": h.sheet, "source": h.source, "measured": measured, "verdict": r.verdict}
        )
    return rows


def headline_markdown(rows: list[dict[str, str]]) -> list[str]:
    lines = [
        "| technique | the sheet says | the primary source says | measured here | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for h in rows:
        lines.append(
            f"| {h['technique']} | {_md(h['sheet'])} | {_md(h['source'])} | {_md(h['measured'])} | **{h['verdict']}** |"
        )
    return lines


def claims_markdown(results: list[ClaimResult]) -> list[str]:
    lines = [
        "| # | section | claim (as written) | primary source: what it reports | measured here | command | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(results, 1):
        plots = " ".join(f"[plot]({p})" for p in r.plots)
        command = f"`{r.command}`" if r.command else "—"
        lines.append(
            f"| {i} | {r.section} | {_md(r.claim)} | {_md(r.source)} | {_md(r.measured)} {plots} | {command} | "
            f"**{r.verdict}**: {_md(r.reason)} |"
        )
    return lines


def software_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "transformers", "peft", "scikit-learn", "numpy", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_claims(out_dir: str | Path = "reports", zoo_path: str | Path = "artifacts/zoo.json") -> dict[str, Path]:
    """Evaluate every claim from the JSON under out_dir and write CLAIMS.md and CLAIMS.json there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zoo, snapshot = Path(zoo_path), out / ZOO_SNAPSHOT
    if zoo.is_file() and zoo.resolve() != snapshot.resolve():
        snapshot.write_text(zoo.read_text())
    reports = Reports(out, Path(zoo_path))
    results = evaluate_claims(reports)
    machine = {**machine_info(), **software_versions()}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine["gpu"] = gpu
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    text = TABLE.report
    lines = [
        f"# {text['title']}",
        "",
        f"Generated {machine['date']} on {machine['platform']} ({machine['cpu_count']} CPUs, {gpu}); Python "
        f"{machine['python']}; " + ", ".join(f"{k} {v}" for k, v in software_versions().items()) + ".",
        "",
        text["rebuild"].format(out=out),
        "",
        f"{text['scale']} {text['setup']}",
        "",
        "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items()) + f" (of {len(results)} claims).",
        "",
        "## Headline",
        "",
    ]
    headline = headline_rows(reports, results)
    lines += headline_markdown(headline)
    lines += ["", "## Every claim", "", *claims_markdown(results)]
    lines += ["", "## Plots", ""]
    for png in sorted({p for r in results for p in r.plots}):
        lines += [f"### {png[:-4]}", "", f"![{png[:-4]}]({png})", ""]
    paths = {"md": out / "CLAIMS.md", "json": out / "CLAIMS.json"}
    paths["md"].write_text("\n".join(lines) + "\n")
    payload = {
        "machine": machine,
        "verdict_counts": counts,
        "headline": headline,
        "claims": [r.__dict__ for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return paths
