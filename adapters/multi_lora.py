"""Many LoRA adapters applied in one batch, unmerged (S-LoRA / Punica style).

`attach(model)` swaps every projection that adapters may target (q, k, v, o, gate, up, down, and the
LM head, which small task adapters need to reach rare output tokens) for a
`MultiLoRALinear` that keeps the base layer and the resident adapters' weights stacked by slot:
A as (slots, rank, in) and B (scaling folded in) as (slots, out, rank), ranks zero-padded to the
largest resident rank, which leaves every product exact. Before a forward, `LoRAContext.activate`
gets each batch row's adapter slot; rows arrive sorted by adapter, so each adapter owns one
contiguous segment of rows. Each layer then adds x @ A^T @ B^T on its adapter rows only. Weights
are never merged or swapped per request, so requests of any adapters, and of the base, share one
forward.

Two kernels compute the same sum: "segment" runs one pair of matmuls per adapter segment (few large
segments: prefill); "gather" indexes each row's A and B out of the stacks and runs two batched
matmuls (many small segments: decode with many adapters), the Punica BGMV idea. The row and slot
index tensors are built once per forward in the context, not per layer. `kernel="auto"` picks by
the number of segments.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class Segment:
    slot: int
    start: int  # first batch row
    end: int  # one past the last batch row


@dataclass
class LoRAContext:
    """Per-model state shared by its MultiLoRALinear layers: which rows use which adapter, this forward."""

    kernel: str = "auto"  # "auto" | "segment" | "gather"
    gather_min_segments: int = 4  # auto: gather kernel when a batch has at least this many adapter segments
    segments: list[Segment] = field(default_factory=list)
    rows: Tensor | None = None  # (R,) batch rows that use an adapter
    slots: Tensor | None = None  # (R,) their adapter slots
    all_rows: bool = False  # every batch row uses an adapter (rows is then 0..B-1)
    use_gather: bool = False
    # Gathered per-row weights stay valid while the batch's slots and the resident adapters are unchanged
    # (consecutive decode steps of the same batch): key = (row slots, version); version moves on any change.
    version: int = 0
    gather_key: tuple | None = None

    @contextmanager
    def activate(self, row_slots: list[int], device: torch.device | str = "cpu"):
        """row_slots: adapter slot per batch row (-1 for base rows), rows sorted so equal slots are adjacent."""
        segments: list[Segment] = []
        for row, slot in enumerate(row_slots):
            if slot < 0:
                continue
            if segments and segments[-1].slot == slot and segments[-1].end == row:
                segments[-1].end = row + 1
            else:
                segments.append(Segment(slot, row, row + 1))
        self.segments = segments
        self.use_gather = self.kernel == "gather" or (
            self.kernel == "auto" and len(segments) >= self.gather_min_segments
        )
        if self.use_gather:
            rows = [row for row, slot in enumerate(row_slots) if slot >= 0]
            self.rows = torch.tensor(rows, device=device)
            self.slots = torch.tensor([row_slots[row] for row in rows], device=device)
            self.all_rows = len(rows) == len(row_slots)
            self.gather_key = (tuple(row_slots), self.version)
        try:
            yield
        finally:
            self.segments, self.rows, self.slots = [], None, None


class MultiLoRALinear(nn.Module):
    """base(x) plus, for each batch row with an adapter, B(A(x)) of that row's adapter (scaling in B)."""

    def __init__(self, base: nn.Linear, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        self.a_stack: Tensor | None = None  # (slots, rank, in)
        self.b_stack: Tensor | None = None  # (slots, out, rank), scaling folded in
        # The same B laid out (slots, rank, out): the compiled decode step's expand sums over rank while
        # running along `out` in memory order (vectorised), which the (out, rank) layout does not allow.
        self.b_stack_t: Tensor | None = None
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter resident there (absent: zeros)
        self._gathered: tuple[tuple, Tensor, Tensor] | None = None  # (key, A^T (R, in, r), B^T (R, r, out))

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    # ---- slots ----
    def set_adapter(self, slot: int, a: Tensor, b: Tensor) -> None:
        """Install A (r, in) and B*scaling (out, r) at `slot`, growing the stacks as needed."""
        rank = a.shape[0]
        self._reserve(slot + 1, rank, a)
        self.a_stack[slot].zero_()
        self.b_stack[slot].zero_()
        self.a_stack[slot, :rank] = a
        self.b_stack[slot, :, :rank] = b
        self.b_stack_t[slot].zero_()
        self.b_stack_t[slot, :rank] = b.T
        self.ranks[slot] = rank
        self.context.version += 1

    def remove_adapter(self, slot: int) -> None:
        if self.ranks.pop(slot, None) is not None:
            self.a_stack[slot].zero_()
            self.b_stack[slot].zero_()
            self.b_stack_t[slot].zero_()
            self.context.version += 1

    def _gather(self) -> tuple[Tensor, Tensor]:
        """Each adapter row's A^T (R, in, r) and B^T (R, r, out), reused across steps with the same key."""
        key = self.context.gather_key
        if self._gathered is None or self._gathered[0] != key:
            slots = self.context.slots
            a_t = self.a_stack[slots].transpose(1, 2).contiguous()
            b_t = self.b_stack[slots].transpose(1, 2).contiguous()
            self._gathered = (key, a_t, b_t)
        return self._gathered[1], self._gathered[2]

    def _reserve(self, slots: int, rank: int, like: Tensor) -> None:
        have_slots = 0 if self.a_stack is None else self.a_stack.shape[0]
        have_rank = 0 if self.a_stack is None else self.a_stack.shape[1]
        if slots <= have_slots and rank <= have_rank:
            return
        # At least 2 slots and rank 2 (zero-padded ranks are exact): a compiled decode step takes the stacks'
        # sizes as dynamic dimensions, which sizes 0 and 1 would specialise.
        new_slots, new_rank = max(slots, 2 * have_slots, 2), max(rank, have_rank, 2)
        a = like.new_zeros(new_slots, new_rank, self.in_features)
        b = like.new_zeros(new_slots, self.out_features, new_rank)
        if self.a_stack is not None:
            a[:have_slots, :have_rank] = self.a_stack
            b[:have_slots, :, :have_rank] = self.b_stack
        self.a_stack, self.b_stack = a, b
        self.b_stack_t = b.transpose(1, 2).contiguous()  # (slots, rank, out)

    # ---- forward ----
    def forward(self, x: Tensor) -> Tensor:
        # x (B, T, in) -> (B, T, out); or (B, in) -> (B, out) (the LM head at one position per row)
        y = self.base(x)
        context = self.context
        if not context.segments or not self.ranks:
            return y
        if x.dim() == 2:
            return self.forward_rows(x[:, None], y[:, None])[:, 0]
        return self.forward_rows(x, y)

    def forward_rows(self, x: Tensor, y: Tensor) -> Tensor:
        """Add each row's adapter product to y. x (B, T, in), y (B, T, out) = base(x)."""
        context = self.context
        if context.use_gather:
            a_t, b_t = self._gather()  # (R, in, r), (R, r, out)
            if context.all_rows:
                return y.baddbmm_(torch.bmm(x, a_t), b_t)  # (B, T, out)
            delta = torch.bmm(torch.bmm(x[context.rows], a_t), b_t)  # (R, T, out)
            return y.index_add_(0, context.rows, delta)
        for segment in context.segments:
            rank = self.ranks.get(segment.slot)
            if rank:
                a = self.a_stack[segment.slot, :rank]  # (r, in)
                b = self.b_stack[segment.slot, :, :rank]  # (out, r)
                rows = slice(segment.start, segment.end)
                y[rows] += (x[rows] @ a.T) @ b.T  # (b, T, in) @ (in, r) @ (r, out)
        return y


def attach(model: nn.Module, context: LoRAContext) -> dict[str, MultiLoRALinear]:
    """Swap every targetable Linear for a MultiLoRALinear; returns them by module path."""
    wrapped: dict[str, MultiLoRALinear] = {}
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETABLE and isinstance(child, nn.Linear):
                layer = MultiLoRALinear(child, context)
                setattr(module, child_name, layer)
                wrapped[f"{path}.{child_name}" if path else child_name] = layer
    return wrapped
