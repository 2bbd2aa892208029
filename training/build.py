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
8. ``student-int8/``: the student quantized to int8 and saved in the quantized layout, no training
   (`training.quantize_stage`); served with the others.
9. ``draft/``: the teacher's speculative draft: the student's first layer distilled on the teacher's own
   greedy outputs (DistillSpec, `training.draft_stage`); serve it with ``--draft teacher=<out>/draft``.

Stages 2-6 are declared once, as rows of `MODEL_STAGES` (shape, preset stage, teacher, control of which
model), all trained by `train_model`; adapters are `train_adapter`, one per `AdapterJob`. What every
stage shares (tokenized data, configs, loss callables, export) is in `training.build_context`.

Every model directory holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, README.md and card.json. Training logs and resumable checkpoints go to
``_runs/<name>/``. The summary is ``zoo.json`` and ``zoo.md``. Served models: teacher, student, moe.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_model
from models.decoder import CausalLM
from training import data, draft_stage, evaluate, quantize_stage, tasks
from training.build_context import (
    Context,
    export,
    kd_loss_fn,
    lm_loss_fn,
    lm_metrics,
    make_context,
    model_config,
    train_config,
)
from training.cards import read_card, write_card
from training.loop import RunRecord, train
from training.lora import LoraSpec, apply_lora, save_adapter
from training.mup import mup_config, mup_init, width_mult
from training.presets import AdapterJob, Preset, Shape, Stage, get_preset

log = logging.getLogger(__name__)
SERVED = ("teacher", "student", "moe")


@dataclass(frozen=True)
class ModelStage:
    """One model of the zoo, declared once in `MODEL_STAGES` and trained by `train_model`."""

    name: str
    path: str  # directory under the output dir
    summary: str  # the card's summary; str.format'ed with the preset as `p`
    shape: Callable[[Preset], Shape]
    stage: Callable[[Preset], Stage]
    config: Callable[[Preset], dict[str, Any]] = lambda p: {}  # ModelConfig fields beyond a llama's (the MoE's)
    teacher: str | None = None  # distil from this artifact (built by an earlier stage)
    same_steps_as: str | None = None  # a control: train as many steps as this earlier artifact did
    mup_base: Callable[[Preset], int | None] = lambda p: None  # μP base width (None: standard)


def _moe_dense_shape(p: Preset) -> Shape:
    """A llama with the MoE's active parameters: intermediate = top_k x the expert intermediate size."""
    m = p.moe
    return Shape(
        m.hidden_size, m.intermediate_size * p.top_k, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads
    )


MODEL_STAGES = (
    ModelStage(
        "teacher",
        "teacher",
        "Dense teacher: the largest model the preset's budget allows.",
        shape=lambda p: p.teacher,
        stage=lambda p: p.teacher_stage,
        mup_base=lambda p: p.teacher_mup_base_width,
    ),
    ModelStage(
        "student",
        "student",
        "Dense student distilled from the teacher (KD + CE).",
        shape=lambda p: p.student,
        stage=lambda p: p.student_stage,
        teacher="teacher",
    ),
    ModelStage(
        "student-scratch",
        "controls/student-scratch",
        "Control: the student architecture trained from scratch on the same batches (no teacher).",
        shape=lambda p: p.student,
        stage=lambda p: p.student_stage,
        same_steps_as="student",
    ),
    ModelStage(
        "moe",
        "moe",
        "Mixtral-style MoE: {p.num_experts} experts, top-{p.top_k}, Switch balance loss + router z-loss.",
        shape=lambda p: p.moe,
        stage=lambda p: p.moe_stage,
        config=lambda p: dict(
            model_type="mixtral",
            num_local_experts=p.num_experts,
            num_experts_per_tok=p.top_k,
            router_aux_loss_coef=p.router_aux_coef,
        ),
    ),
    ModelStage(
        "moe-dense",
        "controls/moe-dense",
        "Control: dense llama with the MoE's active parameters, trained on the same batches.",
        shape=_moe_dense_shape,
        stage=lambda p: p.moe_stage,
        same_steps_as="moe",
    ),
)


