"""Adapter admin over HTTP, at the edges: every bad adapter or path is a 400 naming the file and the
reason, concurrent loads of one name give one 200 and one 409, reloads of evicted adapters answer the
documented codes (409 no room, 503 bad files or a path now outside the roots), and the server still
generates afterwards."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from tests.adapters.test_bad_adapters import CASES
from tests.api.conftest import start_server

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def completion(model: str) -> dict:
    return {"model": model, "prompt": "hello world", "max_tokens": 2, "temperature": 0}


@pytest.fixture
def scratch(zoo):
    """Make adapter dirs under the adapter root (copies of a zoo adapter); all removed afterwards."""
    made: list[Path] = []

    def make(name: str, source: str = "a2") -> Path:
        directory = zoo["a1"].parent / name
        shutil.copytree(zoo[source], directory)
        made.append(directory)
        return directory

    yield make
    for directory in made:
        if directory.is_symlink():
            directory.unlink()
        else:
            shutil.rmtree(directory, ignore_errors=True)


def assert_no_server_error(server) -> None:
    log = server.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_a_400_naming_file_and_reason(server, scratch, case):
    name, breaker, file, reasons, _ = case
    directory = scratch(unique(name.replace("_", "-")))
    breaker(directory)
    with server.client() as client:
        response = client.post(LOAD, json={"lora_name": directory.name, "lora_path": str(directory)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "lora_path"
    assert (f"{directory.name}/{file}" if file else str(directory)) in error["message"], error["message"]
    assert all(reason in error["message"] for reason in reasons), error["message"]


def test_invalid_paths_are_400(server, zoo):
    root = zoo["a1"].parent
    cases = {
        "nul byte": (str(root / "a2") + "\u0000", "NUL byte"),
        "nul only": ("\u0000", "NUL byte"),
        "too long": ("/" + "a/" * 3000, "characters"),
        "long component": (str(root / ("x" * 300)), "does not exist"),
        "lone surrogate": (str(root) + "/\ud800", "lora_path"),  # refused by the schema already
        "unknown user": ("~no-such-user-xyz/a2", "does not exist"),
        "number": (5, "lora_path"),
        "list": ([str(root / "a2")], "lora_path"),
        "null": (None, "lora_path"),
        "empty": ("", "lora_path"),
    }
    with server.client() as client:
        for case, (path, reason) in cases.items():
            body = json.dumps({"lora_name": "edge", "lora_path": path})  # json.dumps keeps the lone surrogate
            response = client.post(LOAD, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (case, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "lora_path", (case, error)
            assert reason in error["message"], (case, error)
    assert_no_server_error(server)


def test_two_concurrent_loads_of_one_name_one_200_one_409(server, zoo):
    for _ in range(3):
        name = unique("twin")
        barrier = threading.Barrier(2)
        responses: list[httpx.Response] = []

        def load(name=name, barrier=barrier, responses=responses) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                barrier.wait()
                responses.append(client.post(LOAD, json={"lora_name": name, "lora_path": str(zoo["a3"])}))

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
        conflict = next(r for r in responses if r.status_code == 409).json()["error"]
        assert conflict["type"] == "conflict_error" and conflict["param"] == "lora_name"
        assert name in conflict["message"]
        with server.client() as client:
            assert client.post("/v1/completions", json=completion(name)).status_code == 200
            assert client.post(UNLOAD, json={"lora_name": name}).status_code == 200


def test_server_still_generates_after_the_bad_adapters(server):
    with server.client() as client:
        assert client.get("/ready").status_code == 200
        for model in ("a1", "tiny"):
            response = client.post("/v1/completions", json=completion(model))
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert not any(m.startswith(("weights-", "config-", "r-", "alpha-", "twin-")) for m in listed), listed
    assert_no_server_error(server)


def test_reload_of_an_evicted_adapter_answers_the_documented_codes(zoo, scratch, tmp_path):
    """max_adapters=2 with the pinned start-up a1: each admin load evicts the previous admin adapter."""
    server = start_server(zoo, tmp_path, adapters=("a1",), max_adapters=2)
    try:
        x_dir, y_dir = scratch(unique("x")), scratch(unique("y"))
        with server.client() as client:

            def load(name: str, path: Path, pinned: bool = False) -> None:
                body = {"lora_name": name, "lora_path": str(path), "pinned": pinned}
                assert client.post(LOAD, json=body).status_code == 200

            def generate(model: str) -> httpx.Response:
                return client.post("/v1/completions", json=completion(model))

            load("x", x_dir)
            load("p", zoo["a3"], pinned=True)  # evicts x; now a1 and p are pinned: no room for x
            response = generate("x")
            assert response.status_code == 409, response.text
            assert response.json()["error"]["type"] == "conflict_error"
            assert "could not be reloaded" in response.json()["error"]["message"]

            assert client.post(UNLOAD, json={"lora_name": "p"}).status_code == 200
            assert generate("x").status_code == 200  # reloaded

            load("y", y_dir)  # evicts x; then x's weights go bad on disk
            (x_dir / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
            response = generate("x")
            assert response.status_code == 503 and "Retry-After" in response.headers, response.text
            message = response.json()["error"]["message"]
            assert f"{x_dir.name}/adapter_model.safetensors" in message and "safetensors" in message, message

            shutil.copy(zoo["a2"] / "adapter_model.safetensors", x_dir)  # fixed: x reloads, evicting y
            assert generate("x").status_code == 200
            outside = tmp_path / "outside"
            shutil.copytree(y_dir, outside)
            shutil.rmtree(y_dir)
            y_dir.symlink_to(outside, target_is_directory=True)  # swapped for a link out of the roots
            response = generate("y")
            assert response.status_code == 503 and "Retry-After" in response.headers, response.text
            assert "not a directory inside the adapter roots" in response.json()["error"]["message"]

            assert client.get("/ready").status_code == 200
            assert generate("a1").status_code == 200 and generate("x").status_code == 200
            assert client.post(UNLOAD, json={"lora_name": "y"}).status_code == 200
        assert_no_server_error(server)
    finally:
        server.stop()
