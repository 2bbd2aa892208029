"""Locust entry point: `locust -f loadtest/locustfile.py --scenario NAME ...` (run from the repo root, or from
any folder that holds `loadtest/`; Locust puts the working directory on `sys.path`).

Registers the scenario's command-line options (Locust hands them to every worker) and discards the
warm-up: `--warmup S` seconds after the test starts, the master's statistics are reset, so the
final CSVs describe only the measured part. `python -m loadtest` is the usual way to run this.
"""

from __future__ import annotations

import logging

import gevent
from locust import events
from locust.runners import WorkerRunner

from loadtest.scenarios import SCENARIOS
from loadtest.users import ClosedLoopUser, OpenLoopUser

__all__ = ["ClosedLoopUser", "OpenLoopUser"]
log = logging.getLogger(__name__)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("modelserve")
    group.add_argument("--scenario", choices=sorted(SCENARIOS), default="student", help="traffic shape")
    group.add_argument("--rate", type=float, default=0.0, help="open loop: total arrivals/s (0: scenario's)")
    group.add_argument("--max-tokens", type=int, default=0, help="output tokens per request (0: scenario's)")
    group.add_argument("--num-adapters", type=int, default=0, help="mixed adapters: use N adapters (0: all)")
    group.add_argument("--model", default="", help="single-model scenarios: the model name (default: scenario's)")
    group.add_argument("--warmup", type=float, default=0.0, help="seconds whose statistics are discarded")
    group.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO: time to first token")
    group.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput SLO: time per output token")
    group.add_argument("--request-timeout-s", type=float, default=120.0, help="client timeout per request")
    parser.add_argument(  # on the parser, not the group: only the parser's add_argument knows is_secret
        "--api-key", default="", env_var="LOCUST_API_KEY", is_secret=True,
        help="sent as 'Authorization: Bearer <key>' on every request (a server with api_keys)",
    )  # fmt: skip


@events.test_start.add_listener
def _warmup(environment, **_kwargs) -> None:
    warmup = environment.parsed_options.warmup
    if warmup > 0 and not isinstance(environment.runner, WorkerRunner):

        def reset() -> None:
            environment.runner.stats.reset_all()
            log.info("warm-up of %.0f s over: statistics reset", warmup)

        gevent.spawn_later(warmup, reset)
