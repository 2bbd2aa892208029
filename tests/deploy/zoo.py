"""A tiny zoo under the demo zoo's names (teacher, student, moe) with PEFT adapters, for the deploy checks."""

from __future__ import annotations

from pathlib import Path

from models import save_model
from tests.adapters.test_multi_lora import make_peft_adapter
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer

MODELS = {"teacher": (2, False), "student": (1, False), "moe": (3, True)}  # name -> (seed, moe)
ADAPTERS = {"student-a": ("student", 4, 1), "student-b": ("student", 8, 2), "teacher-a": ("teacher", 4, 3)}


def build_zoo(root: Path) -> dict[str, Path]:
    """{name: dir} of the models and adapters (adapters under root/adapters/), built with random weights."""
    tokenizer = tiny_tokenizer()
    paths: dict[str, Path] = {}
    for name, (seed, moe) in MODELS.items():
        paths[name] = root / name
        save_model(tiny_model(tokenizer.vocab_size, seed=seed, moe=moe), paths[name])
        tokenizer.save(paths[name])
    for name, (base, rank, seed) in ADAPTERS.items():
        paths[name] = root / "adapters" / name
        make_peft_adapter(paths[base], paths[name], rank, seed, targets=["q_proj", "v_proj", "o_proj"])
    return paths
