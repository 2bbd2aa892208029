"""API keys on every /v1 route, admin-only adapter routes, and adapter admin: roots, traversal, symlinks, pickle."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from tests.api.conftest import ADMIN_KEY, USER_KEY

V1_ROUTES = [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": USER_KEY}])
def test_no_v1_route_answers_without_a_valid_key(auth_server, headers):
    with auth_server.client(headers=headers) as client:
        for method, path, body in V1_ROUTES:
            response = client.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_user_key_serves_but_cannot_administer(auth_server, zoo):
    with auth_server.client(headers=bearer(USER_KEY)) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/completions", json=V1_ROUTES[0][2]).status_code == 200
        load = {"lora_name": "a2", "lora_path": str(zoo["a2"])}
        assert client.post("/v1/load_lora_adapter", json=load).status_code == 401
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 401
    user = openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        user.models.list()


def test_admin_loads_and_unloads_without_restart(auth_server, zoo):
    client = openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key=USER_KEY, max_retries=0)
    with auth_server.client(headers=bearer(ADMIN_KEY)) as admin:
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(zoo["a3"])})
        assert response.status_code == 200, response.text
        assert response.json()["parent"] == "tiny" and response.json()["lora_rank"] == 2
        again = admin.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(zoo["a3"])})
        assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"  # name taken
        assert client.completions.create(model="a3", prompt="hello", max_tokens=3).usage.completion_tokens >= 1
        assert "a3" in {m.id for m in client.models.list().data}
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}).json()["status"] == "unloaded"
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a3", prompt="hello", max_tokens=3)


def test_adapter_paths_only_under_the_roots(auth_server, zoo, tmp_path):
    root = zoo["a1"].parent
    outside = tmp_path / "outside"
    shutil.copytree(zoo["a2"], outside)
    link = root / "escape-link"
    link.unlink(missing_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(zoo["a2"] / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    cases = {
        "outside": str(outside),
        "traversal": f"{root}/../{outside.parent.name}/outside",
        "dotdot": f"{root}/a1/../../outside",
        "symlink": str(link),
        "missing": f"{root}/does-not-exist",
        "pickle": str(pickled),
        "root itself": str(root),
    }
    try:
        with auth_server.client(headers=bearer(ADMIN_KEY)) as admin:
            for case, path in cases.items():
                response = admin.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
                assert response.status_code == 400, (case, response.text)
                assert response.json()["error"]["param"] == "lora_path"
            pickle_error = admin.post("/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": str(pickled)})
            assert "safetensors" in pickle_error.json()["error"]["message"]
            bad_name = admin.post("/v1/load_lora_adapter", json={"lora_name": "../x", "lora_path": str(zoo["a2"])})
            assert bad_name.status_code == 400
    finally:
        link.unlink(missing_ok=True)
        shutil.rmtree(pickled, ignore_errors=True)


def test_protected_ops_endpoints_when_configured(zoo, tmp_path):
    from tests.api.conftest import start_server

    server = start_server(zoo, tmp_path, adapters=(), api_keys=[USER_KEY], protect_ops_endpoints=True)
    try:
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(server.url + path).status_code == 401
            assert httpx.get(server.url + path, headers=bearer(USER_KEY)).status_code == 200
    finally:
        server.stop()
