"""`modelserve build`: train the served zoo into Hugging Face / PEFT directories under one output dir.

Stages, in order (each skipped when its directory already has a card.json, unless force):

1. ``tokenizer/``: byte-level BPE on the training split (`training.data`); token streams cached in ``_data/``.
2. ``teacher/``: the largest dense llama the preset's budget allows; μP when the preset sets a base width
   (tiny, large; folded at export), standard parametrisation in demo (it measured better there).
3. ``student/``: a much smaller llama distilled from the teacher (`training.losses.kd_loss`).
4. ``controls/student-scratch/``: the student architecture trained from scratch on the same batches
   (same seed, same steps): distillation's control. Kept as a comparison artifact, not served.
5. ``moe/``: mixtral, 8 experts, top-2, with the Switch load-balancing loss and the router z-loss.
6. ``controls/moe-dense/``: a llama with the MoE's active parameters (intermediate = top_k x expert
   intermediate), trained on the same batches: the MoE's control.
7. ``adapters/<name>/``: PEFT LoRA adapters (`training.presets.AdapterJob`): ``student-upper`` and
   ``student-lower`` (tasks, exact match, prompt formats in `training.tasks`), ``student-code``
   (code domain) and ``moe-english`` (English domain), both measured in held-out bits per byte.

Every model directory holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, README.md and card.json. Training logs and resumable checkpoints go to
``_runs/<name>/``. The summary is ``zoo.json`` and ``zoo.md``. Served models: teacher, student, moe.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.decoder import CausalLM
from models.tokenizer import TextTokenizer
from training import data, evaluate, tasks
from training.cards import read_card, write_card
from training.loop import RunRecord, TrainConfig, resolve_device, train
from training.lora import LoraSpec, apply_lora, save_adapter
from training.losses import causal_lm_loss, kd_loss, moe_aux_losses
from training.mup import fold_for_export, mup_config, mup_init, width_mult
from training.optim import OptimConfig
from training.presets import AdapterJob, Preset, Shape, Stage, get_preset

log = logging.getLogger(__name__)
SERVED = ("teacher", "student", "moe")


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


def train_model(
    ctx: Context,
    name: str,
    directory: Path,
    config: ModelConfig,
    stage: Stage,
    summary: str,
    teacher: CausalLM | None = None,
    steps: int | None = None,
    mup_base: int | None = None,
) -> dict:
    p = ctx.preset
    t0 = time.perf_counter()
    torch.manual_seed(p.seed)
    config = config.replace(hidden_dropout=stage.dropout)
    mup_mult = None
    if mup_base is not None:
        config, mup_mult = mup_config(config, mup_base), width_mult(config, mup_base)
    model = CausalLM(config)
    if mup_base is not None:
        mup_init(model, mup_base)
    sampler = data.BatchSampler(ctx.streams["train"], p.domain_weights, stage.batch_size, p.seq_len, p.seed)
    if teacher is not None:
        loss_fn = kd_loss_fn(teacher, p.distill.temperature, p.distill.alpha)
    else:
        loss_fn = lm_loss_fn(p.router_aux_coef, p.router_z_coef)
    record = train(
        model,
        loss_fn,
        sampler,
        train_config(ctx, name, stage, steps, mup_mult),
        eval_fn=lambda m: evaluate.val_loss(m, ctx.val["all"]),
    )
    export(ctx, model, directory)
    card = _model_card(ctx, name, model, record, summary, time.perf_counter() - t0)
    card["parametrization"] = f"muP (base width {mup_base})" if mup_base else "standard"
    if teacher is not None:
        card["distillation"] = asdict(p.distill)
    if config.is_moe:
        card["router"] = {
            "aux_coef": p.router_aux_coef,
            "z_coef": p.router_z_coef,
            "expert_load_val": evaluate.expert_load(model, ctx.val["all"]),
        }
    return write_card(directory, card)


def _model_card(ctx: Context, name: str, model: CausalLM, record: RunRecord, summary: str, seconds: float) -> dict:
    c = model.config
    params = c.num_parameters()
    arch = {
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "heads": c.num_attention_heads,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
    }
    if c.is_moe:
        arch |= {"experts": c.num_local_experts, "top_k": c.num_experts_per_tok}
    return {
        "name": name,
        "summary": summary,
        "architecture": arch,
        "parameters": params["total"],
        "active_parameters": params["active"],
        "training_tokens": record.tokens,
        "training_steps": record.steps,
        "training_seconds": round(record.seconds, 1),
        "build_seconds": round(seconds, 1),
        "stopped_early": record.stopped_early,
        "hit_time_limit": record.hit_time_limit,
        "best_val_loss": round(record.best_val_loss, 4),
        **lm_metrics(ctx, model),
        "corpus": f"stdlib code + pydoc topics ({ctx.fingerprint})",
        "seq_len": ctx.preset.seq_len,
        "device": record.device,
        "command": ctx.command,
        "log": f"_runs/{name}/log.json",
    }


# ---------------------------------------------------------------- adapters


def train_adapter(ctx: Context, job: AdapterJob, directory: Path) -> dict:
    p = ctx.preset
    t0 = time.perf_counter()
    base_dir = ctx.out / job.base
    model = load_model(base_dir).to(ctx.device)
    torch.manual_seed(p.seed)
    stage = p.task_stage if job.kind == "task" else p.domain_stage
    spec = LoraSpec(r=job.r, lora_alpha=job.alpha, target_modules=job.target_modules)
    if job.kind == "task":
        test = tasks.make_examples(job.target, p.task_test_examples, "test", p.seed)
        base_metric = tasks.exact_match(model, ctx.tokenizer, test)
        ids, labels = tasks.encode_examples(
            ctx.tokenizer, tasks.make_examples(job.target, p.task_train_examples, "train", p.seed)
        )
        sampler = tasks.TaskSampler(ids, labels, stage.batch_size, p.seed)
        eval_fn = None
    else:
        base_metric = evaluate.bits_per_byte(model, ctx.val[job.target], ctx.token_bytes)
        sampler = data.BatchSampler(ctx.streams["train"], {job.target: 1.0}, stage.batch_size, p.seq_len, p.seed)
        eval_fn = lambda m: evaluate.val_loss(m, ctx.val[job.target])  # noqa: E731
    apply_lora(model, spec)
    cfg = train_config(ctx, job.name, stage)
    record = train(model, lm_loss_fn(0.0, 0.0), sampler, cfg, eval_fn=eval_fn)
    if job.kind == "task":
        metric = {
            "metric": "exact_match",
            "value": tasks.exact_match(model, ctx.tokenizer, test),
            "base_value": base_metric,
            "test_examples": len(test),
            "prompt_format": f"{test[0].prompt!r} -> {test[0].answer!r} (+ EOS); see training/tasks.py",
        }
    else:
        metric = {
            "metric": "val_bits_per_byte",
            "domain": job.target,
            "value": round(evaluate.bits_per_byte(model, ctx.val[job.target], ctx.token_bytes), 4),
            "base_value": round(base_metric, 4),
            "prompt_format": f"plain {job.target} text (no template)",
        }
    save_adapter(model, spec, str(directory), base_model=job.base)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    card = {
        "name": job.name,
        "summary": f"LoRA adapter on {job.base}: {job.kind} {job.target}",
        "base_model": job.base,
        "base_model_dir": f"../../{job.base}",
        "kind": job.kind,
        "lora": {"r": job.r, "alpha": job.alpha, "target_modules": list(job.target_modules)},
        "parameters": n_params,
        **metric,
        "training_tokens": record.tokens,
        "training_steps": record.steps,
        "training_seconds": round(record.seconds, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "hit_time_limit": record.hit_time_limit,
        "layer_lr_decay": stage.layer_lr_decay,
        "command": ctx.command,
        "log": f"_runs/{job.name}/log.json",
    }
    return write_card(directory, card)


# ---------------------------------------------------------------- orchestration


def _stage(directory: Path, force: bool, run_dir: Path, fn) -> dict:
    card = read_card(directory)
    if card is not None and not force:
        log.info("%s: already built, skipping", directory.name)
        return card
    if force:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    card = fn()
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # only needed to resume an unfinished run
    return card


def build_zoo(preset: str, out_dir: str, force: bool) -> None:
    p = get_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ctx = make_context(p, out, force)
    runs = out / "_runs"
    cards: dict[str, dict] = {}
    teacher_cfg = model_config(ctx, p.teacher)
    cards["teacher"] = _stage(
        out / "teacher",
        force,
        runs / "teacher",
        lambda: train_model(
            ctx,
            "teacher",
            out / "teacher",
            teacher_cfg,
            p.teacher_stage,
            "Dense teacher: the largest model the preset's budget allows.",
            mup_base=p.teacher_mup_base_width,
        ),
    )

    def distill() -> dict:
        teacher = load_model(out / "teacher").to(ctx.device).eval()
        return train_model(
            ctx,
            "student",
            out / "student",
            model_config(ctx, p.student),
            p.student_stage,
            "Dense student distilled from the teacher (KD + CE).",
            teacher=teacher,
        )

    cards["student"] = _stage(out / "student", force, runs / "student", distill)
    control_dir = out / "controls" / "student-scratch"
    cards["student-scratch"] = _stage(
        control_dir,
        force,
        runs / "student-scratch",
        lambda: train_model(
            ctx,
            "student-scratch",
            control_dir,
            model_config(ctx, p.student),
            p.student_stage,
            "Control: the student architecture trained from scratch on the same batches (no teacher).",
            steps=cards["student"]["training_steps"],
        ),
    )
    moe_cfg = model_config(
        ctx,
        p.moe,
        model_type="mixtral",
        num_local_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        router_aux_loss_coef=p.router_aux_coef,
    )
    cards["moe"] = _stage(
        out / "moe",
        force,
        runs / "moe",
        lambda: train_model(
            ctx,
            "moe",
            out / "moe",
            moe_cfg,
            p.moe_stage,
            f"Mixtral-style MoE: {p.num_experts} experts, top-{p.top_k}, Switch balance loss + router z-loss.",
        ),
    )
    dense_dir = out / "controls" / "moe-dense"
    dense_shape = Shape(
        p.moe.hidden_size,
        p.moe.intermediate_size * p.top_k,
        p.moe.num_hidden_layers,
        p.moe.num_attention_heads,
        p.moe.num_key_value_heads,
    )
    cards["moe-dense"] = _stage(
        dense_dir,
        force,
        runs / "moe-dense",
        lambda: train_model(
            ctx,
            "moe-dense",
            dense_dir,
            model_config(ctx, dense_shape),
            p.moe_stage,
            "Control: dense llama with the MoE's active parameters, trained on the same batches.",
            steps=cards["moe"]["training_steps"],
        ),
    )
    for job in p.adapters:
        directory = out / "adapters" / job.name
        cards[job.name] = _stage(directory, force, runs / job.name, lambda j=job, d=directory: train_adapter(ctx, j, d))
    write_summary(out, p, cards, time.perf_counter() - t0, ctx)


def write_summary(out: Path, p: Preset, cards: dict[str, dict], seconds: float, ctx: Context) -> None:
    def bpb(name: str) -> float:
        return cards[name]["val_bits_per_byte"]

    zoo = {
        "preset": p.name,
        "command": ctx.command,
        "build_seconds_this_run": round(seconds, 1),
        "models": {n: n for n in SERVED},
        "controls": {"student-scratch": "controls/student-scratch", "moe-dense": "controls/moe-dense"},
        "adapters": {j.name: {"path": f"adapters/{j.name}", "base": j.base} for j in p.adapters},
        "distillation_vs_control": {
            "teacher_bpb": bpb("teacher"),
            "student_distilled_bpb": bpb("student"),
            "student_scratch_bpb": bpb("student-scratch"),
            "distilled_minus_scratch": round(bpb("student") - bpb("student-scratch"), 4),
            "same_tokens": cards["student"]["training_tokens"] == cards["student-scratch"]["training_tokens"],
        },
        "moe_vs_dense": {
            "moe_bpb": bpb("moe"),
            "dense_same_active_bpb": bpb("moe-dense"),
            "moe_minus_dense": round(bpb("moe") - bpb("moe-dense"), 4),
            "moe_params": {"total": cards["moe"]["parameters"], "active": cards["moe"]["active_parameters"]},
            "dense_params": cards["moe-dense"]["parameters"],
            "expert_load_max_over_mean": cards["moe"]["router"]["expert_load_val"]["max_over_mean"],
            "same_tokens": cards["moe"]["training_tokens"] == cards["moe-dense"]["training_tokens"],
        },
        "cards": cards,
    }
    (out / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
    (out / "zoo.md").write_text(zoo_table(cards))
    log.info("zoo built in %.1fs:\n%s", seconds, zoo_table(cards))


def zoo_table(cards: dict[str, dict]) -> str:
    lines = ["| artifact | params | MB on disk | validation | training time (s) |", "| --- | --- | --- | --- | --- |"]
    for name, card in cards.items():
        if "val_bits_per_byte" in card:
            metric = f"{card['val_bits_per_byte']:.4f} bits/byte"
        elif card.get("metric") == "exact_match":
            metric = f"exact match {card['value']:.1%} (base {card['base_value']:.1%})"
        else:
            metric = f"{card['value']:.4f} bits/byte on {card['domain']} (base {card['base_value']:.4f})"
        params = f"{card['parameters']:,}" + (
            f" ({card['active_parameters']:,} active)"
            if card.get("active_parameters", card["parameters"]) != card["parameters"]
            else ""
        )
        lines.append(
            f"| {name} | {params} | {card['bytes_on_disk'] / 1e6:.2f} | {metric} | {card['training_seconds']} |"
        )
    return "\n".join(lines) + "\n"
