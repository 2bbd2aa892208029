"""The compiled decode step of one served model: `models.decode_graph.DecodeGraph` under `torch.compile`.

Batches are padded to a size bucket (powers of two up to the engine's batch size, and the batch size
itself), so each bucket is one static graph; the number of KV blocks a step reads is a dynamic
dimension of that graph (at least 2, so sizes 0/1 are never specialised), so one graph per bucket
serves every context length. `warm_up` compiles every bucket before the server reports ready,
logging its progress; Inductor's on-disk caches (FX graph and AOT caches, under the directory
`Settings.compile_cache_dir` names) make a restart reuse the compiled code.

After warm-up, calls skip Dynamo's guard evaluation (`skip_guard_eval_unsafe`: only the guards that
tell the cached graphs apart run), which is safe here because every call's inputs have the dtypes,
devices and ranks of the warm-up's and only the bucketed sizes differ; that is most of the per-call
cost of a compiled function on a CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from models.decode_graph import DecodeGraph
from models.decoder import CausalLM
from models.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

MIN_TABLE_BLOCKS = 2  # block-table width never below this (keeps the dimension dynamic, not specialised)
# Widest block table the graph takes (the compiler bounds the dynamic width at 256); wider rows run eager.
MAX_TABLE_BLOCKS = 256


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch_size]


class CompiledDecode:
    """Runs decode rows (no adapters) through the compiled graph of their batch-size bucket."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, max_batch_size: int) -> None:
        self.graph = DecodeGraph(model)
        self.compiled = torch.compile(self.graph, dynamic=False, fullgraph=True)
        self.cache = cache
        self.device = model.device
        self.buckets = batch_buckets(max_batch_size)
        self.warm = False

    @staticmethod
    def supports(model: CausalLM) -> bool:
        return DecodeGraph.supports(model)

    def bucket(self, batch: int) -> int | None:
        return next((size for size in self.buckets if size >= batch), None)

    def accepts(self, batch: int, block_tables: list[list[int]]) -> bool:
        return self.bucket(batch) is not None and max(len(t) for t in block_tables) <= MAX_TABLE_BLOCKS

    @torch.inference_mode()
    def warm_up(self, progress: Callable[[str], None] = log.info) -> float:
        """Compile every bucket (a step of padding rows only: it writes the scratch block). Returns seconds."""
        started = time.perf_counter()
        for i, size in enumerate(self.buckets):
            self._call([0] * size, [[]] * size, [0] * size, size, valid=0)
            progress(
                f"compiled decode: bucket {i + 1}/{len(self.buckets)} (batch {size}) "
                f"after {time.perf_counter() - started:.1f} s"
            )
        self.warm = True
        return time.perf_counter() - started

    @torch.inference_mode()
    def run(
        self, tokens: list[int], block_tables: list[list[int]], context_lens: list[int]
    ) -> tuple[Tensor, Tensor | None]:
        """One decode token per row: logits (B, V) and the MoE expert counts (layers, E) or None."""
        size = self.bucket(len(tokens))
        pad = size - len(tokens)
        logits, counts = self._call(
            tokens + [0] * pad, block_tables + [[]] * pad, context_lens + [0] * pad, len(tokens)
        )
        return logits[: len(tokens)], counts

    def _call(
        self, tokens: list[int], block_tables: list[list[int]], context_lens: list[int], real: int, valid: int = 1
    ) -> tuple[Tensor, Tensor | None]:
        cache = self.cache
        size, scratch, block_size = len(tokens), cache.scratch_block, cache.block_size
        width = max(MIN_TABLE_BLOCKS, max(len(t) for t in block_tables))
        tables = [t + [scratch] * (width - len(t)) for t in block_tables]  # padding rows: all scratch
        slots = [
            tables[r][context_lens[r] // block_size] * block_size + context_lens[r] % block_size
            if r < real
            else scratch * block_size
            for r in range(size)
        ]
        device = self.device
        table_tensor = torch.tensor(tables, device=device)  # (B, NB)
        torch._dynamo.mark_dynamic(table_tensor, 1, min=MIN_TABLE_BLOCKS, max=MAX_TABLE_BLOCKS)
        args = (
            torch.tensor(tokens, device=device),
            torch.tensor(context_lens, device=device),
            table_tensor,
            torch.tensor(slots, device=device),
            torch.tensor([float(valid and r < real) for r in range(size)], device=device),
            cache.k,
            cache.v,
        )
        if not self.warm:
            return self.compiled(*args)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.compiled(*args)
