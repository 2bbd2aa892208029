"""Serving quantized models: `--quantization int8`, the per-model setting, int8 checkpoints, /v1/models fields."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from models import save_model
from models.quantization import quantize_model
from modelserve.cli import build_parser
from service.api.app import create_app
from service.api.server import settings_from_args
from service.loading import quantization_for
from service.settings import Settings
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer


def write_model(directory, quantized: bool = False) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size, seed=1)
    if quantized:
        quantize_model(model)
    save_model(model, directory)
    tokenizer.save(directory)


def test_flag_and_setting_choose_the_quantization(tmp_path):
    args = build_parser().parse_args(["serve", "--model", f"a={tmp_path}", "--quantization", "int8"])
    settings = settings_from_args(args)
    assert settings.quantization == {"*": "int8"}
    assert quantization_for("a", settings) == "int8"
    per_model = Settings(quantization={"a": "int8", "*": "none"})
    assert quantization_for("a", per_model) == "int8" and quantization_for("b", per_model) is None
    assert quantization_for("a", Settings()) is None


def test_models_list_dtype_and_quantization(tmp_path):
    write_model(tmp_path / "plain")
    write_model(tmp_path / "saved-int8", quantized=True)
    settings = Settings(
        models={"plain": tmp_path / "plain", "at-load": tmp_path / "plain", "saved-int8": tmp_path / "saved-int8"},
        quantization={"at-load": "int8"},
        device="cpu",
        torch_threads=1,
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "models did not load"
            time.sleep(0.1)
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        answer = client.post("/v1/completions", json={"model": "at-load", "prompt": "hello", "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    assert cards["plain"]["quantization"] is None and cards["plain"]["dtype"] == "float32"
    for name in ("at-load", "saved-int8"):
        assert cards[name]["quantization"] == "int8" and cards[name]["dtype"] == "float32"
        assert cards[name]["parameters"] == cards["plain"]["parameters"]
        assert cards["plain"]["size_bytes"] / cards[name]["size_bytes"] > 3.0
