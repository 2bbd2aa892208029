"""The run report from Locust's CSVs: a markdown summary with goodput against the SLOs, and PNG plots.

Inputs (in the run folder): `locust_stats.csv` (final statistics, warm-up excluded), and
`locust_stats_history.csv` (written every few seconds with `--csv-full-history`; its percentiles
cover Locust's last ~10 s window), plus `run.json` written by `python -m loadtest`. Request totals
count only HTTP rows (`POST`, `GET`): the custom metric rows (TTFT, ITL, TPOT, TOKENS, PROMPT, CACHED,
GOODPUT, REJECTED, DROPPED; see `loadtest.users`) are kept apart. The prefix-cache share is the sum
of CACHED over the sum of PROMPT (count x Locust's exact mean). Locust stores values rounded (to whole
milliseconds below 100 ms, to 2 significant digits above), so a percentile is good to about 5%.

Outputs: `report.md`, `latency.png` (TTFT / inter-token / end-to-end p50, p95, p99 over time),
`throughput.png` (requests/s and output tokens/s), `errors.png` (failures, 429 rejections, drops per s).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)
HTTP_TYPES = ("POST", "GET")
PERCENTILES = ("50%", "95%", "99%")


@dataclass
class Summary:
    scenario: str
    duration_s: float
    requests: int  # HTTP requests (successful + failed; expected 429s are counted as rejected instead)
    failures: int
    failure_ratio: float
    rejected: int  # 429s of a scenario that expects them
    dropped: int  # open-loop arrivals not sent (client-side cap)
    requests_per_s: float
    tokens_per_s: float  # output tokens (from usage) per second
    goodput_met: int  # requests that succeeded within both SLOs
    goodput_ratio: float  # goodput_met / (every request answered: succeeded, failed or rejected)
    goodput_per_s: float
    latency_ms: dict[str, dict[str, float]]  # TTFT, ITL, TPOT, E2E -> p50/p95/p99/mean/count
    # Prompt tokens served from the prefix cache over prompt tokens (usage.prompt_tokens_details.cached_tokens),
    # None when the server reported no cached tokens (the CACHED/PROMPT metrics of loadtest.users).
    cached_prompt_ratio: float | None = None


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def summarize(out_dir: Path, meta: dict) -> Summary:
    rows = [r for r in read_rows(out_dir / "locust_stats.csv") if r["Name"] != "Aggregated"]
    by_type: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_type.setdefault(row["Type"], []).append(row)

    def count(kind: str, name: str | None = None, column: str = "Request Count") -> int:
        return sum(int(_num(r[column])) for r in by_type.get(kind, []) if name is None or r["Name"] == name)

    http = [r for r in rows if r["Type"] in HTTP_TYPES]
    requests = sum(int(_num(r["Request Count"])) for r in http)
    failures = sum(int(_num(r["Failure Count"])) for r in http)
    posts = by_type.get("POST", [])
    latency: dict[str, dict[str, float]] = {}
    for label, kind in (("TTFT", "TTFT"), ("ITL", "ITL"), ("TPOT", "TPOT"), ("E2E", "POST")):
        source = by_type.get(kind, [])
        if len(source) != 1:  # E2E over several endpoints: percentiles cannot be merged; take the busiest
            source = sorted(source, key=lambda r: -_num(r["Request Count"]))[:1]
        if source:
            r = source[0]
            latency[label] = {p: _num(r[p]) for p in PERCENTILES}
            latency[label] |= {"mean": _num(r["Average Response Time"]), "count": _num(r["Request Count"])}
    met, missed = count("GOODPUT", "met"), count("GOODPUT", "missed")

    def total(kind: str) -> float:  # sum of the values of a count metric: requests x mean (Locust keeps the exact mean)
        return sum(_num(r["Request Count"]) * _num(r["Average Response Time"]) for r in by_type.get(kind, []))

    prompt_total = total("PROMPT")
    goodput_rate = sum(_num(r["Requests/s"]) for r in by_type.get("GOODPUT", []) if r["Name"] == "met")
    return Summary(
        scenario=meta["scenario"],
        duration_s=meta["duration_s"],
        requests=requests,
        failures=failures,
        failure_ratio=failures / requests if requests else 1.0,
        rejected=count("REJECTED"),
        dropped=count("DROPPED"),
        requests_per_s=sum(_num(r["Requests/s"]) for r in http),
        tokens_per_s=sum(_num(r["Requests/s"]) * _num(r["Average Content Size"]) for r in posts),
        goodput_met=met,
        goodput_ratio=met / (met + missed) if met + missed else 0.0,
        goodput_per_s=goodput_rate,
        latency_ms=latency,
        cached_prompt_ratio=total("CACHED") / prompt_total if prompt_total > 0 else None,
    )


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(summary: Summary, meta: dict) -> str:
    s = summary
    lines = [
        f"# Load test: {s.scenario}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Target {meta['host']}; {meta['loop']} loop, {meta['load']}; {s.duration_s:.0f} s measured after a "
        f"{meta['warmup_s']:.0f} s warm-up (discarded). SLOs: TTFT <= {meta['slo_ttft_ms']:.0f} ms and "
        f"TPOT <= {meta['slo_tpot_ms']:.0f} ms.",
        "",
        "| latency (ms) | p50 | p95 | p99 | mean | samples |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"TTFT": "time to first token", "ITL": "inter-token", "TPOT": "time per output token", "E2E": "end to end"}
    for key, title in names.items():
        if key in s.latency_ms:
            v = s.latency_ms[key]
            cells = " | ".join(_fmt(v[p]) for p in (*PERCENTILES, "mean"))
            lines.append(f"| {title} | {cells} | {int(v['count'])} |")
    lines += [
        "",
        "| throughput and outcomes | value |",
        "| --- | ---: |",
        f"| requests/s | {s.requests_per_s:.2f} |",
        f"| output tokens/s | {s.tokens_per_s:.1f} |",
        f"| requests | {s.requests} |",
        f"| failures | {s.failures} ({100 * s.failure_ratio:.2f}%) |",
        f"| rejected (429, expected) | {s.rejected} |",
        f"| dropped arrivals (client cap) | {s.dropped} |",
        f"| goodput (within both SLOs) | {s.goodput_met} requests, {100 * s.goodput_ratio:.1f}%, "
        f"{s.goodput_per_s:.2f}/s |",
        *(
            [f"| prompt tokens served from the prefix cache | {100 * s.cached_prompt_ratio:.1f}% |"]
            if s.cached_prompt_ratio is not None
            else []
        ),
        "",
        "![latency](latency.png) ![throughput](throughput.png) ![errors](errors.png)",
        "",
        "Locust's CSVs are in this folder (`locust_stats.csv`: final, warm-up excluded; `locust_stats_history.csv`: "
        "over time). Inter-token latency is the gap between SSE events that carried text; TPOT is "
        "(last text event - first) / (output tokens - 1), output tokens from `usage`.",
    ]
    return "\n".join(lines) + "\n"


def _series(history: list[dict[str, str]], kind: str, name: str | None = None) -> dict[float, list[dict[str, str]]]:
    out: dict[float, list[dict[str, str]]] = {}
    for row in history:
        if row["Type"] == kind and (name is None or row["Name"] == name):
            out.setdefault(_num(row["Timestamp"]), []).append(row)
    return out


def plots(out_dir: Path, warmup_s: float) -> list[Path]:
    path = out_dir / "locust_stats_history.csv"
    history = read_rows(path) if path.is_file() else []
    t0 = min((_num(r["Timestamp"]) for r in history), default=0.0)
    written = []

    def finish(fig, axes, name: str) -> None:
        for ax in axes:
            if warmup_s > 0:
                ax.axvspan(0, warmup_s, color="0.9", label="warm-up (discarded)")
            ax.set_xlabel("seconds since start")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, kind) in zip(axes, (("TTFT", "TTFT"), ("inter-token", "ITL"), ("end to end", "POST"))):
        series = _series(history, kind)
        times = sorted(series)
        for p in PERCENTILES:
            ax.plot([t - t0 for t in times], [max(_num(r[p]) for r in series[t]) for t in times], label=f"p{p[:-1]}")
        ax.set_title(f"{title} latency (ms, last ~10 s window)")
        ax.set_ylabel("ms")
    finish(fig, axes, "latency.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    posts = _series(history, "POST")
    times = sorted(posts)
    axes[0].plot([t - t0 for t in times], [sum(_num(r["Requests/s"]) for r in posts[t]) for t in times], label="req/s")
    axes[0].set_title("requests per second")
    tokens, prev = [], None
    for t in times:
        total = sum(_num(r["Total Request Count"]) * _num(r["Total Average Content Size"]) for r in posts[t])
        if prev is not None and t > prev[0]:
            tokens.append((t - t0, max(0.0, total - prev[1]) / (t - prev[0])))  # stats reset: clipped at 0
        prev = (t, total)
    axes[1].plot([x for x, _ in tokens], [y for _, y in tokens], label="output tokens/s", color="tab:green")
    axes[1].set_title("output tokens per second")
    finish(fig, axes, "throughput.png")

    fig, axes = plt.subplots(1, 1, figsize=(8, 4))
    for label, kind, column in (
        ("failures/s", "POST", "Failures/s"),
        ("rejected (429)/s", "REJECTED", "Requests/s"),
        ("dropped/s", "DROPPED", "Requests/s"),
    ):
        series = _series(history, kind)
        ts = sorted(series)
        axes.plot([t - t0 for t in ts], [sum(_num(r[column]) for r in series[t]) for t in ts], label=label)
    axes.set_title("errors per second")
    finish(fig, [axes], "errors.png")
    return written


def build(out_dir: Path) -> Summary:
    """Write report.md, the PNGs and summary.json into `out_dir`; return the summary."""
    meta = json.loads((out_dir / "run.json").read_text())
    summary = summarize(out_dir, meta)
    plots(out_dir, meta["warmup_s"])
    (out_dir / "report.md").write_text(markdown(summary, meta))
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
