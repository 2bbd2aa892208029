"""One JSON line per finished request on the `modelserve.requests` logger (the `request_log_json` setting).

Written by `RequestTracker.finish` in metrics.py, the one place every admitted request ends (stop,
length, abort, error). Fields: request id, model, adapter (its own name, not the bounded metrics
label), prompt and completion tokens, time to first token and end to end (seconds), outcome.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("modelserve.requests")


def enable() -> None:
    """Bare JSON lines on stderr (no level or time prefix: log shippers parse each line as JSON), whatever
    `log_level` is: the setting asked for them. Idempotent."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def log_request(tracker: Any, outcome: str, ttft_s: float | None, e2e_s: float) -> None:
    """Log a finished `metrics.RequestTracker`."""
    line = {
        "event": "request",
        "time": round(time.time(), 3),
        "request_id": tracker.request_id,
        "model": tracker.model,
        "adapter": tracker.adapter,
        "prompt_tokens": tracker.prompt_tokens,
        "completion_tokens": tracker.generated,
        "ttft_s": None if ttft_s is None else round(ttft_s, 6),
        "e2e_s": round(e2e_s, 6),
        "outcome": outcome,
    }
    log.info("%s", json.dumps(line, separators=(",", ":")))
