"""The compiled decode step of one served model: `models.decode_graph.DecodeGraph` under `torch.compile`.

Batches are padded to a size bucket (powers of two up to the engine's batch size, and the batch size
itself), so each bucket is one static graph; the number of KV blocks a step reads, and the sizes of
the LoRA stacks (adapter slots, rank), are dynamic dimensions of that graph, so one graph per bucket
serves every context length and every set of resident adapters. A model served with adapters gets a
second graph per bucket for batches that hold adapter rows (base-only batches skip the LoRA work).
A draft model's graphs add its greedy steps chained as one graph per bucket (`run_greedy_chain`).
`warm_up` compiles every bucket before the server reports ready, logging its progress; Inductor's
on-disk caches (FX graph and AOT caches, under `Settings.compile_cache_dir`) make a restart reuse
the compiled code.

Calls skip Dynamo's guard evaluation (`skip_guard_eval_unsafe`: only the guards that tell the cached
graphs apart run) once the call's structure is compiled: the bucket, and which projections have LoRA
stacks (an adapter targeting a projection no resident adapter targeted before changes it, and that
call then runs with full guards and compiles its graph; it is logged). Everything else a call
changes (block-table width, stack sizes, values) is dynamic or data, so the skipped guards could not
fail; skipping them is most of the per-call cost of a compiled function on a CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch._inductor.config
from torch import Tensor

from adapters.registry import AdapterRegistry
from models.decode_graph import DecodeGraph, GreedyChain, LoRABatch
from models.decoder import CausalLM
from models.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

# Every served model's graphs are entries of one code object (DecodeGraph.forward): bucket x variant x model.
# Dynamo's default limit (8 entries) would refuse the rest.
RECOMPILE_LIMIT = 1024
MIN_TABLE_BLOCKS = 2  # block-table width never below this (keeps the dimension dynamic, not specialised)
# Widest block table the graph takes (the compiler bounds the dynamic width at 256); wider rows run eager.
MAX_TABLE_BLOCKS = 256
# Rows that bring several new tokens (speculative verification of k drafts, a draft catching up on accepted
# tokens, a short prompt) run in the graph as one decode row per token while all of them together are at most
# this many: the graph's cost grows with its rows (teacher, CPU: 2.2 ms at 1 row, 3.7 at 4, 4.4 at 5) where
# an eager forward of one row's chunk barely does (4.8 ms at 1 token, 5.7 at 5), so beyond about 8 the eager
# forward is cheaper. Batches of one-token rows use every bucket.
MAX_CHUNK_TOKENS = 8
# Autotuned matrix products (CPU): Inductor benchmarks its C++ GEMM template against MKL for each product's
# shape while compiling and keeps the faster. The template needs the weights as constants of the graph
# (`freezing`), which it packs into its own blocked layout, one copy per graph that uses it. Inductor does
# not store frozen graphs on disk (it bypasses its cache: "mkldnn tensors unpickleable"), so every start
# compiles and tunes them again. AUTOTUNE_OPTIONS go to torch.compile: they make its backend differ from
# the plain one's, so Dynamo never hands a plain graph to a tuned call or the reverse (both are entries of
# DecodeGraph.forward's code); `freezing` is set around the compiling call (`options` does not carry it).
AUTOTUNE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch_size]


class CompiledDecode:
    """Runs decode rows through the compiled graph of their batch-size bucket."""

    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        max_batch_size: int,
        registry: AdapterRegistry | None = None,
        autotune: bool = False,
        chain_steps: int = 0,
    ) -> None:
        """chain_steps > 0 (a draft model's graphs): also compile that many greedy steps as one graph
        (`run_greedy_chain`), so a round of k proposals is a catch-up call plus one chained call."""
        self.graph = DecodeGraph(model, rotary_positions=MAX_TABLE_BLOCKS * cache.block_size)
        # On a CPU the graph's wrapper (the code calling its kernels and matmuls) is generated C++, not Python:
        # measured 7% less per decode step of the student at batch 1, at no cost in compile time. Not for
        # batches with adapters: a C++ wrapper takes each dynamic size (the LoRA stacks' slots and ranks) as a
        # tensor made per call, ~50 of them (+0.27 ms per student step at batch 32), where Python passes ints.
        on_cpu = model.device.type == "cpu"
        self.autotune = autotune and on_cpu
        tuned = AUTOTUNE_OPTIONS if self.autotune else {}
        options = {"cpp_wrapper": True} if on_cpu else {}
        self.compiled = torch.compile(self.graph, dynamic=False, fullgraph=True, options=options | tuned)
        self.compiled_lora = torch.compile(self.graph, dynamic=False, fullgraph=True, options=tuned or None)
        self.chain = None
        if chain_steps > 0:
            chain = GreedyChain(self.graph, chain_steps)
            self.chain = torch.compile(chain, dynamic=False, fullgraph=True, options=options | tuned)
        self.cache = cache
        self.registry = registry if self.graph.has_lora else None
        self.device = model.device
        self.buckets = batch_buckets(max_batch_size)
        self.compiled_structures: set[tuple] = set()  # (bucket, LoRA stacks present or None) compiled so far
        self.warm = False

    @staticmethod
    def supports(model: CausalLM) -> bool:
        return DecodeGraph.supports(model)

    def bucket(self, batch: int) -> int | None:
        return next((size for size in self.buckets if size >= batch), None)

    def accepts(
        self, tokens: list[list[int]], block_tables: list[list[int]], adapters: list[str | None] | None
    ) -> bool:
        """Rows the graph can run: one new token each, or chunks of at most MAX_CHUNK_TOKENS in all; a bucket."""
        if adapters and any(adapters) and self.registry is None:
            return False
        total = sum(len(t) for t in tokens)
        if (total > len(tokens) and total > MAX_CHUNK_TOKENS) or self.bucket(total) is None:
            return False
        return max(len(t) for t in block_tables) <= MAX_TABLE_BLOCKS

    def run_chunks(
        self,
        tokens: list[list[int]],
        block_tables: list[list[int]],
        context_lens: list[int],
        adapters: list[str | None] | None = None,
        all_positions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Rows of one or more new tokens, each token run as a decode row of its own: a row's token j sits at
        position context + j and sees the keys the row's earlier tokens write in the same step (every row
        writes its keys and values before any reads them, and the mask is by position), so a chunk of k + 1
        tokens (speculative verification) is k + 1 decode rows in one graph call.
        Returns logits (B, V) at each row's last token, or (B, T, V) at every position with all_positions,
        and the MoE expert counts (layers, E) or None."""
        if len(tokens) == sum(len(t) for t in tokens) and not all_positions:  # plain decode: one token a row
            return self.run([t[0] for t in tokens], block_tables, context_lens, adapters)
        flat_tokens: list[int] = []
        flat_tables: list[list[int]] = []
        flat_contexts: list[int] = []
        flat_adapters: list[str | None] = []
        offsets: list[int] = []  # each row's first index in the flat batch
        for r, chunk in enumerate(tokens):
            offsets.append(len(flat_tokens))
            flat_tokens += chunk
            flat_tables += [block_tables[r]] * len(chunk)
            flat_contexts += [context_lens[r] + j for j in range(len(chunk))]
            flat_adapters += [adapters[r] if adapters else None] * len(chunk)
        logits, counts = self.run(flat_tokens, flat_tables, flat_contexts, flat_adapters)  # (N, V)
        if not all_positions:
            last = torch.tensor([o + len(c) - 1 for o, c in zip(offsets, tokens)], device=logits.device)
            return logits[last], counts  # (B, V)
        longest = max(len(c) for c in tokens)
        index = [[o + min(j, len(c) - 1) for j in range(longest)] for o, c in zip(offsets, tokens)]
        return logits[torch.tensor(index, device=logits.device)], counts  # (B, T, V); padding repeats the last

    @torch.inference_mode()
    def warm_up(self, progress: Callable[[str], None] = log.info) -> float:
        """Compile every bucket (steps of padding rows only: they write the scratch block), with and without
        the resident adapters' stacks when the model serves adapters, and a draft's greedy chain. Returns seconds."""
        started = time.perf_counter()
        has_stacks = any(stack is not None for stack in self.graph.lora_stacks()[0])
        variants = [None] + (["lora"] if self.registry is not None and has_stacks else [])
        for i, size in enumerate(self.buckets):
            for variant in variants:
                rows = [None] * size if variant is None else ["\0warm-up"] * size  # not resident: slot -1
                self._call([0] * size, [[]] * size, [0] * size, rows, real=size, valid=0)
            if self.chain is not None:
                self._chain_call([0] * size, [[]] * size, [0] * size, real=0)
            both = ", with and without adapters" if len(variants) > 1 else ""
            elapsed = time.perf_counter() - started
            progress(f"compiled decode: bucket {i + 1}/{len(self.buckets)} (batch {size}{both}) after {elapsed:.1f} s")
        self.warm = True
        return time.perf_counter() - started

    @torch.inference_mode()
    def run(
        self,
        tokens: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        adapters: list[str | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """One decode token per row: logits (B, V) and the MoE expert counts (layers, E) or None."""
        size = self.bucket(len(tokens))
        pad = size - len(tokens)
        rows = (adapters or [None] * len(tokens)) + [None] * pad
        logits, counts = self._call(
            tokens + [0] * pad, block_tables + [[]] * pad, context_lens + [0] * pad, rows, real=len(tokens)
        )
        return logits[: len(tokens)], counts

    def accepts_chain(self, block_tables: list[list[int]]) -> bool:
        return self.chain is not None and self.accepts([[0]] * len(block_tables), block_tables, None)

    @torch.inference_mode()
    def run_greedy_chain(
        self, tokens: list[int], block_tables: list[list[int]], context_lens: list[int]
    ) -> list[list[int]]:
        """Feed each row's token at its context length, then its own argmax, chain_steps times in one graph
        call; the tables must hold blocks up to context + chain_steps. Returns each row's proposed tokens."""
        size = self.bucket(len(tokens))
        pad = size - len(tokens)
        proposed = self._chain_call(
            tokens + [0] * pad, block_tables + [[]] * pad, context_lens + [0] * pad, real=len(tokens)
        )
        return proposed[: len(tokens)].tolist()

    def _chain_call(
        self, tokens: list[int], block_tables: list[list[int]], context_lens: list[int], real: int
    ) -> Tensor:
        device = self.device
        table = torch.tensor(self._padded_tables(block_tables), device=device)  # (B, NB)
        args = (
            torch.tensor(tokens, device=device),
            torch.tensor(context_lens, device=device),
            table,
            torch.tensor([float(r < real) for r in range(len(tokens))], device=device),
            self.cache.k,
            self.cache.v,
        )
        return self._guarded(("chain", len(tokens)), self.chain, args, table)  # (B, chain_steps)

    def _call(
        self,
        tokens: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        adapters: list[str | None],
        real: int,
        valid: int = 1,
    ) -> tuple[Tensor, Tensor | None]:
        cache = self.cache
        size, scratch, block_size = len(tokens), cache.scratch_block, cache.block_size
        tables = self._padded_tables(block_tables)
        slots = [
            tables[r][context_lens[r] // block_size] * block_size + context_lens[r] % block_size
            if r < real
            else scratch * block_size
            for r in range(size)
        ]
        device = self.device
        table_tensor = torch.tensor(tables, device=device)  # (B, NB)
        args = (
            torch.tensor(tokens, device=device),
            torch.tensor(context_lens, device=device),
            table_tensor,
            torch.tensor(slots, device=device),
            torch.tensor([float(valid and r < real) for r in range(size)], device=device),
            cache.k,
            cache.v,
        )
        if self.registry is None or not any(adapters):
            return self._guarded((size, None), self.compiled, (*args, None), table_tensor)
        with self.registry.lock:  # the stacks are not written (adapter loads) during the forward
            a, b = self.graph.lora_stacks()
            lora = LoRABatch(a, b, torch.tensor(self.registry.slots_for(adapters), device=device))
            present = tuple(stack is not None for stack in a)
            return self._guarded((size, present), self.compiled_lora, (*args, lora), table_tensor, lora)

    def _padded_tables(self, block_tables: list[list[int]]) -> list[list[int]]:
        """Every row's table padded with the scratch block to one width (padding rows: all scratch)."""
        width = max(MIN_TABLE_BLOCKS, max(len(t) for t in block_tables))
        return [t + [self.cache.scratch_block] * (width - len(t)) for t in block_tables]

    def _guarded(self, structure: tuple, compiled: Callable, args: tuple, table: Tensor, lora: LoRABatch | None = None):
        """Call a compiled graph; guards are skipped once this structure has been compiled."""
        if structure in self.compiled_structures:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return compiled(*args)
        if self.warm:
            log.info("compiled decode: compiling a new structure %s while serving", structure)
        torch._dynamo.mark_dynamic(table, 1, min=MIN_TABLE_BLOCKS, max=MAX_TABLE_BLOCKS)
        if lora is not None:  # adapter slots and rank (at least 2 each, see adapters/multi_lora.py)
            for stack in (s for s in lora.a + lora.b if s is not None):  # A (S, r, in), B^T (S, r, out)
                torch._dynamo.maybe_mark_dynamic(stack, 0)
                torch._dynamo.maybe_mark_dynamic(stack, 1)
        # The limit is patched for this call only (a global setting may be reset by other code in the process).
        limits = torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=RECOMPILE_LIMIT
        )
        with limits, torch._inductor.config.patch(freezing=self.autotune):
            result = compiled(*args)
        self.compiled_structures.add(structure)
        return result
