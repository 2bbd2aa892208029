"""Bad adapter directories against `read_adapter` and the registry (a table), and the registry's concurrency.

Every broken directory raises `AdapterError` naming the file and the reason; no parser exception
(SafetensorError, UnicodeDecodeError, JSON, TypeError, OverflowError, torch) escapes as another type.
The case builders mutate a valid PEFT directory in place, so tests/api reuses them on copies of the
HTTP zoo's adapters.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, AdapterError, read_adapter, write_adapter
from adapters.registry import (
    AdapterCapacityError,
    AdapterInUseError,
    AdapterPathError,
    AdapterRegistry,
    RegistryConfig,
    resolve_under_roots,
)
from tests.service.engine_fixtures import tiny_model

# ---- case builders: each breaks a valid adapter directory in place ----


def config_text(text: str | bytes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (directory / CONFIG_FILE).write_bytes(data)

    return apply


def config_fields(**changes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        raw = json.loads((directory / CONFIG_FILE).read_text())
        raw.update(changes)
        (directory / CONFIG_FILE).write_text(json.dumps(raw))  # allow_nan: NaN / Infinity literals

    return apply


def weights_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / WEIGHTS_FILE
        path.write_bytes(change(path.read_bytes()))

    return apply


def first_module(change: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    """Replace the first module's (lora_A, lora_B) by change(A, B)."""

    def apply(directory: Path) -> None:
        path = directory / WEIGHTS_FILE
        tensors = load_file(str(path))
        name_a = sorted(k for k in tensors if "lora_A" in k)[0]
        name_b = name_a.replace("lora_A", "lora_B")
        tensors[name_a], tensors[name_b] = change(tensors[name_a], tensors[name_b])
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})

    return apply


def all_tensors(change: Callable[[torch.Tensor], torch.Tensor]):
    def apply(directory: Path) -> None:
        path = directory / WEIGHTS_FILE
        tensors = {k: change(v).contiguous() for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})

    return apply


def with_value(value: float, where: str = "B"):
    def change(a, b):
        t = (b if where == "B" else a).clone()
        t.view(-1)[0] = value
        return (a, t) if where == "B" else (t, b)

    return first_module(change)