def train_model(ctx: Context, spec: ModelStage, directory: Path, cards: dict[str, dict]) -> dict:
    """Train the stage's model from scratch (distilled when it has a teacher), export it, write its card."""
    p = ctx.preset
    teacher = load_model(ctx.out / spec.teacher).to(ctx.device).eval() if spec.teacher else None
    t0 = time.perf_counter()
    torch.manual_seed(p.seed)
    stage, mup_base = spec.stage(p), spec.mup_base(p)
    config = model_config(ctx, spec.shape(p), **spec.config(p)).replace(hidden_dropout=stage.dropout)
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
    steps = cards[spec.same_steps_as]["training_steps"] if spec.same_steps_as else None
    record = train(
        model,
        loss_fn,
        sampler,
        train_config(ctx, spec.name, stage, steps, mup_mult),
        eval_fn=lambda m: evaluate.val_loss(m, ctx.val["all"]),
    )
    export(ctx, model, directory)
    card = _model_card(ctx, spec.name, model, record, spec.summary.format(p=p), t0)
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


def train_draft(ctx: Context, directory: Path) -> dict:
    """The teacher's speculative draft (`training.draft_stage`), exported with a model card like the others."""
    t0 = time.perf_counter()
    draft, record, fields = draft_stage.distil_draft(ctx)
    export(ctx, draft, directory)
    return write_card(directory, _model_card(ctx, draft_stage.NAME, draft, record, draft_stage.SUMMARY, t0) | fields)


def _training_fields(record: RunRecord, t0: float) -> dict:
    """The card fields every trained artifact shares: what its run consumed."""
    return {
        "training_tokens": record.tokens,
        "training_steps": record.steps,
        "training_seconds": round(record.seconds, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


def _model_card(ctx: Context, name: str, model: CausalLM, record: RunRecord, summary: str, t0: float) -> dict:
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
        **_training_fields(record, t0),
        "stopped_early": record.stopped_early,
        "hit_time_limit": record.hit_time_limit,
        "best_val_loss": None if math.isnan(record.best_val_loss) else round(record.best_val_loss, 4),  # no evals
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
        **_training_fields(record, t0),
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
    for spec in MODEL_STAGES:
        directory = out / spec.path
        cards[spec.name] = _stage(
            directory, force, runs / spec.name, lambda s=spec, d=directory: train_model(ctx, s, d, cards)
        )
    for job in p.adapters:
        directory = out / "adapters" / job.name
        cards[job.name] = _stage(directory, force, runs / job.name, lambda j=job, d=directory: train_adapter(ctx, j, d))
    q_dir = out / quantize_stage.NAME  # the student quantized to int8 (training/quantize_stage.py); served too
    cards[quantize_stage.NAME] = _stage(
        q_dir, force, runs / quantize_stage.NAME, lambda: quantize_stage.build_student_int8(ctx, q_dir)
    )
    d_dir = out / draft_stage.NAME  # the teacher's speculative draft (training/draft_stage.py: DistillSpec)
    cards[draft_stage.NAME] = _stage(d_dir, force, runs / draft_stage.NAME, lambda: train_draft(ctx, d_dir))
    write_summary(out, p, cards, time.perf_counter() - t0, ctx)


def write_summary(out: Path, p: Preset, cards: dict[str, dict], seconds: float, ctx: Context) -> None:
    def bpb(name: str) -> float:
        return cards[name]["val_bits_per_byte"]

    zoo = {
        "preset": p.name,
        "command": ctx.command,
        "build_seconds_this_run": round(seconds, 1),
        "models": {n: n for n in SERVED},
        "controls": {s.name: s.path for s in MODEL_STAGES if s.path.startswith("controls/")},
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
