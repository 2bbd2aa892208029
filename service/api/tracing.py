"""OpenTelemetry traces of the `/v1/*` requests, off by default (the `otel_traces_endpoint` setting).

With `otel_traces_endpoint` set (an OTLP/HTTP traces URL, e.g. ``http://127.0.0.1:4318/v1/traces``),
`install` adds `TracingMiddleware`, a pure ASGI middleware that opens one SERVER span per HTTP request
whose path starts with ``/v1/``, continuing the trace of an incoming W3C ``traceparent`` header. Spans go
through a `BatchSpanProcessor` to the OTLP/HTTP exporter, on a private `TracerProvider` (resource
``service.name`` = `otel_service_name`); the global OpenTelemetry providers are left alone, so nothing
else in the process (FastAPI's own instrumentation included) starts exporting. The provider flushes at
interpreter exit.

The span (named ``"<METHOD> <route>"``, or just the method for a path no route matches) carries
`http.request.method`, `http.route`, `url.path`, `http.response.status_code`, and, for a request that
reached the engine: `modelserve.model` (the base), `modelserve.adapter`, `gen_ai.request.model` (the name
asked for), `gen_ai.usage.input_tokens` / `output_tokens`, `modelserve.cached_tokens` (prompt tokens from
the prefix cache), `gen_ai.response.finish_reasons`, `modelserve.outcome` (the metrics' `outcome` label:
a finish reason, or ``rejected`` for a 429/503 refusal), `modelserve.request_id`, `modelserve.queue_time_s`
and `modelserve.time_to_first_token_s`; a ``first_token`` event; and three child spans built from the
engine's timings: ``queue`` (arrival to first scheduled), ``prefill`` (first scheduled to first token,
possibly several steps shared with other requests) and ``decode`` (first to last token). Its status is
ERROR for a 5xx, an unhandled exception, or a generation that ended in ``error`` (a stream's status is
200 even then); 4xx stay UNSET, as OpenTelemetry's HTTP conventions say for servers.

How the engine's numbers reach the span: the middleware puts a `RequestTrace` in a context variable;
`observer` wraps the request observer (`service.api.metrics.Metrics`) given to the engine client, whose
`track` runs in the request's context when the request is submitted, so the tracker it returns also
fills that `RequestTrace` (on the engine thread). The middleware writes it onto the span when the
response ends. With the setting unset, `install` adds nothing, `observer` returns the metrics object
itself, and no OpenTelemetry SDK or exporter module is imported.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.types import TokenEvent
from service.settings import Settings

TRACED_PREFIX = "/v1/"


@dataclass
class RequestTrace:
    """What the engine reports about one HTTP request's generation; written on the engine thread."""

    model: str | None = None
    adapter: str | None = None
    request_id: str | None = None
    arrival: float | None = None  # time.monotonic() of the engine request's arrival
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    queue_time_s: float | None = None
    ttft_s: float | None = None
    last_token: float | None = None  # time.monotonic() of the last token
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_event(self, event: TokenEvent) -> None:
        with self.lock:
            self.request_id = self.request_id or event.request_id
            self.completion_tokens = event.completion_tokens
            if event.token_times:
                self.last_token = event.token_times[-1]
        if event.finish_reason is not None:
            self.finish(event.finish_reason, event)

    def finish(self, outcome: str, event: TokenEvent | None = None) -> None:
        with self.lock:
            if self.finish_reason is not None:  # the first outcome wins, as in metrics.RequestTracker
                return
            self.finish_reason = outcome
            if event is not None:
                self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
                self.cached_tokens = event.cached_tokens
                self.queue_time_s = event.queue_time
                self.ttft_s = event.time_to_first_token
                self.error = event.error

    def attributes(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        attrs: dict[str, Any] = {
            "modelserve.model": self.model,
            "gen_ai.request.model": self.adapter or self.model,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.completion_tokens,
            "modelserve.cached_tokens": self.cached_tokens,
        }
        optional = {
            "modelserve.adapter": self.adapter,
            "modelserve.request_id": self.request_id,
            "modelserve.outcome": self.finish_reason,  # the metrics' outcome label: a finish reason or "rejected"
            "modelserve.queue_time_s": self.queue_time_s,
            "modelserve.time_to_first_token_s": self.ttft_s,
        }
        attrs.update({key: value for key, value in optional.items() if value is not None})
        if self.finish_reason not in (None, "rejected"):
            attrs["gen_ai.response.finish_reasons"] = (self.finish_reason,)
        return attrs


_CURRENT: ContextVar[RequestTrace | None] = ContextVar("modelserve_request_trace", default=None)


class _TracedTracker:
    """A metrics tracker that also fills the request's `RequestTrace`."""

    def __init__(self, inner: Any, trace: RequestTrace) -> None:
        self.inner, self.trace = inner, trace

    def on_event(self, event: TokenEvent) -> None:
        self.inner.on_event(event)
        self.trace.on_event(event)

    def finish(self, outcome: str, event: TokenEvent | None = None) -> None:
        self.inner.finish(outcome, event)
        self.trace.finish(outcome, event)


class _TracedObserver:
    """Wraps the engine client's request observer (the `Metrics`); everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def track(self, model: str, adapter: str | None, prompt_tokens: int, arrival: float) -> Any:
        tracker = self.inner.track(model, adapter, prompt_tokens, arrival)
        trace = _CURRENT.get()
        if trace is None:  # not inside a traced HTTP request
            return tracker
        trace.model, trace.adapter, trace.prompt_tokens, trace.arrival = model, adapter, prompt_tokens, arrival
        return _TracedTracker(tracker, trace)

    def rejected(self, model: str, adapter: str | None) -> None:
        self.inner.rejected(model, adapter)
        trace = _CURRENT.get()
        if trace is not None:
            trace.model, trace.adapter, trace.finish_reason = model, adapter, "rejected"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def observer(metrics: Any, settings: Settings) -> Any:
    """The request observer to give the engine client: `metrics` itself when tracing is off."""
    return _TracedObserver(metrics) if settings.otel_traces_endpoint else metrics


def make_provider(settings: Settings) -> Any:
    """A private `TracerProvider` exporting to `otel_traces_endpoint` through a batch span processor."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_traces_endpoint)))
    return provider


def install(app: Any, settings: Settings) -> Any | None:
    """Add `TracingMiddleware` to `app` when `otel_traces_endpoint` is set; returns the provider (or None)."""
    if not settings.otel_traces_endpoint:
        return None
    provider = make_provider(settings)
    app.add_middleware(TracingMiddleware, provider=provider)
    return provider


def _wall_ns(mono: float, now_mono: float, now_ns: int) -> int:
    """A time.monotonic() reading as epoch nanoseconds (the clocks read together as now_mono, now_ns)."""
    return now_ns - int((now_mono - mono) * 1e9)


class TracingMiddleware:
    """One SERVER span per `/v1/*` HTTP request (pure ASGI: streaming bodies pass through untouched)."""

    def __init__(self, app: ASGIApp, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app, self.provider = app, provider
        self.tracer = provider.get_tracer("modelserve.api")
        self.propagator = TraceContextTextMapPropagator()
        self.otel = trace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        otel = self.otel
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", [])}
        parent = self.propagator.extract(headers)
        method = scope.get("method", "GET")
        span = self.tracer.start_span(
            f"{method} {scope['path']}",
            context=parent,
            kind=otel.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        request_trace = RequestTrace()
        token = _CURRENT.set(request_trace)
        status: list[int] = []

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(otel.Status(otel.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            _CURRENT.reset(token)
            self._end(span, scope, status[0] if status else None, request_trace)

    def _end(self, span: Any, scope: Scope, status: int | None, request_trace: RequestTrace) -> None:
        otel = self.otel
        route = getattr(scope.get("route"), "path", None)
        method = scope.get("method", "GET")
        span.update_name(f"{method} {route}" if route is not None else method)  # no raw paths in names
        if route is not None:
            span.set_attribute("http.route", route)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        with request_trace.lock:
            span.set_attributes(request_trace.attributes())
            self._phases(span, request_trace)
        if status is not None and status >= 500:
            span.set_status(otel.Status(otel.StatusCode.ERROR, f"HTTP {status}"))
        elif request_trace.finish_reason == "error":
            span.set_status(otel.Status(otel.StatusCode.ERROR, request_trace.error or "generation failed"))
        span.end()

    def _phases(self, span: Any, t: RequestTrace) -> None:
        """The `queue`, `prefill` and `decode` child spans and the `first_token` event, from engine timings."""
        if t.arrival is None or t.queue_time_s is None:
            return
        now_mono, now_ns = time.monotonic(), time.time_ns()
        parent = self.otel.set_span_in_context(span)
        phases = [("queue", t.arrival, t.arrival + t.queue_time_s)]
        if t.ttft_s is not None:
            first = t.arrival + t.ttft_s
            phases.append(("prefill", t.arrival + t.queue_time_s, first))
            span.add_event("first_token", timestamp=_wall_ns(first, now_mono, now_ns))
            if t.last_token is not None and t.last_token > first:
                phases.append(("decode", first, t.last_token))
        for name, start, end in phases:
            child = self.tracer.start_span(name, context=parent, start_time=_wall_ns(start, now_mono, now_ns))
            child.end(end_time=_wall_ns(max(end, start), now_mono, now_ns))
