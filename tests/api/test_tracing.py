"""OpenTelemetry traces (service/api/tracing.py): a real server exports to a real OTLP/HTTP receiver.

The receiver is a small HTTP server on 127.0.0.1 that accepts `POST /v1/traces` and decodes each body
with opentelemetry-proto's `ExportTraceServiceRequest`, as a collector would. With the setting unset, no
exporter is created and no OpenTelemetry SDK module is imported.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.api import tracing
from service.api.app import create_app
from service.settings import Settings
from tests.api.conftest import ROOT, start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """A minimal OTLP/HTTP traces endpoint: every span received, with its resource attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, Span]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend((resource, span) for span in scope_spans.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 20.0) -> list[tuple[dict, Span]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [(resource, span) for resource, span in self.spans if predicate(span)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no such span in {timeout} s; received {[s.name for _, s in self.spans]}")


def attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind)
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.httpd.shutdown()


def test_a_completion_is_one_server_span_continuing_the_callers_trace(zoo, tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # the batch processor's delay (ms): a quick test
    srv = start_server(
        zoo, tmp_path, adapters=("a1",), otel_traces_endpoint=receiver.url, otel_service_name="modelserve-test"
    )
    try:
        with srv.client() as http:
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            body = {"model": "a1", "prompt": "hello there", "max_tokens": 6, "ignore_eos": True}
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            streamed = http.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                },
            )
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            assert http.get("/health").status_code == 200

        (resource, span), *_ = receiver.wait_for(
            lambda s: s.trace_id.hex() == TRACE_ID and s.kind == Span.SPAN_KIND_SERVER
        )
        assert resource["service.name"] == "modelserve-test"
        assert span.parent_span_id.hex() == PARENT_ID and span.name == "POST /v1/completions"
        attrs = attributes(span.attributes)
        assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/v1/completions"
        assert attrs["http.response.status_code"] == 200
        assert attrs["modelserve.model"] == "tiny" and attrs["modelserve.adapter"] == "a1"
        assert attrs["gen_ai.request.model"] == "a1"
        assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
        assert attrs["modelserve.cached_tokens"] == 0
        assert attrs["gen_ai.response.finish_reasons"] == ["length"] and attrs["modelserve.outcome"] == "length"
        assert 0 <= attrs["modelserve.queue_time_s"] <= attrs["modelserve.time_to_first_token_s"] < 30
        assert attrs["modelserve.request_id"]
        assert span.status.code == Status.STATUS_CODE_UNSET
        assert [event.name for event in span.events] == ["first_token"]
        assert span.start_time_unix_nano <= span.events[0].time_unix_nano <= span.end_time_unix_nano

        receiver.wait_for(lambda s: s.parent_span_id == span.span_id and s.name == "decode")
        phases = {child.name: child for _, child in receiver.wait_for(lambda s: s.parent_span_id == span.span_id)}
        assert set(phases) == {"queue", "prefill", "decode"}
        assert all(child.trace_id.hex() == TRACE_ID for child in phases.values())
        assert phases["queue"].end_time_unix_nano <= phases["prefill"].end_time_unix_nano
        assert phases["prefill"].end_time_unix_nano <= phases["decode"].end_time_unix_nano

        (_, chat), *_ = receiver.wait_for(lambda s: s.name == "POST /v1/chat/completions")
        chat_attrs = attributes(chat.attributes)
        assert chat.trace_id.hex() != TRACE_ID and len(chat.parent_span_id) == 0  # no traceparent: a new trace
        assert chat_attrs["modelserve.model"] == "tiny" and "modelserve.adapter" not in chat_attrs
        assert chat_attrs["gen_ai.usage.output_tokens"] >= 1 and chat_attrs["http.response.status_code"] == 200

        (_, missing), *_ = receiver.wait_for(
            lambda s: (
                s.kind == Span.SPAN_KIND_SERVER and attributes(s.attributes).get("http.response.status_code") == 404
            )
        )
        assert missing.status.code == Status.STATUS_CODE_UNSET  # a client's mistake is not a server error
        assert "modelserve.model" not in attributes(missing.attributes)
        with receiver.lock:
            assert not any(attributes(s.attributes).get("url.path") == "/health" for _, s in receiver.spans)
    finally:
        srv.stop()


def test_unset_endpoint_creates_no_exporter(monkeypatch):
    from opentelemetry.exporter.otlp.proto.http import trace_exporter
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    created: list[str | None] = []

    class CountingExporter(SpanExporter):
        def __init__(self, endpoint: str | None = None, **kwargs) -> None:
            created.append(endpoint)

        def export(self, spans) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", CountingExporter)
    settings = Settings()
    app = create_app(settings, load=False)
    assert created == [] and tracing.observer(app.state.service.metrics, settings) is app.state.service.metrics
    assert not any(m.cls is tracing.TracingMiddleware for m in app.user_middleware)

    url = "http://127.0.0.1:9/v1/traces"
    app = create_app(Settings(otel_traces_endpoint=url), load=False)
    assert created == [url] and any(m.cls is tracing.TracingMiddleware for m in app.user_middleware)


def test_unset_endpoint_imports_no_opentelemetry_sdk():
    code = (
        "import sys\n"
        "from service.api.app import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(), load=False)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_failed_generations_are_errors_and_refusals_are_not():
    """In process, on an in-memory exporter: a generation ending in `error` under a 200 stream is an ERROR span;
    a refused request (429) is UNSET with outcome `rejected`; a path no route matches names no path."""
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from service.api.metrics import Metrics
    from service.engine.types import TokenEvent

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = tracing.observer(Metrics(), Settings(otel_traces_endpoint="http://127.0.0.1:9/v1/traces"))

    async def app(scope, receive, send) -> None:
        status = 200
        if scope["path"] == "/v1/refused":
            observer.rejected("m", None)
            status = 429
        elif scope["path"] == "/v1/failed":
            arrival = time.monotonic()
            tracker = observer.track("m", "ad", 5, arrival)
            tracker.on_event(TokenEvent("r1", [7], "x", completion_tokens=1, token_times=[arrival + 0.002]))
            final = TokenEvent("r1", [], "", finish_reason="error", prompt_tokens=5, completion_tokens=1)
            final.error, final.queue_time, final.time_to_first_token = (
                "the model produced non-finite values",
                0.001,
                0.002,
            )
            tracker.on_event(final)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = tracing.TracingMiddleware(app, provider)

    async def call(path: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message) -> None:
            pass

        await middleware({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)

    for path in ("/v1/failed", "/v1/refused"):
        asyncio.run(call(path))
    spans = {span.attributes["url.path"]: span for span in exporter.get_finished_spans() if span.parent is None}
    failed, refused = spans["/v1/failed"], spans["/v1/refused"]
    assert failed.status.status_code == StatusCode.ERROR and "non-finite" in failed.status.description
    assert failed.attributes["modelserve.outcome"] == "error" and failed.attributes["modelserve.adapter"] == "ad"
    assert refused.status.status_code == StatusCode.UNSET and refused.attributes["http.response.status_code"] == 429
    assert refused.attributes["modelserve.outcome"] == "rejected"
    assert "gen_ai.response.finish_reasons" not in refused.attributes
    assert {span.name for span in spans.values()} == {"POST"}  # no route matched: the method alone
    children = [span.name for span in exporter.get_finished_spans() if span.parent is not None]
    assert sorted(children) == ["prefill", "queue"]  # one token: no decode phase
