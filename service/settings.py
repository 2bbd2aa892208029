"""The one settings object of the service (pydantic-settings; environment prefix ``MODELSERVE_``).

Sources, highest priority first: command-line flags (`modelserve serve --host ...`), the `--config`
file (JSON: keys are the field names; or a ``.env`` file of ``MODELSERVE_*`` lines), environment
variables ``MODELSERVE_<FIELD>`` (lists and dicts as JSON, e.g.
``MODELSERVE_API_KEYS='["k1","k2"]'``), then the defaults below. No other module reads the
environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_", extra="forbid", validate_default=True)

    # ---- what to serve ----
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda (bfloat16) when available, else cpu (float32)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: bfloat16 on cuda, float32 on cpu
    # With no `models`, every artifacts_dir/<name>/ holding config.json is served, and every
    # artifacts_dir/adapters/<name>/ is loaded as an adapter of its base.
    artifacts_dir: Path = Path("artifacts")
    models: dict[str, Path] = Field(default_factory=dict)  # name -> Hugging Face model dir
    adapters: dict[str, Path] = Field(default_factory=dict)  # name -> PEFT adapter dir, loaded at start (pinned)
    # Weight quantization per served model: name -> "int8" (models/quantization.py), or "*" -> "int8" for
    # every model (`--quantization int8`). A checkpoint saved quantized loads quantized without an entry.
    quantization: dict[str, Literal["int8", "none"]] = Field(default_factory=dict)
    # Admin loads (`POST /v1/load_lora_adapter`) accept only directories under these roots (after
    # resolving symlinks). Empty: artifacts_dir/adapters.
    adapter_roots: list[Path] = Field(default_factory=list)
    # Cap on prompt + output tokens per sequence; the model's max_position_embeddings is the other cap.
    # It sizes the KV cache (max_batch_size x max_model_len tokens per model).
    max_model_len: int = Field(2048, ge=8)
    # Speculative decoding: target model -> draft model (both served, same tokenizer), or "ngram" (prompt
    # lookup). Serving the demo zoo with no drafts configured, its DistillSpec draft drafts for the teacher.
    drafts: dict[str, str] = Field(default_factory=dict)
    # k: tokens proposed per verification (3: the demo draft's best in `bench speculative`; n-gram likes 4-8)
    num_draft_tokens: int = Field(3, ge=1, le=16)
    # A Jinja chat template for every served model instead of its tokenizer's (vLLM's --chat-template): the
    # template itself, or the path of a file holding it.
    chat_template: str | None = None

    # ---- engine and backpressure ----
    max_batch_size: int = Field(32, ge=1)  # sequences decoding at once per model (KV cache slots)
    max_tokens_per_step: int = Field(512, ge=16)  # tokens per engine step: bounds one step's latency
    # Paged KV cache: the pool of each model in tokens (None: max_batch_size x max_model_len, the memory a
    # slot per sequence took); max_batch_size is the most sequences running at once (vLLM's max_num_seqs).
    kv_cache_tokens: int | None = Field(None, ge=16)
    kv_block_size: int = Field(16, ge=1, le=1024)  # tokens per KV block
    # Decode steps (adapter rows included) run as one torch.compile'd graph per batch-size bucket
    # (models/decode_graph.py), compiled before /ready turns 200. Off by default on CPU: it measured
    # 1.2-2x faster per token but costs a warm-up of seconds per bucket and model (README, Measured results).
    compile_decode: bool = False
    # With compile_decode on a CPU: the graphs' matrix products use Inductor's C++ GEMM template where its
    # autotuning measures it faster than MKL (weights frozen into the graphs, packed: memory for a second
    # copy of the weights). Measured 1.6x faster per decode step on the teacher, but these graphs cannot be
    # cached on disk: every start compiles them again (about 80 s for the teacher). README, Measured results.
    compile_autotune: bool = False
    # Where Inductor keeps compiled code across restarts (TORCHINDUCTOR_CACHE_DIR); None: torch's default
    # (/tmp/torchinductor_<user>). Point it at a volume to keep a warm cache across container restarts.
    compile_cache_dir: Path | None = None
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of prompts already seen (per adapter load)
    max_waiting: int = Field(64, ge=0)  # queued requests per model beyond the running ones; more get 429
    request_timeout_s: float = Field(600.0, gt=0)  # a request still generating after this is cancelled (504)
    # On SIGTERM, how long in-flight requests may take to finish; then the rest are cancelled and the
    # process exits within about a second (the bound on the whole drain, see service/api/server.py).
    drain_timeout_s: float = Field(30.0, ge=0)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header of every 429 and 503
    # A failed engine step fails only its own requests; this many failed steps in a row mark the engine dead
    # (/health and /ready answer 503, so a liveness probe restarts the process).
    max_consecutive_step_failures: int = Field(3, ge=1)

    # ---- request limits (each broken one is a 400 naming it) ----
    max_prompt_chars: int = Field(1_000_000, ge=1)  # checked before tokenizing
    # A larger request body is a 413 before it is parsed (Content-Length, or bytes counted as a chunked
    # body streams in). 8 MiB is above what max_prompt_chars can need: 1,000,000 chars as JSON `\uXXXX`
    # escapes is 6 MB (raw UTF-8: at most 4 B/char), plus the rest of the body. Only characters outside
    # the BMP escaped as surrogate pairs (12 B/char) could pass 8 MiB, and a prompt of ~700k of those
    # is far beyond any max_model_len anyway (refused as too long either way).
    max_request_bytes: int = Field(8 * 1024**2, ge=1024)
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_chars: int = Field(64, ge=1)
    default_max_tokens: int = Field(16, ge=1)  # /v1/completions without max_tokens (OpenAI's default)
    default_chat_max_tokens: int = Field(256, ge=1)  # /v1/chat/completions without max_tokens (capped by context)

    # ---- adapters ----
    max_adapters: int = Field(64, ge=1)  # resident per base model
    max_adapter_bytes: int = Field(512 * 1024**2, ge=1)
    max_lora_rank: int = Field(64, ge=1)

    # ---- security ----
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty: /v1 user routes are open
    admin_api_keys: list[SecretStr] = Field(default_factory=list)  # admin routes; also valid on user routes
    protect_ops_endpoints: bool = False  # True: /health, /ready and /metrics need a key too

    # ---- metrics and logging ----
    metrics_top_adapters: int = Field(16, ge=0)  # adapters labelled by name in metrics; the rest are "other"
    # One JSON line per finished request on the `modelserve.requests` logger (service/api/request_log.py).
    request_log_json: bool = False
    # OpenTelemetry traces of /v1/* requests (service/api/tracing.py), sent to this OTLP/HTTP traces URL
    # (e.g. http://127.0.0.1:4318/v1/traces); None: off, and nothing of OpenTelemetry's SDK is imported.
    otel_traces_endpoint: str | None = Field(None, pattern=r"^https?://")
    otel_service_name: str = "modelserve"  # the spans' resource `service.name`
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: int | None = Field(None, ge=1)  # None: torch's default (all cores)
    gil_switch_interval_s: float = Field(0.001, gt=0)  # sys.setswitchinterval (Python's default: 0.005)

    # ---- Ray Serve (`modelserve serve --ray`; see service/ray_app.py) ----
    ray_address: str | None = None  # an existing cluster ("auto", "ray://head:10001"); None: start a local one
    ray_num_replicas: int | None = Field(None, ge=1)  # fixed replica count; None: autoscale between min and max
    ray_min_replicas: int = Field(1, ge=0)
    ray_max_replicas: int = Field(4, ge=1)
    ray_target_ongoing_requests: float = Field(8.0, gt=0)  # autoscaling target per replica
    ray_max_ongoing_requests: int = Field(32, ge=1)  # sent to one replica at once (= max_batch_size by default)
    ray_max_queued_requests: int = Field(64, ge=-1)  # waiting for a replica; more get 429 (-1: unbounded)
    ray_replica_cpus: float = Field(1.0, gt=0)  # Ray CPUs reserved per replica (and its torch threads)
    ray_max_adapters_per_replica: int = Field(8, ge=1)  # resident adapters per replica (LRU beyond)
    ray_adapter_routing: bool = True  # prefer a replica where the request's adapter is resident
    ray_prefix_routing: bool = True  # prefer the replica that served this prompt prefix (model + hash of 256 chars)
    ray_health_check_period_s: float = Field(2.0, gt=0)
    ray_metrics_host: str = "127.0.0.1"  # where each replica's own /metrics listens ("0.0.0.0" across nodes)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, an optional JSON or .env file, and overrides (None values ignored)."""
        overrides = {key: value for key, value in overrides.items() if value not in (None, {}, [])}
        if config_file is None:
            return cls(**overrides)
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"settings file {path} not found")
        if path.suffix == ".json":
            return cls(**{**json.loads(path.read_text()), **overrides})
        return cls(_env_file=path, **overrides)

    def export_torch_environment(self) -> None:
        """Set the environment variables torch reads (this module is the one that touches the environment)."""
        if self.compile_cache_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.compile_cache_dir.resolve())

    @field_validator("chat_template")
    @classmethod
    def _template_or_file(cls, value: str | None) -> str | None:
        if value is not None and "{" not in value and not Path(value).is_file():
            raise ValueError(f"chat_template {value!r} is neither a Jinja template nor a file")
        return value

    def chat_template_text(self) -> str | None:
        """`chat_template` read from its file when it names one, else as given (None: the tokenizers')."""
        if self.chat_template is None:
            return None
        if "{" not in self.chat_template:  # a file (checked when the settings were made)
            return Path(self.chat_template).read_text(encoding="utf-8")
        return self.chat_template

    @property
    def effective_adapter_roots(self) -> list[Path]:
        return self.adapter_roots or [self.artifacts_dir / "adapters"]
