"""Unit checks of the load-test client: SSE stream verification, scenario selection, report from CSVs.

Nothing here imports locust (or loadtest.users): importing locust monkey-patches the whole process with gevent.
"""

from __future__ import annotations

import json

import pytest

from loadtest import report, scenarios
from loadtest.sse import StreamChecker, StreamError, StreamResult


def chunk(text: str, finish: str | None = None, cid: str = "cmpl-1") -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return json.dumps({"id": cid, "object": "text_completion", "choices": [choice], "usage": None})


USAGE = json.dumps(
    {"id": "cmpl-1", "object": "text_completion", "choices": [],
     "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
)  # fmt: skip


def feed(payloads: list[str]) -> StreamResult:
    result = StreamResult(status=200, started=0.0)
    checker = StreamChecker("/v1/completions", result)
    for i, payload in enumerate(payloads):
        checker.feed(payload, now=0.1 * (i + 1))
    assert checker.done
    return result


def test_a_good_stream_is_timed_and_counted_from_usage():
    result = feed([chunk("a"), chunk("b"), chunk("cd", "length"), USAGE, "[DONE]"])
    assert result.completion_tokens == 4 and result.finish_reason == "length"
    assert result.ttft_s == pytest.approx(0.1) and result.itl_s == pytest.approx([0.1, 0.1])
    assert result.tpot_s == pytest.approx(0.2 / 3)


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ([chunk("a"), "[DONE]"], "before any chunk had a finish_reason"),
        ([chunk("a", "stop"), "[DONE]"], "no usage chunk"),
        ([chunk("a"), chunk("b", cid="other")], "differs"),
        ([chunk("a", "stop"), USAGE, "[DONE]", chunk("x")], "after [DONE]"),
        ([chunk("a"), json.dumps({"error": {"type": "server_error", "message": "boom"}})], "boom"),
        ([chunk("a", "abort")], "finish_reason 'abort'"),
        (["not json"], "not JSON"),
    ],
)
def test_contract_breaches_fail_with_the_reason(payloads, message):
    with pytest.raises(StreamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        feed(payloads)


def test_zipf_over_adapters_and_unknown_model():
    names, weights = scenarios.pick_targets(scenarios.get("mixed-adapters"), ["student"], ["b", "a", "c"])
    assert names == ["a", "b", "c"] and weights[0] > weights[1] > weights[2]
    with pytest.raises(ValueError, match="needs model 'student'"):
        scenarios.pick_targets(scenarios.get("student"), ["moe"], [])
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.get("nope")


def test_report_keeps_custom_metrics_out_of_request_totals(tmp_path):
    header = (
        "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
        "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
    )
    rows = [
        "POST,/v1/completions,100,2,500,510,100,900,32,2.0,0.04,500,0,0,0,0,800,0,900,0,0,900",
        "TTFT,all,98,0,50,55,10,90,0,1.96,0,50,0,0,0,0,80,0,90,0,0,90",
        "ITL,all,3000,0,12,13,1,40,0,60,0,12,0,0,0,0,30,0,40,0,0,40",
        "GOODPUT,met,90,0,500,500,100,900,0,1.8,0,0,0,0,0,0,0,0,0,0,0,0",
        "GOODPUT,missed,15,0,500,500,100,900,0,0.3,0,0,0,0,0,0,0,0,0,0,0,0",
        "PROMPT,all,98,0,300,300,300,300,0,1.96,0,300,0,0,0,0,300,0,300,0,0,300",
        "CACHED,all,98,0,200,150,0,288,0,1.96,0,200,0,0,0,0,288,0,288,0,0,288",
        "REJECTED,/v1/completions,5,0,3,3,1,5,0,0.1,0,3,0,0,0,0,5,0,5,0,0,5",
        ",Aggregated,3298,2,12,13,1,900,0,66,0.04,12,0,0,0,0,30,0,40,0,0,900",
    ]
    (tmp_path / "locust_stats.csv").write_text("\n".join([header, *rows]) + "\n")
    meta = {"scenario": "student", "duration_s": 50, "warmup_s": 10, "host": "h", "command": "c", "loop": "closed",
            "load": "4 users", "slo_ttft_ms": 1000, "slo_tpot_ms": 200}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(meta))
    summary = report.build(tmp_path)
    assert (summary.requests, summary.failures, summary.rejected) == (100, 2, 5)
    assert summary.requests_per_s == pytest.approx(2.0) and summary.tokens_per_s == pytest.approx(64.0)
    assert summary.goodput_met == 90 and summary.goodput_ratio == pytest.approx(90 / 105)
    assert summary.latency_ms["TTFT"]["95%"] == 80 and summary.latency_ms["E2E"]["99%"] == 900
    assert "| time to first token | 50.0 | 80.0 | 90.0 |" in (tmp_path / "report.md").read_text()
    assert summary.cached_prompt_ratio == pytest.approx(0.5)  # mean cached 150 of mean prompt 300
    assert "| prompt tokens served from the prefix cache | 50.0% |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "latency.png").is_file()


def test_cached_tokens_are_read_from_usage_where_present():
    details = json.loads(USAGE)
    details["usage"]["prompt_tokens_details"] = {"cached_tokens": 2}
    result = feed([chunk("a"), chunk("b", "stop"), json.dumps(details), "[DONE]"])
    assert result.cached_tokens == 2 and result.text == "ab"
    assert feed([chunk("a", "stop"), USAGE, "[DONE]"]).cached_tokens is None  # a server without the field
    details["usage"]["prompt_tokens_details"] = {"cached_tokens": 9}  # more than the 3 prompt tokens
    with pytest.raises(StreamError, match="9 cached tokens of 3"):
        feed([chunk("a", "stop"), json.dumps(details), "[DONE]"])


def test_shared_prefix_chats_share_the_system_prompt_and_resend_their_history():
    import random

    from loadtest.conversation import Conversation

    scenario = scenarios.get("shared-prefix")
    assert scenario.conversational and scenario.turns == (1, 4) and "shared-prefix" in scenarios.SCENARIOS
    assert not scenarios.get("student").conversational
    first, second = Conversation(scenario, random.Random(1)), Conversation(scenario, random.Random(2))
    assert first.messages == second.messages and len(first.messages[0]["content"].split()) == 160
    turn1 = first.ask("hello there")
    first.answered("hello there", "hi")
    turn2 = first.ask("and then")
    assert turn2[: len(turn1)] == turn1  # each turn's prompt extends the previous one
    assert turn2[len(turn1)] == {"role": "assistant", "content": "hi"} and turn2[-1]["content"] == "and then"
    chat = Conversation(scenarios.get("shared-prefix", turns=(2, 2)))
    chat.answered("q", "a")
    assert not chat.done
    chat.answered("q", "a")
    assert chat.done
