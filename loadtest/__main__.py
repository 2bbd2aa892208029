"""`python -m loadtest --scenario NAME --host URL` (or `modelserve loadtest ...`): run a scenario headless for a
bounded time, then report.

Launches Locust as a subprocess (`loadtest/locustfile.py`, `--headless`, `--run-time` = warm-up +
duration, bounded users), writes its CSVs into `--out` (default `reports/loadtest/<scenario>/`),
builds `report.md` + PNGs there (see `loadtest.report`), logs the summary, and exits 1 when the
share of failed requests exceeds `--max-failure-ratio` (or nothing succeeded), 2 when the run
itself could not happen (server not ready, Locust crashed). Talks to the service over HTTP only.
`--api-key` (a secured server) is sent by every user and the readiness wait as `Authorization:
Bearer`; it is shown as *** in the log and in run.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from loadtest import report, scenarios

log = logging.getLogger("loadtest")
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # Locust runs here so `import loadtest` works


@dataclass(frozen=True)
class RunConfig:
    scenario: scenarios.Scenario
    host: str
    out: Path
    max_failure_ratio: float  # exit 1 above this share of failed requests
    slo_ttft_ms: float
    slo_tpot_ms: float
    ready_timeout_s: float  # wait this long for GET /ready to answer 200 before starting
    locust_args: tuple[str, ...]  # passed through to Locust (e.g. --loglevel DEBUG)
    api_key: str = ""  # a key of the server's api_keys; "" for an open server

    def locust_command(self, redact: bool = False) -> list[str]:
        s = self.scenario
        user_class = "OpenLoopUser" if s.loop == "open" else "ClosedLoopUser"
        run_time = max(1, round(s.warmup_s + s.duration_s))
        return [
            sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")),
            "--headless", "--host", self.host, "--users", str(s.users), "--spawn-rate", str(max(1, s.users)),
            "--run-time", f"{run_time}s", "--stop-timeout", "5", "--only-summary",
            "--csv", str(self.out / "locust"), "--csv-full-history", "--html", str(self.out / "locust.html"),
            "--scenario", s.name, "--warmup", str(s.warmup_s), "--rate", str(s.rate),
            "--max-tokens", str(s.max_tokens), "--num-adapters", str(s.num_adapters), "--model", s.model,
            "--slo-ttft-ms", str(self.slo_ttft_ms), "--slo-tpot-ms", str(self.slo_tpot_ms),
            *(["--api-key", "***" if redact else self.api_key] if self.api_key else []),
            *self.locust_args, user_class,
        ]  # fmt: skip


def parse_args(argv: list[str] | None, prog: str = "python -m loadtest") -> tuple[RunConfig | None, str]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(scenarios.SCENARIOS), help="see --list")
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--users", type=int, help="closed loop: users; open loop: arrival generators")
    parser.add_argument("--rate", type=float, help="open loop: total arrivals per second")
    parser.add_argument("--duration", type=float, help="measured seconds (after the warm-up)")
    parser.add_argument("--warmup", type=float, help="seconds whose statistics are discarded")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request")
    parser.add_argument("--num-adapters", type=int, help="mixed adapters: the first N adapters by name")
    parser.add_argument("--model", help="single-model scenarios: the model to load")
    parser.add_argument("--out", type=Path, help="output folder (default reports/loadtest/<scenario>)")
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: time to first token at most")
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput: time per output token at most")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for GET /ready")
    parser.add_argument("--api-key", default="", help="for a secured server: sent as 'Authorization: Bearer <key>'")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("locust_args", nargs="*", help="after --: extra Locust arguments")
    args = parser.parse_args(argv)
    if args.list:
        return None, "\n".join(f"{s.name:15} {s.description}" for s in scenarios.SCENARIOS.values())
    if args.scenario is None:
        parser.error("--scenario is required (see --list)")
    scenario = scenarios.get(
        args.scenario,
        users=args.users,
        rate=args.rate,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_tokens=args.max_tokens,
        num_adapters=args.num_adapters,
        model=args.model,
    )
    if scenario.loop == "open" and scenario.rate <= 0:
        parser.error(f"scenario {scenario.name} is open loop: give --rate > 0")
    if not 0 < scenario.users <= 1000 or scenario.duration_s <= 0:
        parser.error("--users must be in 1..1000 and --duration positive (every run is bounded)")
    out = args.out or Path("reports") / "loadtest" / scenario.name
    config = RunConfig(
        scenario,
        args.host.rstrip("/"),
        out.resolve(),
        args.max_failure_ratio,
        args.slo_ttft_ms,
        args.slo_tpot_ms,
        args.ready_timeout,
        tuple(args.locust_args),
        args.api_key,
    )
    return config, shlex.join([*prog.split(), *redacted(list(sys.argv[1:] if argv is None else argv))])


def redacted(argv: list[str]) -> list[str]:
    """The command line with the value of --api-key replaced by ***."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--api-key":
            arg = "***"
        elif arg.startswith("--api-key="):
            arg = "--api-key=***"
        out.append(arg)
    return out


