"""`modelserve serve`: Settings from flags/file/environment, the app, and uvicorn with a graceful drain.

SIGTERM (or Ctrl-C): `/ready` turns 503 and new generation requests get 503 while in-flight ones
finish, up to `drain_timeout_s`; then uvicorn shuts down (the engine stops in the app's lifespan) and
the process exits 0. A second signal exits at once. Connections stay open during the drain, so
clients and load balancers see the 503s instead of refused connections. If loading the models
fails, the server exits 1.
"""

from __future__ import annotations

import argparse
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

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.load_error is not None:
            self.exit_code = 1
            return True
        if self.drain_started is not None and not self.should_exit:
            busy = state.total_in_flight() + (state.engine.num_unfinished() if state.engine else 0)
            waited = time.monotonic() - self.drain_started
            if busy == 0 or waited > state.settings.drain_timeout_s:
                if busy:
                    log.warning("drain timeout: %d request(s) still running are cancelled", busy)
                else:
                    log.info("drained in %.2fs", waited)
                self.should_exit = True
        return await super().on_tick(counter)


def settings_from_args(args: argparse.Namespace, **extra: object) -> Settings:
    """Settings from `modelserve serve` flags over the --config file and the environment (ValueError if invalid)."""
    return Settings.load(
        getattr(args, "config", None),
        host=args.host,
        port=args.port,
        device=args.device,
        models=parse_pairs(args.model, "--model"),
        adapters=parse_pairs(args.adapter, "--adapter"),
        drafts=parse_pairs(getattr(args, "draft", None), "--draft"),
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
        timeout_graceful_shutdown=5,
        log_config=None,
    )
    server = DrainingServer(config, app.state.service)
    log.info("serving on http://%s:%d (docs: /docs)", settings.host, settings.port)
    server.run()
    return server.exit_code
