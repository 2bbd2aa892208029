"""The one place where engine stats and request timings become Prometheus metrics (DESIGN.md, Metrics).

Sources: `on_step` receives each engine step's `StepStats` (engine thread); a `RequestTracker` per
HTTP request records its outcome and timings from the engine's `TokenEvent`s; the adapter
registries are read at scrape time by a collector. Every metric lives in this module's own
`CollectorRegistry` (with the standard `process_*` and `python_info` collectors), so one process exposes
complete metrics and tests can build many apps. `refuse` is called by the error handlers (errors.py).
With `request_log_json`, `RequestTracker.finish` also logs one JSON line per request (request_log.py).

Cardinality: `model` is bounded by the served models; `adapter` is the adapter name for the
`top_adapters` adapters with the most requests so far, `other` for the rest, and `none` for requests
to a base model. An adapter that drops out of the top N keeps its (frozen) series; its new traffic
counts under `other`.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service.api import request_log
from service.engine import StepStats, TokenEvent

PREFIX = "modelserve_"
# 1 ms .. 60 s: sub-10 ms steps of a GPU decode up to minute-long CPU generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
LATENCY_BUCKETS += (30.0, 60.0)
# Past 60 s, request-level latencies (TTFT, queue time, end to end) get this ladder up to request_timeout_s.
LONG_BUCKETS = (120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192 tokens per step
OUTCOMES = ("stop", "length", "abort", "error", "rejected")
NO_ADAPTER, OTHER_ADAPTER = "none", "other"
disable_created_metrics()  # no `_created` series: they double the exposition and no dashboard reads them


def request_buckets(timeout_s: float) -> tuple[float, ...]:
    """LATENCY_BUCKETS, then LONG_BUCKETS below `timeout_s`, then `timeout_s`: no request outlives the top bucket."""
    longer = tuple(b for b in LONG_BUCKETS if LATENCY_BUCKETS[-1] < b < timeout_s)
    top = (float(timeout_s),) if timeout_s > LATENCY_BUCKETS[-1] else ()
    return (*LATENCY_BUCKETS, *longer, *top)


def package_version() -> str:
    try:
        return importlib.metadata.version("modelserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class AdapterLabels:
    """Bounded `adapter` label values: the top N adapters by request count keep their name."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, adapter: str | None) -> str:
        """Count one request of `adapter` and return its label."""
        if adapter is None:
            return NO_ADAPTER
        with self.lock:
            self.counts[adapter] = self.counts.get(adapter, 0) + 1
            return self._label(adapter)

    def label(self, adapter: str | None) -> str:
        if adapter is None:
            return NO_ADAPTER
        with self.lock:
            return self._label(adapter)

    def _label(self, adapter: str) -> str:
        mine = self.counts.get(adapter, 0)
        # Rank = adapters strictly ahead (more requests, or as many and an earlier name).
        ahead = sum(1 for name, n in self.counts.items() if n > mine or (n == mine and name < adapter))
        return adapter if ahead < self.top else OTHER_ADAPTER


