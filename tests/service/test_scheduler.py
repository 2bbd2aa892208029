"""The scheduler alone: token budget, decode first, chunked prefill, admission by rows and KV blocks, preemption."""

from __future__ import annotations

from service.engine.block_manager import BlockManager
from service.engine.scheduler import Scheduler, SchedulerConfig
from service.engine.sequence import Sequence
from service.engine.types import GenerationRequest, SamplingParams


def seq(name: str, prompt_len: int) -> Sequence:
    request = GenerationRequest(name, "m", list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=64))
    return Sequence(request, lambda event: None, detokenizer=None, generator=None)


def scheduler(blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(block_size=block_size, **config), BlockManager(blocks, block_size), 256)


def advance(rows) -> None:
    """What the worker does after a forward: count the fed tokens; sampled rows get one new token."""
    for row in rows:
        row.sequence.num_computed += len(row.tokens)
        if row.needs_sample:
            row.sequence.output_ids.append(7)


def test_decode_rows_come_first_and_prefill_is_chunked_by_the_token_budget():
    s = scheduler(max_tokens_per_step=10)
    a, b = seq("a", 3), seq("b", 25)
    s.waiting.extend([a, b])
    first = s.schedule()
    assert [(r.sequence.request_id, len(r.tokens), r.needs_sample) for r in first] == [("a", 3, True), ("b", 7, False)]
    advance(first)
    second = s.schedule()  # a decodes (1 token) before b's next chunk (9 = what is left of 10)
    assert [(r.sequence.request_id, len(r.tokens)) for r in second] == [("a", 1), ("b", 9)]
    assert second[1].context_len == 7


def test_admission_stops_at_max_batch_size_and_keeps_fifo_order():
    s = scheduler(max_batch_size=2)
    s.waiting.extend([seq("a", 2), seq("b", 2), seq("c", 2)])
    rows = s.schedule()
    assert [r.sequence.request_id for r in rows] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_admission_waits_for_blocks_and_a_full_pool_preempts_the_newest():
    s = scheduler(blocks=4, block_size=4)  # 16 tokens of KV in all
    a, b = seq("a", 8), seq("b", 8)
    s.waiting.extend([a, b])
    advance(s.schedule())  # a: 2 blocks, b: 2 blocks; the pool is full
    assert s.blocks.num_free == 0 and len(s.running) == 2
    rows = s.schedule()  # a needs a 3rd block for its 9th token: b (the newest) is preempted
    assert [r.sequence.request_id for r in rows] == ["a"]
    assert list(s.waiting) == [b] and b.num_computed == 0 and b.num_preemptions == 1 and not b.table.blocks
    assert b.output_ids == [7]  # its output so far is kept, to be recomputed with the prompt
    assert s.blocks.stats.preemptions == 1
    advance(rows)
    s.remove(a)
    s.blocks.free(a.table)
    again = s.schedule()  # b comes back: prompt + its output recomputed in one chunk, then it samples
    assert [(r.sequence.request_id, len(r.tokens), r.needs_sample) for r in again] == [("b", 9, True)]


def test_a_sequence_alone_larger_than_the_free_pool_waits_instead_of_failing():
    s = scheduler(blocks=2, block_size=4, max_tokens_per_step=64)
    big, small = seq("big", 30), seq("small", 2)
    s.waiting.extend([big, small])
    rows = s.schedule()  # big takes the 2 blocks for its first 8 tokens (a chunk); small waits
    assert [(r.sequence.request_id, len(r.tokens)) for r in rows] == [("big", 8)]
    assert list(s.waiting) == [small]
