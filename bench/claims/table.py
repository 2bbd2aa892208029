"""The claims table: `claims.yaml` (every claim's text, as data) bound by claim id to the functions
that measure and judge it (`BY_CLAIM` and `HEADLINES` of the `measures_*` modules).

Loading checks the binding both ways, so a claim cannot silently lose its measurement: every id of
`BY_CLAIM` and `HEADLINES` names an entry of the YAML, a claim with no measure says why
(`not_measurable`), every verdict is one of `VERDICTS`, and each headline names an existing claim.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from bench.claims import measures_models, measures_nets, measures_training
from bench.claims.reports import Judge, Measure

VERDICTS = ("holds", "holds in part", "does not hold", "not measurable here")
NOT_MEASURABLE = "not measurable here"
TABLE_FILE = Path(__file__).with_name("claims.yaml")
MEASURES = (measures_training, measures_models, measures_nets)


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    claim: str  # as written in the sheet
    source: str  # primary source and what it actually reports
    verdict: str = NOT_MEASURABLE  # fixed verdict, or the fallback when `judge` is given
    reason: str = ""
    source_names: tuple[str, ...] = ()  # reports/<name>.json (or "zoo") the measurement reads
    measure: Measure | None = None
    judge: Judge | None = None
    command: str = ""
    not_measurable: str = ""  # why nothing here can measure it (required when measure is None)
    plots: tuple[str, ...] = ()  # PNGs under reports/ this row links


@dataclass(frozen=True)
class Headline:
    id: str
    technique: str
    sheet: str  # what the sheet says, in short
    source: str  # what the primary source says, in short
    verdict_from: str  # id of the claim whose verdict the row shows
    measure: Measure  # the short measurement


@dataclass(frozen=True)
class Table:
    report: dict[str, str]  # the fixed sentences of CLAIMS.md
    claims: list[Claim]
    headline: list[Headline]


_YAML_KEYS = {"reads": "source_names"}  # YAML name -> Claim field where they differ
_CLAIM_FIELDS = {f.name for f in fields(Claim)} - {"measure", "judge", "source_names"} | set(_YAML_KEYS)


def _claim(entry: dict[str, Any], bound: dict[str, tuple[Measure, Judge | None]]) -> Claim:
    unknown = set(entry) - _CLAIM_FIELDS
    if unknown:
        raise ValueError(f"claim {entry.get('id')!r}: unknown keys {sorted(unknown)} in {TABLE_FILE.name}")
    values = {_YAML_KEYS.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    measure, judge = bound.get(entry["id"], (None, None))
    claim = Claim(**values, measure=measure, judge=judge)
    if claim.verdict not in VERDICTS:
        raise ValueError(f"claim {claim.id!r}: verdict {claim.verdict!r} is not one of {VERDICTS}")
    if measure is None and not claim.not_measurable:
        raise ValueError(f"claim {claim.id!r}: no measure in BY_CLAIM and no not_measurable reason")
    return claim


def load_table(path: Path = TABLE_FILE) -> Table:
    """Read the YAML and bind each claim and headline row to its functions (see the module docstring)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    bound = {cid: pair for module in MEASURES for cid, pair in module.BY_CLAIM.items()}
    headlines = {hid: fn for module in MEASURES for hid, fn in module.HEADLINES.items()}
    claims = [_claim(entry, bound) for entry in data["claims"]]
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate claim ids in {path.name}")
    unbound = (set(bound) - set(ids)) | (set(headlines) - {h["id"] for h in data["headline"]})
    if unbound:
        raise ValueError(f"measured ids {sorted(unbound)} have no entry in {path.name}")
    rows = []
    for h in data["headline"]:
        if h["verdict_from"] not in ids:
            raise ValueError(f"headline {h['id']!r}: verdict_from {h['verdict_from']!r} is not a claim id")
        rows.append(Headline(**h, measure=headlines[h["id"]]))
    return Table(data["report"], claims, rows)
