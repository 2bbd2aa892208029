"""`modelserve serve`: Settings from flags/file/environment, the app, and uvicorn with a graceful drain.

SIGTERM (or Ctrl-C): `/ready` turns 503 and new generation requests get 503 (counted as `rejected`)
while in-flight ones finish, up to `drain_timeout_s`. Requests still running then are cancelled: the
engine is stopped, which ends each of them with `abort` (503 with Retry-After, or an SSE error event),
so uvicorn's own graceful wait (`GRACE_S`, a backstop) finds them done; uvicorn ends about a
second after the drain ends: `drain_timeout_s` bounds the whole drain. A second signal cancels what
runs and exits. Connections stay open during the drain, so clients and load balancers see the 503s
instead of refused connections. If loading the models fails, the server exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from types import FrameType

import torch
import uvicorn

from service.api.app import create_app
from service.api.deps import ServiceState
from service.settings import Settings

log = logging.getLogger(__name__)
# uvicorn's graceful shutdown, after the drain: the handlers of cancelled requests answer within one
# engine step; this only bounds a handler that does not (its task is then cancelled).
GRACE_S = 2.0


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"{flag} expects NAME=DIR, got {value!r}")
        pairs[name] = directory
    return pairs


class DrainingServer(uvicorn.Server):
    """uvicorn whose exit signal starts a drain instead of closing the listening socket at once."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_started: float | None = None
        self.engine_stopping = False
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is not None or self.state.engine is None:
            self.should_exit = True  # second signal, or nothing to drain
            self.force_exit = self.drain_started is not None and sig == signal.SIGINT
            return
        log.info("received %s: draining (up to %.0fs)", signal.Signals(sig).name, self.state.settings.drain_timeout_s)
        self.drain_started = time.monotonic()
        self.state.draining = True
        self.state.engine.accepting = False

    def cancel_running(self) -> None:
        """End every request still running with `abort`: stop the engine (off the event loop: it joins the
        engine thread, which ends its requests after its current step)."""
        engine = self.state.engine
        if engine is not None and not self.engine_stopping:
            self.engine_stopping = True
            asyncio.get_running_loop().run_in_executor(None, engine.stop)

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.load_error is not None:
            self.exit_code = 1
            return True
        if self.drain_started is not None and self.should_exit:
            self.cancel_running()  # a second signal during the drain (or the drain ended): end what runs
        elif self.drain_started is not None:
            # Each engine request belongs to an admitted API request: the larger count is the number
            # running (the engine's can lag a just-closed request by one step).
            running = max(state.total_in_flight(), state.engine.num_unfinished() if state.engine else 0)
            waited = time.monotonic() - self.drain_started
            if running == 0 or waited > state.settings.drain_timeout_s:
                if running:
                    log.warning(
                        "drain timeout (drain_timeout_s=%g): cancelling %d running request(s)",
                        state.settings.drain_timeout_s,
                        running,
                    )
                    self.cancel_running()
                else:
                    log.info("drained in %.2fs", waited)
                self.should_exit = True
        return await super().on_tick(counter)


def settings_from_args(args: argparse.Namespace, **extra: object) -> Settings:
    """Settings from `modelserve serve` flags over the --config file and the environment (ValueError if invalid)."""
    from modelserve.cli import settings_overrides

    return Settings.load(
        getattr(args, "config", None),
        host=args.host,
        port=args.port,
        device=args.device,
        models=parse_pairs(args.model, "--model"),
        adapters=parse_pairs(args.adapter, "--adapter"),
        drafts=parse_pairs(getattr(args, "draft", None), "--draft"),
        quantization={"*": args.quantization} if getattr(args, "quantization", None) else None,
        **settings_overrides(args),
        **extra,
    )


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # The engine thread and the event loop share the GIL: a shorter switch interval (default 5 ms) lets
    # the loop answer while the engine runs Python between kernels.
    sys.setswitchinterval(settings.gil_switch_interval_s)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=GRACE_S,
        log_config=None,
    )
    server = DrainingServer(config, app.state.service)
    log.info("serving on http://%s:%d (docs: /docs)", settings.host, settings.port)
    server.run()
    return server.exit_code