# (id, breaker, file named in the message, reason words in the message, only the registry sees it)
CASES: list[tuple[str, Callable[[Path], None], str, tuple[str, ...], bool]] = [
    ("weights_empty", weights_bytes(lambda b: b""), WEIGHTS_FILE, ("not a readable safetensors",), False),
    ("weights_truncated", weights_bytes(lambda b: b[: len(b) // 2]), WEIGHTS_FILE, ("safetensors",), False),
    ("weights_data_cut", weights_bytes(lambda b: b[:-16]), WEIGHTS_FILE, ("safetensors",), False),
    ("weights_header_only", weights_bytes(lambda b: b[:8] + b"{" * 8), WEIGHTS_FILE, ("safetensors",), False),
    (
        "weights_random",
        weights_bytes(lambda b: random.Random(0).randbytes(4096)),
        WEIGHTS_FILE,
        ("safetensors",),
        False,
    ),
    ("config_list", config_text("[1, 2]"), CONFIG_FILE, ("JSON object", "list"), False),
    ("config_string", config_text('"r=4"'), CONFIG_FILE, ("JSON object", "str"), False),
    ("config_null", config_text("null"), CONFIG_FILE, ("JSON object", "NoneType"), False),
    ("config_empty", config_text(""), CONFIG_FILE, ("not valid JSON",), False),
    ("config_bad_json", config_text("{r: 4"), CONFIG_FILE, ("not valid JSON",), False),
    ("config_latin1", config_text('{"r": 4, "note": "caf\xe9"}'.encode("latin-1")), CONFIG_FILE, ("UTF-8",), False),
    ("config_random", config_text(random.Random(1).randbytes(256)), CONFIG_FILE, ("UTF-8",), False),
    ("config_deep", config_text("[" * 200_000 + "]" * 200_000), CONFIG_FILE, ("JSON",), False),
    ("config_huge", config_text(json.dumps({"pad": "x" * 2_000_000})), CONFIG_FILE, ("MAX_CONFIG_BYTES",), False),
    ("r_string", config_fields(r="4"), CONFIG_FILE, ("r must be an integer", "str"), False),
    ("r_bool", config_fields(r=True), CONFIG_FILE, ("r must be an integer", "bool"), False),
    ("r_float", config_fields(r=4.0), CONFIG_FILE, ("r must be an integer", "float"), False),
    ("r_null", config_fields(r=None), CONFIG_FILE, ("r must be an integer", "NoneType"), False),
    ("r_list", config_fields(r=[4]), CONFIG_FILE, ("r must be an integer", "list"), False),
    ("r_zero", config_fields(r=0), CONFIG_FILE, ("rank r must be 1 to",), False),
    ("r_negative", config_fields(r=-4), CONFIG_FILE, ("rank r must be 1 to",), False),
    ("r_huge", config_fields(r=10**400), CONFIG_FILE, ("rank r must be 1 to",), False),
    ("alpha_string", config_fields(lora_alpha="8"), CONFIG_FILE, ("lora_alpha must be a number",), False),
    ("alpha_bool", config_fields(lora_alpha=False), CONFIG_FILE, ("lora_alpha must be a number",), False),
    ("alpha_null", config_fields(lora_alpha=None), CONFIG_FILE, ("lora_alpha must be a number",), False),
    ("alpha_list", config_fields(lora_alpha=[8]), CONFIG_FILE, ("lora_alpha must be a number",), False),
    ("alpha_nan", config_fields(lora_alpha=float("nan")), CONFIG_FILE, ("lora_alpha must be a finite",), False),
    ("alpha_inf", config_fields(lora_alpha=float("inf")), CONFIG_FILE, ("lora_alpha must be a finite",), False),
    ("alpha_huge_int", config_fields(lora_alpha=10**400), CONFIG_FILE, ("lora_alpha must be a finite",), False),
    ("targets_mixed", config_fields(target_modules=["q_proj", 3]), CONFIG_FILE, ("target_modules must be",), False),
    ("targets_null", config_fields(target_modules=None), CONFIG_FILE, ("needs r, lora_alpha and target",), False),
    ("rank_pattern_str", config_fields(rank_pattern={"q_proj": "2"}), CONFIG_FILE, ("rank_pattern",), False),
    ("alpha_pattern_null", config_fields(alpha_pattern={"q_proj": None}), CONFIG_FILE, ("alpha_pattern",), False),
    ("base_not_str", config_fields(base_model_name_or_path=5), CONFIG_FILE, ("base_model_name_or_path",), False),
    ("dora_string", config_fields(use_dora="no"), CONFIG_FILE, ("use_dora must be true or false",), False),
    ("zero_rank_tensors", first_module(lambda a, b: (a[:0], b[:, :0])), WEIGHTS_FILE, ("empty", "rank >= 1"), False),
    ("zero_in_features", first_module(lambda a, b: (a[:, :0], b)), WEIGHTS_FILE, ("empty",), False),
    ("vector_tensor", first_module(lambda a, b: (a[0], b)), WEIGHTS_FILE, ("shape",), False),
    ("nan_weight", with_value(float("nan"), "A"), WEIGHTS_FILE, ("non-finite", "1 NaN"), False),
    ("inf_weight", with_value(float("inf")), WEIGHTS_FILE, ("non-finite", "1 inf"), False),
    ("neg_inf_weight", with_value(float("-inf")), WEIGHTS_FILE, ("non-finite", "1 inf"), False),
    ("huge_weight", with_value(1e30), WEIGHTS_FILE, ("beyond the bound", "MAX_ABS_WEIGHT"), False),
    ("over_bound_weight", with_value(-2e4, "A"), WEIGHTS_FILE, ("beyond the bound",), False),
    ("int_dtype", all_tensors(lambda t: (t * 100).to(torch.int32)), WEIGHTS_FILE, ("dtype torch.int32",), False),
    ("bool_dtype", all_tensors(lambda t: t > 0), WEIGHTS_FILE, ("dtype torch.bool",), False),
    ("f16_overflow", all_tensors(lambda t: (t * 1e7).half()), WEIGHTS_FILE, ("non-finite",), False),
    # Finite files whose B scaled by lora_alpha / r leaves the bound: only the registry computes it.
    ("scaled_beyond_bound", config_fields(lora_alpha=1e8), "", ("lora_alpha / r", "beyond the bound"), True),
]


# ---- fixtures ----


@pytest.fixture(scope="module")
def registry() -> AdapterRegistry:
    return AdapterRegistry("tiny", tiny_model(300, seed=0), RegistryConfig(max_adapters=3, max_lora_rank=16))


def write_valid(directory: Path, registry: AdapterRegistry, rank: int = 4, seed: int = 0) -> Path:
    """A valid adapter on q_proj and v_proj of every layer of the registry's model."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, layer in registry.layers.items():
        if path.endswith(("q_proj", "v_proj")):
            tensors[f"{path}.lora_A"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
            tensors[f"{path}.lora_B"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
    config = AdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    return write_adapter(directory, config, tensors)


# ---- the table ----


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_an_adapter_error_naming_file_and_reason(case, registry, tmp_path):
    name, breaker, file, reasons, registry_only = case
    directory = write_valid(tmp_path / name, registry)
    breaker(directory)
    if not registry_only:
        with pytest.raises(AdapterError) as caught:
            read_adapter(directory)
        message = str(caught.value)
        assert str(directory / file) in message, message
        assert all(reason in message for reason in reasons), message
    errors_before = registry.stats.loads["error"]
    with pytest.raises(AdapterError) as caught:
        registry.load(name, directory)
    message = str(caught.value)
    assert str(directory) in message and all(reason in message for reason in reasons), message
    assert name not in registry.resident and registry.stats.loads["error"] == errors_before + 1


def test_valid_adapters_still_load_in_every_float_dtype(registry, tmp_path):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        directory = write_valid(tmp_path / str(dtype), registry)
        all_tensors(lambda t, dtype=dtype: t.to(dtype))(directory)
        config, tensors = read_adapter(directory)
        assert config.r == 4 and len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
        assert registry.load("ok", directory).rank == 4
    registry.unload("ok")


def test_missing_files_name_the_file(registry, tmp_path):
    directory = write_valid(tmp_path / "a", registry)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE} not found"):
        read_adapter(directory)
    (directory / CONFIG_FILE).unlink()
    (directory / CONFIG_FILE).mkdir()  # a directory where the config should be
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE} not found"):
        read_adapter(directory)


# ---- paths ----


def test_resolve_under_roots_refuses_invalid_paths(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_under_roots(str(root / "ok"), [root]) == (root / "ok").resolve()
    bad = {
        "nul": (str(root / "ok") + "\0x", "NUL byte"),
        "too long": ("/" + "a/" * 3000, "characters"),
        "long component": (str(root / ("x" * 300)), "does not exist"),
        "not a str": (b"/tmp", "must be a string"),
        "unknown user": ("~no-such-user-xyz/ok", "does not exist"),
        "root itself": (str(root), "not a directory inside"),
        "outside": (str(outside), "not a directory inside"),
    }
    for case, (raw, reason) in bad.items():
        with pytest.raises(AdapterPathError, match=reason):
            resolve_under_roots(raw, [root])
        assert case


def test_a_directory_swapped_for_a_link_out_of_the_roots_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "adapter").mkdir(parents=True)
    outside.mkdir()
    checked = resolve_under_roots(str(root / "adapter"), [root])
    (root / "adapter").rmdir()
    (root / "adapter").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="not a directory inside the adapter roots"):
        resolve_under_roots(str(checked), [root])


# ---- concurrency ----


def test_in_use_adapter_is_never_replaced_unloaded_or_evicted(registry, tmp_path):
    first = write_valid(tmp_path / "first", registry, seed=1)
    second = write_valid(tmp_path / "second", registry, seed=2)
    registry.load("busy", first)
    assert registry.acquire("busy")
    slot = registry.resident["busy"].slot
    with pytest.raises(AdapterInUseError, match="not replaced"):
        registry.load("busy", second)
    with pytest.raises(AdapterInUseError):
        registry.unload("busy")
    assert registry.resident["busy"].in_use == 1 and registry.resident["busy"].slot == slot
    assert registry.resident["busy"].path == str(first)
    registry.release("busy")
    assert registry.load("busy", second).path == str(second)  # idle: replaced
    registry.unload("busy")


def test_capacity_error_when_every_resident_adapter_is_busy(tmp_path):
    small = AdapterRegistry("tiny", tiny_model(300, seed=0), RegistryConfig(max_adapters=1))
    directory = write_valid(tmp_path / "a", small)
    small.load("a", directory)
    assert small.acquire("a")
    with pytest.raises(AdapterCapacityError, match="pinned or in use"):
        small.load("b", directory)
    small.release("a")
    small.load("b", directory)  # evicts the now idle "a"
    assert list(small.resident) == ["b"] and small.stats.evictions == 1


def test_concurrent_reloads_load_once_and_counts_balance(tmp_path):
    """Threads reload (ensure), acquire and release three adapters over two slots: no count is lost."""
    small = AdapterRegistry("tiny", tiny_model(300, seed=0), RegistryConfig(max_adapters=2))
    dirs = {name: write_valid(tmp_path / name, small, seed=i) for i, name in enumerate("xyz")}
    barrier = threading.Barrier(6)
    loaded_before = small.stats.loads["loaded"]
    infos = []

    def reload_x() -> None:
        barrier.wait()
        infos.append(small.ensure("x", dirs["x"]))

    threads = [threading.Thread(target=reload_x) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert small.stats.loads["loaded"] == loaded_before + 1 and len({id(i) for i in infos}) == 1
    assert not small._reloads

    failures: list[BaseException] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(30):
                name = rng.choice("xyz")
                try:
                    small.ensure(name, dirs[name])
                except AdapterCapacityError:
                    continue
                if small.acquire(name):
                    assert small.resident[name].in_use >= 1
                    small.release(name)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert all(info.in_use == 0 for info in small.resident.values())
    assert len(small.resident) <= 2 and not small._reloads
