"""What every stage of `modelserve build` shares: the tokenized corpus and validation windows
(`Context`, built once by `make_context`), model and training configs from a preset, the loss
callables of the loop, export to a Hugging Face directory, and the validation metrics of a card.

The stages themselves (which model, which data, which card) are declared in `training.build`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.checkpoint import save_model
from models.config import ModelConfig
from models.decoder import CausalLM
from models.tokenizer import TextTokenizer
from training import data, evaluate
from training.loop import TrainConfig, resolve_device
from training.losses import causal_lm_loss, kd_loss, moe_aux_losses
from training.mup import fold_for_export
from training.optim import OptimConfig
from training.presets import Preset, Shape, Stage

log = logging.getLogger(__name__)


@dataclass
class Context:
    preset: Preset
    out: Path
    tokenizer: TextTokenizer
    streams: dict[str, dict[str, Tensor]]  # split -> domain -> (N,) token ids
    token_bytes: Tensor  # (V,)
    val: dict[str, Tensor]  # domain -> (N, T+1) validation windows, plus "all"
    fingerprint: str
    device: torch.device
    command: str


# ---------------------------------------------------------------- data


def prepare_data(preset: Preset, out: Path, force: bool) -> tuple[TextTokenizer, dict, str]:
    docs = data.load_documents()
    fingerprint = data.corpus_fingerprint(docs)
    split = data.split_documents(docs, preset.val_fraction, preset.train_max_chars)
    tok_dir, cache = out / "tokenizer", out / "_data" / f"tokens-{fingerprint}-{preset.vocab_size}.safetensors"
    if force or not (tok_dir / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        texts = [d.text for domain in data.DOMAINS for d in split["train"][domain]]
        data.train_tokenizer(texts, preset.vocab_size).save(tok_dir)
        cache.unlink(missing_ok=True)
        log.info("tokenizer: %d tokens trained in %.1fs", preset.vocab_size, time.perf_counter() - t0)
    tokenizer = TextTokenizer.load(tok_dir)
    if cache.is_file():
        flat = load_file(str(cache))
    else:
        flat = {f"{s}/{d}": data.encode_documents(tokenizer, split[s][d]) for s in split for d in data.DOMAINS}
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(cache))
    streams: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}}
    for key, tensor in flat.items():
        s, d = key.split("/")
        streams[s][d] = tensor
    return tokenizer, streams, fingerprint


def make_context(preset: Preset, out: Path, force: bool) -> Context:
    tokenizer, streams, fingerprint = prepare_data(preset, out, force)
    val = {d: data.eval_windows(streams["val"][d], preset.seq_len, preset.eval_tokens) for d in data.DOMAINS}
    val["all"] = torch.cat([val[d] for d in data.DOMAINS])
    command = f"python -m service build --preset {preset.name} --out {out}"
    return Context(
        preset,
        out,
        tokenizer,
        streams,
        data.token_byte_lengths(tokenizer),
        val,
        fingerprint,
        resolve_device("auto"),
        command,
    )


# ---------------------------------------------------------------- models


def model_config(ctx: Context, shape: Shape, **changes) -> ModelConfig:
    tok = ctx.tokenizer
    fields = dict(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=ctx.preset.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.tokenizer.token_to_id(data.PAD),
        tie_word_embeddings=False,
    )
    return ModelConfig(**{**fields, **changes})


def lm_loss_fn(aux_coef: float, z_coef: float):
    def loss_fn(model: CausalLM, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, labels = batch
        out = model(ids)
        ce = causal_lm_loss(out.logits, labels)
        if not out.routings:
            return ce, {}
        balance, z = moe_aux_losses(out, model.config.num_local_experts)
        return ce + aux_coef * balance + z_coef * z, {"ce": float(ce), "balance": float(balance), "z": float(z)}

    return loss_fn


def kd_loss_fn(teacher: CausalLM, temperature: float, alpha: float):
    def loss_fn(model: CausalLM, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, labels = batch
        with torch.no_grad():
            teacher_logits = teacher(ids).logits  # (B, T, V)
        return kd_loss(model(ids).logits, teacher_logits, labels, temperature, alpha)

    return loss_fn


def train_config(ctx: Context, name: str, stage: Stage, steps: int | None = None, mup_mult: float | None = None):
    optim = OptimConfig(
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        mup_width_mult=mup_mult,
        layer_lr_decay=stage.layer_lr_decay,
        sam_rho=stage.sam_rho,
    )
    return TrainConfig(
        name=name,
        max_steps=steps or stage.steps,
        optim=optim,
        warmup_steps=stage.warmup,
        eval_interval=stage.eval_interval,
        patience=stage.patience,
        seed=ctx.preset.seed,
        max_seconds=stage.max_seconds,
        run_dir=str(ctx.out / "_runs" / name),
        checkpoint_interval=100,
    )


def export(ctx: Context, model: CausalLM, directory: Path) -> None:
    fold_for_export(model)
    model.config.hidden_dropout = 0.0
    tok = ctx.tokenizer
    generation = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": model.config.pad_token_id,
    }
    save_model(model.cpu(), directory, dtype="float32", generation_config=generation)
    tok.save(directory)
    model.to(ctx.device)


def lm_metrics(ctx: Context, model: CausalLM) -> dict:
    model.eval()
    bpb = {d: round(evaluate.bits_per_byte(model, ctx.val[d], ctx.token_bytes), 4) for d in (*data.DOMAINS, "all")}
    return {"val_bits_per_byte": bpb["all"], "val_bits_per_byte_by_domain": {d: bpb[d] for d in data.DOMAINS}}
