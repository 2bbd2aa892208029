"""Many LoRA adapters applied in one batch, unmerged (S-LoRA / Punica style).

`attach(model)` swaps every projection that adapters may target (q, k, v, o, gate, up, down) for a
`MultiLoRALinear` that keeps the base layer and a table of resident adapters. Before a forward,
`LoRAContext.activate` is given each batch row's adapter; rows arrive sorted by adapter, so each
adapter owns one contiguous segment of rows. Each layer then adds, per segment, the adapter's
low-rank product x @ A^T @ B^T (scaling folded into B) on that segment's rows only. Weights are never
merged or swapped per request, so requests of any adapters, and of the base, share one forward.

Two kernels compute the same sum: "segment" runs one pair of matmuls per segment (few large
segments: prefill); "gather" stacks each row's A and B and runs two batched matmuls (many tiny
segments: decode with many adapters), the Punica BGMV idea. `kernel="auto"` picks by segment count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Segment:
    adapter_id: int
    start: int  # first batch row
    end: int  # one past the last batch row


@dataclass
class LoRAContext:
    """Per-model state shared by its MultiLoRALinear layers: which rows use which adapter, this forward."""

    kernel: str = "auto"  # "auto" | "segment" | "gather"
    gather_min_segments: int = 4  # auto: gather kernel when a batch has at least this many adapter segments
    segments: list[Segment] = field(default_factory=list)
    row_adapter: Tensor | None = None  # (B,) adapter id per row (-1: base), for the gather kernel
    use_gather: bool = False

    @contextmanager
    def activate(self, row_adapter_ids: list[int]):
        """row_adapter_ids: adapter id per batch row (-1 for base rows), rows sorted so equal ids are adjacent."""
        segments: list[Segment] = []
        for row, adapter_id in enumerate(row_adapter_ids):
            if segments and segments[-1].adapter_id == adapter_id and segments[-1].end == row:
                segments[-1].end = row + 1
            elif adapter_id >= 0:
                segments.append(Segment(adapter_id, row, row + 1))
        self.segments = segments
        self.row_adapter = torch.tensor(row_adapter_ids)
        self.use_gather = self.kernel == "gather" or (
            self.kernel == "auto" and len(segments) >= self.gather_min_segments
        )
        try:
            yield
        finally:
            self.segments, self.row_adapter = [], None


class MultiLoRALinear(nn.Module):
    """base(x) plus, for each adapter segment of the batch, scaling * B(A(x)) on that segment's rows."""

    def __init__(self, base: nn.Linear, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (A (r, in), B*scaling (out, r))

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        # x (B, T, in) -> (B, T, out)
        y = self.base(x)
        context = self.context
        if not context.segments or not self.adapters:
            return y
        if context.use_gather:
            return self._gather(x, y)
        for segment in context.segments:
            weights = self.adapters.get(segment.adapter_id)
            if weights is not None:
                a, b = weights
                rows = slice(segment.start, segment.end)
                y[rows] += (x[rows] @ a.T) @ b.T  # (b, T, in) @ (in, r) @ (r, out)
        return y

    def _gather(self, x: Tensor, y: Tensor) -> Tensor:
        rows = [s for s in self.context.segments if s.adapter_id in self.adapters]
        if not rows:
            return y
        max_rank = max(self.adapters[s.adapter_id][0].shape[0] for s in rows)
        row_index: list[int] = []
        a_rows: list[Tensor] = []
        b_rows: list[Tensor] = []
        for segment in rows:
            a, b = self.adapters[segment.adapter_id]
            pad = max_rank - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            count = segment.end - segment.start
            row_index.extend(range(segment.start, segment.end))
            a_rows.append(a.expand(count, *a.shape))
            b_rows.append(b.expand(count, *b.shape))
        index = torch.tensor(row_index, device=x.device)
        stacked_a = torch.cat(a_rows)  # (R, r, in)
        stacked_b = torch.cat(b_rows)  # (R, out, r)
        delta = torch.bmm(torch.bmm(x[index], stacked_a.transpose(1, 2)), stacked_b.transpose(1, 2))  # (R, T, out)
        y.index_add_(0, index, delta)
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
