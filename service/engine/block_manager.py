"""KV block manager of one model: who holds which blocks of the paged cache, and the prefix cache.

Blocks are reference-counted. A sequence's block table lists its blocks in position order; blocks
are taken as its tokens arrive and given back when it ends or is preempted. With prefix caching, a
*full* block whose keys and values were computed by a successful step is registered under a hash
chained over the previous block's hash, the adapter's load identity and the block's token ids
(blake2b: a collision cannot be crafted, as vLLM found it must be). A new sequence takes every cached
block of its prefix (sharing them, ref count + 1) and computes only the rest. A block whose count
drops to 0 stays cached, on the free queue in least-recently-used order: it is evicted (its hash
forgotten) only when a fresh block is needed and none is uncached.

A prefix computed under adapter X is never reused for adapter Y, for the base, or for another
adapter later loaded under X's name: the identity differs.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from models.kv_cache import blocks_for


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (admissions)
    hits: int = 0  # of those, tokens served from cached blocks
    preemptions: int = 0


@dataclass
class BlockTable:
    """The blocks of one sequence and the chained hashes of its registered (full, computed) blocks."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    identity: str = ""  # adapter load identity ("" for the base model)


def block_hash(parent: bytes, identity: str, tokens: list[int]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(identity.encode())
    digest.update(b"\0")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # eviction order
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, cached or not)."""
        return len(self.free_queue)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def usage(self) -> float:
        """Blocks held by sequences over the pool (cached blocks that can be evicted count as free)."""
        return self.num_held / self.num_blocks

    # ---- prefix cache ----
    def match_prefix(self, table: BlockTable, tokens: list[int]) -> int:
        """Take the cached blocks of tokens' prefix into an empty table; returns the tokens they hold.

        At least the last token is left to compute (its logits are needed), so a prompt that is all
        cached still recomputes its last block."""
        self.stats.queries += len(tokens)
        if not self.enable_prefix_caching:
            return 0
        usable = (len(tokens) - 1) // self.block_size
        parent = b""
        for i in range(usable):
            digest = block_hash(parent, table.identity, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(digest)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(digest)
            parent = digest
        hit = len(table.blocks) * self.block_size
        self.stats.hits += hit
        return hit

    def has_unregistered(self, table: BlockTable, num_computed: int) -> bool:
        """True when a full computed block is not registered yet (cheap: the per-step check)."""
        return self.enable_prefix_caching and (len(table.hashes) + 1) * self.block_size <= num_computed

    def register(self, table: BlockTable, tokens: list[int], num_computed: int) -> None:
        """Register the table's full blocks whose keys and values are computed (call after a successful step)."""
        if not self.has_unregistered(table, num_computed):
            return
        while (len(table.hashes) + 1) * self.block_size <= num_computed:
            i = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else b""
            digest = block_hash(parent, table.identity, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = table.blocks[i]
            if digest not in self.cached and self.hash_of[block] is None:
                self.cached[digest] = block
                self.hash_of[block] = digest
            table.hashes.append(digest)

    # ---- allocation ----
    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Give the table enough blocks for num_tokens; False (nothing taken) when the pool is short."""
        needed = blocks_for(num_tokens, self.block_size) - len(table.blocks)
        if needed <= 0:
            return True
        if needed > self.num_free:
            return False
        for _ in range(needed):
            block, _ = self.free_queue.popitem(last=False)  # least recently freed first
            self._forget(block)
            self.ref_counts[block] = 1
            table.blocks.append(block)
        return True

    def shrink(self, table: BlockTable, num_tokens: int) -> None:
        """Give back the blocks past what num_tokens need (rejected speculative tokens)."""
        keep = max(blocks_for(num_tokens, self.block_size), len(table.hashes))
        if keep < len(table.blocks):
            self._release(table.blocks[keep:])
            del table.blocks[keep:]

    def free(self, table: BlockTable) -> None:
        """Give back all of a table's blocks (finish, abort, preemption); cached ones stay cached."""
        self._release(table.blocks)
        table.blocks.clear()
        table.hashes.clear()

    # ---- internals ----
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # a sequence's tail is the least likely to be shared: evicted first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.hash_of[block] is None:
                    self.free_queue[block] = None
                    self.free_queue.move_to_end(block, last=False)  # uncached blocks are handed out first
                else:
                    self.free_queue[block] = None

    def _forget(self, block: int) -> None:
        digest = self.hash_of[block]
        if digest is not None:
            self.hash_of[block] = None
            if self.cached.get(digest) == block:
                del self.cached[digest]

    def check(self) -> None:
        """Every block is held (count > 0) or free, and cached entries point at blocks carrying their hash."""
        for block in range(self.num_blocks):
            free = block in self.free_queue
            if free == (self.ref_counts[block] > 0) or self.ref_counts[block] < 0:
                raise AssertionError(f"block {block}: ref count {self.ref_counts[block]}, free={free}")
        for digest, block in self.cached.items():
            if self.hash_of[block] != digest:
                raise AssertionError(f"cached block {block} lost its hash")