def wait_ready(host: str, timeout_s: float, api_key: str = "") -> str | None:
    """None when GET /ready answers 200 within the timeout, else the last reason."""
    deadline, reason = time.monotonic() + timeout_s, "no answer"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        try:
            response = requests.get(host + "/ready", headers=headers, timeout=5)
            if response.status_code == 200:
                return None
            reason = f"/ready answered {response.status_code}: {response.text[:200]}"
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            return reason
        time.sleep(0.5)


def run(config: RunConfig, command: str) -> int:
    s = config.scenario
    reason = wait_ready(config.host, config.ready_timeout_s, config.api_key)
    if reason is not None:
        log.error("the service at %s is not ready: %s", config.host, reason)
        return 2
    config.out.mkdir(parents=True, exist_ok=True)
    load = f"{s.rate:g} arrivals/s from {s.users} generators" if s.loop == "open" else f"{s.users} users"
    meta = {
        "scenario": s.name, "host": config.host, "command": command, "loop": s.loop, "load": load,
        "duration_s": s.duration_s, "warmup_s": s.warmup_s, "slo_ttft_ms": config.slo_ttft_ms,
        "slo_tpot_ms": config.slo_tpot_ms, "max_tokens": s.max_tokens, "started": time.time(),
    }  # fmt: skip
    (config.out / "run.json").write_text(json.dumps(meta, indent=2))
    argv = config.locust_command()
    shown = shlex.join(config.locust_command(redact=True))
    log.info("running %s for %.0f s (+%.0f s warm-up): %s", s.name, s.duration_s, s.warmup_s, shown)
    with (config.out / "locust.log").open("w") as locust_log:
        try:
            process = subprocess.run(
                argv, cwd=PACKAGE_PARENT, stdout=locust_log, stderr=subprocess.STDOUT,
                timeout=s.warmup_s + s.duration_s + 120,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            log.error("Locust did not stop in time; see %s", config.out / "locust.log")
            return 2
    if process.returncode not in (0, 1) or not (config.out / "locust_stats.csv").is_file():
        log.error("Locust failed (exit %d); see %s", process.returncode, config.out / "locust.log")
        return 2
    summary = report.build(config.out)
    lat = summary.latency_ms
    for key in ("TTFT", "ITL", "TPOT", "E2E"):
        if key in lat:
            log.info("%-4s ms  p50 %8.1f  p95 %8.1f  p99 %8.1f", key, lat[key]["50%"], lat[key]["95%"], lat[key]["99%"])
    log.info(
        "%.2f req/s, %.1f tokens/s, %d requests, %d failures (%.2f%%), %d rejected, goodput %.1f%% (%.2f/s)",
        summary.requests_per_s, summary.tokens_per_s, summary.requests, summary.failures,
        100 * summary.failure_ratio, summary.rejected, 100 * summary.goodput_ratio, summary.goodput_per_s,
    )  # fmt: skip
    log.info("report: %s", config.out / "report.md")
    succeeded = summary.requests - summary.failures
    if succeeded <= 0 or summary.failure_ratio > config.max_failure_ratio:
        log.error(
            "failure ratio %.4f exceeds --max-failure-ratio %.4f (or nothing succeeded); failures in %s",
            summary.failure_ratio, config.max_failure_ratio, config.out / "locust_failures.csv",
        )  # fmt: skip
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m loadtest") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    config, text = parse_args(argv, prog)
    if config is None:
        log.info("scenarios:\n%s", text)
        return 0
    return run(config, text)


if __name__ == "__main__":
    sys.exit(main())
