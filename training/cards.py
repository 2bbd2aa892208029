"""Model cards: README.md (for people) and card.json (for tools) in every artifact directory.

A card records what the build measured: architecture, parameter count, bytes on disk, training
tokens and time, the validation metric (bits per byte, or exact-match accuracy for task adapters)
and the command that made it. card.json is written last, so its presence marks a finished artifact
(the build skips directories that have one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "card.json"


def dir_bytes(directory: str | Path) -> int:
    """Bytes on disk of the files in a directory (not recursive: adapters live elsewhere)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.name != CARD_FILE)


def read_card(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return "`" + json.dumps(value) + "`"
    return str(value)


def write_card(directory: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write README.md and card.json; adds bytes_on_disk. Returns the card."""
    directory = Path(directory)
    card = {**card, "bytes_on_disk": dir_bytes(directory)}
    lines = [f"# {card['name']}", "", card.get("summary", ""), "", "| field | value |", "| --- | --- |"]
    for key, value in card.items():
        if key in ("name", "summary", "command", "notes"):
            continue
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "Made by:", "", "```", card.get("command", ""), "```", ""]
    if card.get("notes"):
        lines += [card["notes"], ""]
    (directory / "README.md").write_text("\n".join(lines))
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card