class Metrics:
    def __init__(self, top_adapters: int = 16, request_timeout_s: float = 600.0, request_log_json: bool = False):
        self.registry = CollectorRegistry()
        if request_log_json:
            request_log.enable()
        self.request_log_json = request_log_json
        self.adapters = AdapterLabels(top_adapters)
        # base model -> its adapter registry (read at scrape time: `resident`, `stats`)
        self.registries: dict[str, Any] = {}
        self.ready_probe: Callable[[], bool] | None = None  # set by the app: is the service ready now?
        r, ma = self.registry, ["model", "adapter"]

        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        long = request_buckets(request_timeout_s)

        def hist(name: str, doc: str, labels: list[str], buckets=long) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=r, buckets=buckets)

        self.ttft = hist(
            "time_to_first_token_seconds",
            "Seconds from the request's arrival at the engine to its first output token (includes queueing and "
            "prefill; excludes HTTP parsing and tokenization).",
            ma,
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Seconds between two consecutive output tokens of one request, one observation per token after the "
            "first (the first token is not included: see time_to_first_token_seconds).",
            ma,
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "Seconds from the request's arrival at the engine until it finished (stop, length, abort or error).",
            ma,
        )
        self.queue_time = hist(
            "request_queue_time_seconds",
            "Seconds a request waited in the engine's queue, from arrival until its first scheduled step.",
            ma,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens_total", "Prompt tokens of requests admitted to the engine.", ma, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens_total",
            "Output tokens generated (the end-of-sequence token not counted), including those of aborted requests.",
            ma,
            registry=r,
        )
        self.requests = Counter(
            PREFIX + "requests_total",
            "Generation requests by outcome: stop (EOS or stop string), length (max_tokens or context), abort "
            "(client disconnected or timed out), error (engine failure), rejected (refused admission: queue full "
            "429 or draining 503). Requests refused as invalid (4xx) are not counted here: see "
            "requests_refused_total.",
            [*ma, "outcome"],
            registry=r,
        )
        self.running = Gauge(
            PREFIX + "num_requests_running",
            "Requests holding a KV cache slot (prefilling or decoding), after the latest engine step.",
            ["model"],
            registry=r,
        )
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Requests queued in the engine's scheduler waiting for a slot, after the latest engine step.",
            ["model"],
            registry=r,
        )
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio",
            "Fraction (0..1) of the model's paged KV pool held by running requests, after the latest step "
            "(KV blocks held over blocks in the pool; cached blocks that can be evicted count as free).",
            ["model"],
            registry=r,
        )
        self.batch_size = hist(
            "batch_size",
            "Tokens fed through the model in one engine step (prefill chunks + one per decoding request); "
            "one observation per step that ran a forward.",
            ["model"],
            buckets=TOKEN_BUCKETS,
        )
        self.expert_tokens = Counter(
            PREFIX + "moe_expert_tokens_total",
            "Tokens routed to each expert of each MoE layer (a token counts once for each of its top-k experts).",
            ["model", "layer", "expert"],
            registry=r,
        )
        self.spec_draft = Counter(
            PREFIX + "spec_decode_draft_tokens_total",
            "Draft tokens proposed by speculative decoding (0 while speculative decoding is off).",
            ["model"],
            registry=r,
        )
        self.spec_accepted = Counter(
            PREFIX + "spec_decode_accepted_tokens_total",
            "Draft tokens accepted by the target model in speculative decoding (0 while it is off).",
            ["model"],
            registry=r,
        )
        self.prefix_queries = Counter(
            PREFIX + "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache when requests were admitted (recomputations included).",
            ["model"],
            registry=r,
        )
        self.prefix_hits = Counter(
            PREFIX + "prefix_cache_hits_total",
            "Of the prompt tokens looked up, those whose KV was found in the prefix cache (not prefilled again).",
            ["model"],
            registry=r,
        )
        self.preemptions = Counter(
            PREFIX + "num_preemptions_total",
            "Running requests preempted because the KV pool ran out (their KV freed and recomputed later).",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            PREFIX + "model_info",
            "1 for each served base model, labelled with where and how its weights are held.",
            ["model", "device", "dtype", "quantization"],
            registry=r,
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "1, labelled with the modelserve package version.", ["version"], registry=r
        )
        self.build_info.labels(package_version()).set(1)
        self.refused = Counter(
            PREFIX + "requests_refused_total",
            "HTTP requests refused as invalid, by status code: every 4xx the error handlers answer (bad input 400, "
            "key 401/403, unknown model or adapter 404, conflict 409, body too large 413) except 429 (counted as "
            'requests_total{outcome="rejected"}).',
            ["code"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            PREFIX + "lora_adapter_load_seconds",
            "Seconds to load one adapter: read safetensors, check against the base model, install.",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        r.register(_AdapterRegistryCollector(self))

    # ---- set-up ----
    def add_model(self, model: str, registry: Any | None, device: str = "", dtype: str = "", quant: str = "") -> None:
        """Create the model's series at zero, so every metric is present before the first request."""
        self.model_info.labels(model, device, dtype, quant or "none").set(1)
        for outcome in OUTCOMES:
            self.requests.labels(model, NO_ADAPTER, outcome)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue_time):
            metric.labels(model, NO_ADAPTER)
        per_model = (self.running, self.waiting, self.kv_usage, self.batch_size, self.spec_draft, self.spec_accepted)
        for metric in (*per_model, self.prefix_queries, self.prefix_hits, self.preemptions):
            metric.labels(model)
        load_seconds = self.adapter_load_seconds.labels(model)
        if registry is not None:
            self.registries[model] = registry
            stats = registry.stats
            if stats.on_load is None:  # loads before now (start-up adapters), then each one as it happens
                for seconds in stats.load_seconds:
                    load_seconds.observe(seconds)
                stats.on_load = load_seconds.observe

    # ---- engine thread ----
    def on_step(self, stats: StepStats) -> None:
        model = stats.model
        self.running.labels(model).set(stats.num_running)
        self.waiting.labels(model).set(stats.num_waiting)
        self.kv_usage.labels(model).set(stats.kv_cache_usage)
        if stats.num_tokens:
            self.batch_size.labels(model).observe(stats.num_tokens)
        if stats.expert_tokens:
            for layer, counts in enumerate(stats.expert_tokens):
                for expert, n in enumerate(counts):
                    if n:
                        self.expert_tokens.labels(model, str(layer), str(expert)).inc(n)
        if stats.spec_draft_tokens:
            self.spec_draft.labels(model).inc(stats.spec_draft_tokens)
        if stats.spec_accepted_tokens:
            self.spec_accepted.labels(model).inc(stats.spec_accepted_tokens)
        if stats.prefix_cache_queries:
            self.prefix_queries.labels(model).inc(stats.prefix_cache_queries)
            self.prefix_hits.labels(model).inc(stats.prefix_cache_hits)
        if stats.preemptions:
            self.preemptions.labels(model).inc(stats.preemptions)

    # ---- requests ----
    def track(self, model: str, adapter: str | None, prompt_tokens: int, arrival: float) -> RequestTracker:
        return RequestTracker(self, model, self.adapters.count(adapter), prompt_tokens, arrival, adapter)

    def refuse(self, status: int) -> None:
        """Count one request refused as invalid (a 4xx other than 429); other statuses are ignored."""
        if 400 <= status < 500 and status not in (429, 499):
            self.refused.labels(str(status)).inc()

    def rejected(self, model: str, adapter: str | None) -> None:
        self.requests.labels(model, self.adapters.count(adapter), "rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestTracker:
    """One admitted request's metrics: feed it every TokenEvent, then `finish` once (idempotent)."""

    metrics: Metrics
    model: str
    adapter_label: str
    prompt_tokens: int
    arrival: float  # time.monotonic(), the GenerationRequest's arrival_time
    adapter: str | None = None  # the adapter's own name (the request log), not the bounded label
    request_id: str | None = None  # from the first TokenEvent
    token_times: list[float] = field(default_factory=list)
    generated: int = 0
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # finish() may race: engine thread vs event loop

    def on_event(self, event: TokenEvent) -> None:
        if self.request_id is None:
            self.request_id = event.request_id
        self.token_times.extend(event.token_times)
        self.generated = event.completion_tokens
        if event.finish_reason is not None:
            self.finish(event.finish_reason, event)

    def finish(self, outcome: str, event: TokenEvent | None = None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        m, labels = self.metrics, (self.model, self.adapter_label)
        m.requests.labels(*labels, outcome).inc()
        m.prompt_tokens.labels(*labels).inc(self.prompt_tokens)
        m.generation_tokens.labels(*labels).inc(self.generated)
        e2e = time.monotonic() - self.arrival
        m.e2e.labels(*labels).observe(e2e)
        ttft = None
        if self.token_times:
            first = event.time_to_first_token if event is not None else None
            ttft = first if first is not None else self.token_times[0] - self.arrival
            m.ttft.labels(*labels).observe(ttft)
        itl = m.itl.labels(*labels)
        for before, after in zip(self.token_times, self.token_times[1:]):
            itl.observe(after - before)
        if event is not None and event.queue_time is not None:
            m.queue_time.labels(*labels).observe(event.queue_time)
        if m.request_log_json:
            request_log.log_request(self, outcome, ttft, e2e)


class _AdapterRegistryCollector:
    """LoRA registry state, read at scrape time from each model's AdapterRegistry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        resident = GaugeMetricFamily(
            PREFIX + "lora_adapters_resident", "LoRA adapters resident in memory per base model.", labels=["model"]
        )
        loads = CounterMetricFamily(
            PREFIX + "lora_adapter_loads",
            "Adapter load attempts by result: loaded, or error (unreadable, wrong shapes, rank too large).",
            labels=["model", "result"],
        )
        evictions = CounterMetricFamily(
            PREFIX + "lora_adapter_evictions",
            "Adapters evicted (least recently used, not pinned, not in use) to make room for another.",
            labels=["model"],
        )
        ready = GaugeMetricFamily(
            PREFIX + "engine_ready",
            "1 when the service can serve requests (models loaded, not draining, engine loop alive), else 0; "
            "the same condition as GET /ready.",
        )
        probe = self.metrics.ready_probe
        ready.add_metric([], 1.0 if probe is not None and probe() else 0.0)
        for model, registry in self.metrics.registries.items():
            resident.add_metric([model], len(registry.resident))
            stats = registry.stats
            for result in ("loaded", "error"):
                loads.add_metric([model, result], stats.loads.get(result, 0))
            evictions.add_metric([model], stats.evictions)
        return [ready, resident, loads, evictions]
