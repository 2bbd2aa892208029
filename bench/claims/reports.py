"""What the claims' measure and judge functions read, and how they format numbers.

`Reports` gives lazy access to `reports/<name>.json` (written by `modelserve bench`) and the zoo
summary (`artifacts/zoo.json`, else the snapshot `zoo.json` in the reports folder); a missing file
raises KeyError, which the renderer turns into "missing report" for the claims that read it.
A measure function returns the measured value as text; a judge returns (verdict, reason).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

ZOO_SNAPSHOT = "zoo.json"  # artifacts/zoo.json copied next to the reports, so CI can rebuild without artifacts/


class Reports:
    """Lazy access to reports/<name>.json and the zoo summary (artifacts/zoo.json, else the snapshot in
    the reports folder); a missing file raises KeyError."""

    def __init__(self, reports_dir: Path, zoo_path: Path) -> None:
        self.dir, self.zoo_path, self._cache = reports_dir, zoo_path, {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._cache:
            path = self.dir / f"{name}.json"
            if name == "zoo" and self.zoo_path.is_file():
                path = self.zoo_path
            if not path.is_file():
                raise KeyError(name)
            self._cache[name] = json.loads(path.read_text())
        return self._cache[name]

    def summary(self, name: str) -> dict[str, Any]:
        return self[name]["meta"]["summary"]

    def row(self, name: str, **match: Any) -> dict[str, Any]:
        return next(r for r in self[name]["rows"] if all(r.get(k) == v for k, v in match.items()))


Measure = Callable[[Reports], str]
Judge = Callable[[Reports], tuple[str, str]]
# What a measures module gives the table: claim id -> (measure, judge or None); headline id -> measure.
Measured = dict[str, tuple[Measure, Judge | None]]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def f3(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
