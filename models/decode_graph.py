"""A decode step with static shapes, written so `torch.compile` turns all of it into one graph (gpt-fast's idea).

`DecodeGraph(model)` computes the same logits as `CausalLM.forward` on cached rows of one new token
each, but with no data-dependent shape, no `.item()` and no Python branching on values:
- inputs are flat per-row tensors: token (B,), position (B,), the row's block table (B, NB) padded
  with the cache's scratch block, and the flat KV slot its new token is written to (B,);
- the KV write is an in-place `index_copy_` into each layer's own cache tensor, the read a gather of
  the table's blocks; the mask comes from positions by arithmetic;
- attention for one query is written out as products and sums, so the compiler fuses the block gather
  into them (keys and values are read in place from the pool);
- rotary cos/sin come from a table computed once by the model's own rotary module (positions below
  `rotary_positions`), not from cos/sin in the graph: the compiler inlines q's rotation into the
  attention-score loop, where cos/sin per key would cost more than the rest of attention;
- q/k/v and gate/up run as one matmul each: `fuse_projections` makes each group's weights views of one
  fused tensor, so the fused weight costs no memory and the eager model sees the same numbers;
- MoE layers compute their top-k experts for every token from expert weights stacked (E, ...) the
  same way: gathered per routed token (few tokens) or all experts masked by the routing (many tokens).

LoRA adapters (S-LoRA/Punica style, many per batch): when the model's projections are wrapped for
adapters (adapters/multi_lora.py: stacks A (slots, r, in), B^T (slots, r, out)), `lora_stacks()` lists
their current stacks and the forward takes them with a slot per row (-1: base). Each projection adds
sum_r (x . A[slot]) B[slot] written as products and sums, so the compiler reads each row's adapter
rows in place (no per-row weight copies); a slot beyond a stack (an adapter that does not target
that projection) adds nothing. Stack sizes are dynamic dimensions: loading adapters does not recompile.

Padding rows (a batch padded to its size bucket) point at the scratch block and are ignored.
Quantized weights and prompts are left to the eager forward (`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.decoder import CausalLM
from models.layers import apply_rotary

# Routed (token, expert) pairs up to which a MoE layer gathers each pair's expert weights; beyond,
# every expert runs on every token and the routing masks the results (no weight copies).
MOE_GATHER_MAX_PAIRS = 16


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoRABatch:
    """The adapters of one decode batch: stacks in `DecodeGraph.lora_targets` order (None: no adapter
    targets that projection) and each row's slot (B,), -1 for base rows."""

    a: list[Tensor | None]  # (slots, r, in) each
    b: list[Tensor | None]  # (slots, r, out) each (B transposed), scaling folded in
    slots: Tensor  # (B,) long


def lora_delta(x: Tensor, a: Tensor | None, b: Tensor | None, slots: Tensor) -> Tensor | None:
    """x (B, in) -> (B, out): each row's B[slot] @ A[slot] @ x, with a (S, r, in) and b = B^T (S, r, out);
    rows whose slot the stack lacks add 0. Both sums run along a contiguous axis (in; out)."""
    if a is None:
        return None
    present = (slots >= 0) & (slots < a.shape[0])  # (B,)
    index = torch.where(present, slots, torch.zeros_like(slots))
    shrunk = (x[:, None, :] * a[index]).sum(-1)  # (B, r)
    expanded = (shrunk[:, :, None] * b[index]).sum(1)  # (B, out)
    return expanded * present[:, None].to(expanded.dtype)


def _plain_linear(module: nn.Module) -> nn.Linear | None:
    """The nn.Linear holding a projection's float weight (inside a LoRA wrapper), None if quantized."""
    base = getattr(module, "base", module)
    if type(base) is not nn.Linear:
        return None
    return base


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Make the linears' weights (and biases) row slices of one fused tensor; returns (weight, bias)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum out, in)
    has_bias = [lin.bias is not None for lin in linears]
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


class DecodeGraph(nn.Module):
    """The decode forward of a `CausalLM`, static shapes, one new token per row. See the module docstring."""

    def __init__(self, model: CausalLM, rotary_positions: int) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        # cos, sin (P, D) for positions 0..P-1, the same numbers the eager forward computes.
        positions = torch.arange(min(rotary_positions, model.config.max_position_embeddings), device=model.device)
        cos, sin = model.rotary(positions[None], model.dtype)  # (1, P, D) each
        self.rotary_cos, self.rotary_sin = cos[0], sin[0]
        self.qkv: list[tuple[Tensor, Tensor | None]] = []
        self.gate_up: list[Tensor] = []
        self.experts: list[tuple[Tensor, Tensor, Tensor]] = []  # per MoE layer: w1, w3 (E, I, H), w2 (E, H, I)
        # LoRA-wrapped projections (they hold `a_stack`/`b_stack`), per layer in ATTENTION_TARGETS +
        # MLP_TARGETS order, then the LM head; None where a projection is not wrapped.
        self.lora_targets: list[nn.Module | None] = []
        for layer in model.model.layers:
            mlp = getattr(layer, "mlp", None)
            for name in ATTENTION_TARGETS + MLP_TARGETS:
                owner = layer.self_attn if name in ATTENTION_TARGETS else mlp
                module = getattr(owner, name, None) if owner is not None else None
                self.lora_targets.append(module if hasattr(module, "a_stack") else None)
        self.lora_targets.append(model.lm_head if hasattr(model.lm_head, "a_stack") else None)
        for layer in model.model.layers:
            attn = layer.self_attn
            self.qkv.append(_fuse([_plain_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]))
            if hasattr(layer, "mlp"):
                self.gate_up.append(_fuse([_plain_linear(layer.mlp.gate_proj), _plain_linear(layer.mlp.up_proj)])[0])
            else:
                experts = layer.block_sparse_moe.experts
                self.experts.append(tuple(self._stack([getattr(e, n) for e in experts]) for n in ("w1", "w3", "w2")))

    @staticmethod
    def _stack(linears: list[nn.Linear]) -> Tensor:
        """Stack the experts' weights (E, out, in), each expert's weight then a view of its slice."""
        stacked = torch.stack([lin.weight.detach() for lin in linears])
        for i, lin in enumerate(linears):
            lin.weight = nn.Parameter(stacked[i], requires_grad=False)
        return stacked

    @property
    def has_lora(self) -> bool:
        return any(target is not None for target in self.lora_targets)

    def lora_stacks(self) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """The wrapped projections' current A (S, r, in) and B^T (S, r, out) stacks (None where none yet)."""
        a = [getattr(t, "a_stack", None) for t in self.lora_targets]
        b = [getattr(t, "b_stack_t", None) for t in self.lora_targets]
        return a, b

    @staticmethod
    def supports(model: CausalLM) -> bool:
        """Float weights everywhere the graph reads them (int8 models run eager)."""
        for layer in model.model.layers:
            attn = layer.self_attn
            names = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            if hasattr(layer, "mlp"):
                names += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
            else:
                names += [layer.block_sparse_moe.gate] + [
                    getattr(e, n) for e in layer.block_sparse_moe.experts for n in ("w1", "w2", "w3")
                ]
            if any(_plain_linear(m) is None for m in names):
                return False
        return _plain_linear(model.lm_head) is not None and model.model.embed_tokens.weight.is_floating_point()

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        block_tables: Tensor,
        write_slots: Tensor,
        row_valid: Tensor,
        k_cache: list[Tensor],
        v_cache: list[Tensor],
        lora: LoRABatch | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens, positions, write_slots (B,) long; block_tables (B, NB) long; row_valid (B,) float 1/0;
        k_cache, v_cache per layer (blocks, block_size, KVH, D); lora: the batch's adapters or None.
        Returns logits (B, V) and, for MoE, (layers, E) tokens routed to each expert (valid rows only)."""
        config = self.config
        b, nb = block_tables.shape
        block_size = k_cache[0].shape[1]
        length = nb * block_size
        x = self.model.model.embed_tokens(tokens)[:, None]  # (B, 1, H)
        cos, sin = self.rotary_cos[positions][:, None], self.rotary_sin[positions][:, None]  # (B, 1, D)
        key_pos = torch.arange(length, device=tokens.device)  # (L,)
        allowed = key_pos[None, :] <= positions[:, None]  # (B, L)
        if config.sliding_window is not None:
            allowed &= key_pos[None, :] > positions[:, None] - config.sliding_window
        counts: list[Tensor] = []
        moe_index = 0
        per_layer = len(ATTENTION_TARGETS) + len(MLP_TARGETS)
        for i, layer in enumerate(self.model.model.layers):
            adapters = self._adapters(lora, i * per_layer, per_layer)
            h = layer.input_layernorm(x)
            attention_inputs = (cos, sin, allowed, block_tables, write_slots, k_cache[i], v_cache[i])
            x = x + self._attention(layer.self_attn, i, h, *attention_inputs, adapters[: len(ATTENTION_TARGETS)])
            h = layer.post_attention_layernorm(x)
            if hasattr(layer, "mlp"):
                gate_adapter, up_adapter, down_adapter = adapters[len(ATTENTION_TARGETS) :]
                gate_up = F.linear(h[:, 0], self.gate_up[i])  # (B, 2I)
                width = gate_up.shape[-1] // 2
                gate_up = _add_deltas(gate_up, [gate_adapter(h[:, 0]), up_adapter(h[:, 0])], [width, width])
                gate, up = gate_up.chunk(2, dim=-1)  # (B, I) each
                inner = F.silu(gate) * up
                down = _plain_linear(layer.mlp.down_proj)(inner)  # (B, H)
                x = x + _add_deltas(down, [down_adapter(inner)])[:, None]
            else:
                out, layer_counts = self._moe(layer.block_sparse_moe, self.experts[moe_index], h[:, 0], row_valid)
                moe_index += 1
                x = x + out[:, None]
                counts.append(layer_counts)
        x = self.model.model.norm(x)[:, 0]  # (B, H)
        logits = _plain_linear(self.model.lm_head)(x)  # (B, V)
        (head_adapter,) = self._adapters(lora, len(self.lora_targets) - 1, 1)
        logits = _add_deltas(logits, [head_adapter(x)])
        if config.logits_scale != 1.0:
            logits = logits * config.logits_scale
        return logits, torch.stack(counts) if counts else None

    def _attention(
        self,
        attn: nn.Module,
        layer_index: int,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        allowed: Tensor,
        block_tables: Tensor,
        write_slots: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        adapters: list,
    ) -> Tensor:
        b = h.shape[0]
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        weight, bias = self.qkv[layer_index]
        qkv = F.linear(h, weight, bias)[:, 0]  # (B, (H + 2 KVH) * D)
        q_adapter, k_adapter, v_adapter, o_adapter = adapters
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        deltas = [q_adapter(h[:, 0]), k_adapter(h[:, 0]), v_adapter(h[:, 0])]
        qkv = _add_deltas(qkv, deltas, [q_size, kv_size, kv_size])
        q = qkv[:, :q_size].view(b, heads, 1, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(b, kv_heads, 1, head_dim)
        v = qkv[:, q_size + kv_size :].view(b, kv_heads, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        block_size = k_cache.shape[1]
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, write_slots, k[:, :, 0])
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, write_slots, v)
        length = block_tables.shape[1] * block_size
        keys = k_cache[block_tables].view(b, length, kv_heads, head_dim)  # (B, L, KVH, D)
        values = v_cache[block_tables].view(b, length, kv_heads, head_dim)
        # Products and sums written out, not matmuls: the compiler fuses the block gather into the reductions,
        # so keys and values are read in place (measured faster than einsum or SDPA on gathered copies).
        grouped = q.view(b, 1, kv_heads, heads // kv_heads, head_dim)  # (B, 1, KVH, G, D)
        scores = (grouped * keys[:, :, :, None, :]).sum(-1) * attn.scale  # (B, L, KVH, G)
        scores = scores.float().masked_fill(~allowed[:, :, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=1).to(values.dtype)  # over L
        out = (probs[..., None] * values[:, :, :, None, :]).sum(1)  # (B, KVH, G, D)
        out = out.reshape(b, q_size)
        return _add_deltas(_plain_linear(attn.o_proj)(out), [o_adapter(out)])[:, None]  # (B, 1, H)

    def _adapters(self, lora: LoRABatch | None, start: int, count: int) -> list:
        """For targets start..start+count: a function x -> LoRA delta (or None) of the batch's adapters."""
        if lora is None:
            return [_no_delta] * count
        return [
            (lambda x, a=lora.a[i], b=lora.b[i]: lora_delta(x, a, b, lora.slots)) for i in range(start, start + count)
        ]

    def _moe(
        self, block: nn.Module, experts: tuple[Tensor, Tensor, Tensor], h: Tensor, row_valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """h (B, H) -> (out (B, H), counts (E,)). Same routing as models.moe.route."""
        w1, w3, w2 = experts  # (E, I, H), (E, I, H), (E, H, I)
        num_experts, top_k = w1.shape[0], block.top_k
        probs = torch.softmax(block.gate(h), dim=-1, dtype=torch.float)  # (B, E)
        weight, index = torch.topk(probs, top_k, dim=-1)  # (B, k)
        weight = (weight / weight.sum(dim=-1, keepdim=True)).to(h.dtype)
        chosen = F.one_hot(index, num_experts).to(h.dtype)  # (B, k, E)
        counts = (chosen.sum(1) * row_valid[:, None].to(h.dtype)).sum(0)  # (E,)
        b = h.shape[0]
        if b * top_k <= MOE_GATHER_MAX_PAIRS:
            flat = index.reshape(-1)  # (B*k,)
            rows = h.repeat_interleave(top_k, dim=0)[:, None]  # (B*k, 1, H)
            gate = torch.bmm(rows, w1[flat].transpose(1, 2))  # (B*k, 1, I)
            up = torch.bmm(rows, w3[flat].transpose(1, 2))
            out = torch.bmm(F.silu(gate) * up, w2[flat].transpose(1, 2))[:, 0]  # (B*k, H)
            return (out.view(b, top_k, -1) * weight[..., None]).sum(1), counts
        combine = (chosen * weight[..., None]).sum(1)  # (B, E) routing weight of each expert, 0 if not chosen
        gate = torch.einsum("bh,eih->ebi", h, w1)  # (E, B, I)
        up = torch.einsum("bh,eih->ebi", h, w3)
        out = torch.einsum("ebi,ehi->ebh", F.silu(gate) * up, w2)  # (E, B, H)
        return torch.einsum("ebh,be->bh", out, combine), counts


class GreedyChain(nn.Module):
    """`steps` greedy decode steps of a `DecodeGraph` as one graph (a draft model's proposals): each step's
    argmax is the next step's token, and its KV slot comes from the block table by index arithmetic."""

    def __init__(self, graph: DecodeGraph, steps: int) -> None:
        super().__init__()
        self.graph = graph
        self.steps = steps

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        block_tables: Tensor,
        row_valid: Tensor,
        k_cache: list[Tensor],
        v_cache: list[Tensor],
    ) -> Tensor:
        """tokens, positions (B,) long: each row's first token to feed and its position; block_tables
        (B, NB) must cover positions + steps - 1. Returns the proposed tokens (B, steps)."""
        block_size = k_cache[0].shape[1]
        proposed = []
        for _ in range(self.steps):
            blocks = block_tables.gather(1, (positions // block_size)[:, None])[:, 0]  # (B,)
            slots = blocks * block_size + positions % block_size  # (B,)
            logits, _ = self.graph(tokens, positions, block_tables, slots, row_valid, k_cache, v_cache)
            tokens = logits.argmax(dim=-1)  # (B,)
            proposed.append(tokens)
            positions = positions + 1
        return torch.stack(proposed, dim=1)


def _no_delta(x: Tensor) -> None:
    return None


def _add_deltas(y: Tensor, deltas: list[Tensor | None], widths: list[int] | None = None) -> Tensor:
    """y (B, sum of widths) plus the deltas side by side along the last dimension (widths: each delta's
    part of y, needed when several); a None delta adds nothing."""
    if all(d is None for d in deltas):
        return y
    if len(deltas) == 1:
        return y + deltas[0]
    parts = [d if d is not None else y.new_zeros(y.shape[0], w) for d, w in zip(deltas, widths, strict=True)]
    return y + torch.cat(parts, dim=-1)
