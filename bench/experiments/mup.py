"""Experiment exp_mup: μTransfer. Learning-rate sweeps at 3 widths, standard parametrisation (SP) vs μP.

The sheet claims μP is "w ~ N(0, 1/√n)" and that then "lr=0.001 works for ALL model sizes". μP
(Yang, Hu et al. 2022, Tensor Programs V) changes per-layer learning rates and the output/attention
multipliers (`training.mup`), and promises that the *optimal* LR found at a small base width stays
optimal at larger widths. Measured here: the same byte-level llama (2 layers) at each width, the same
seeded batches, AdamW + warmup/cosine, one fixed LR grid chosen before running; the final validation
bits/byte per (parametrisation, width, LR), and where the optimum lands. Plus the μP coordinate check
(`training.mup.coordinate_check`): mean |logit| after a few Adam steps vs width; and an ablation at the
base width, where μP differs from SP only by its zero-initialised readout and query: SP, μP, and μP
with the readout initialised like SP's, at the sweep's middle LR.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import write_report
from bench.experiments.common import LMRun, final_val_bpb, lm_data, tiny_lm, train_lm
from training.mup import coordinate_check

NAME = "exp_mup"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MupConfig:
    widths: tuple[int, ...] = (64, 128, 256)
    base_width: int = 64  # μP's base: at this width μP equals SP
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    layers: int = 2
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    warmup: int = 15
    coord_widths: tuple[int, ...] = (64, 128, 256, 512)
    seed: int = 0


TINY = MupConfig(
    widths=(16, 32), base_width=16, lrs=(3e-3, 3e-2), steps=4, batch_size=2, seq_len=16, warmup=1, coord_widths=(16, 32)
)


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    cfg = TINY if tiny else MupConfig()
    lm = lm_data(cfg.seq_len, 200_000 if tiny else 2_000_000, 512 if tiny else 16_384)
    rows = []
    grid = [(p, w, lr) for p in ("SP", "muP") for w in cfg.widths for lr in cfg.lrs]
    for param, width, lr in tqdm(grid, desc=NAME):
        mult = width / cfg.base_width
        model = tiny_lm(width, cfg.layers, mup_base=cfg.base_width if param == "muP" else None, seed=cfg.seed)
        run_cfg = LMRun(
            cfg.steps, cfg.batch_size, lr, cfg.warmup, mup_width_mult=mult if param == "muP" else None, seed=cfg.seed
        )
        record = train_lm(model, lm, run_cfg, f"{param}-w{width}-lr{lr:g}")
        bpb = final_val_bpb(record)
        rows.append(
            {
                "param": param,
                "width": width,
                "lr": lr,
                "val_bpb": round(bpb, 4) if math.isfinite(bpb) else None,
                "train_s_per_step": round(record.seconds / max(record.steps, 1), 4),
            }
        )
    best = {}
    for param in ("SP", "muP"):
        best[param] = {}
        for width in cfg.widths:
            cands = [r for r in rows if r["param"] == param and r["width"] == width and r["val_bpb"] is not None]
            top = min(cands, key=lambda r: r["val_bpb"]) if cands else None
            best[param][str(width)] = {"lr": top["lr"] if top else None, "val_bpb": top["val_bpb"] if top else None}

    def shift(param: str) -> float | None:
        lo, hi = best[param][str(cfg.widths[0])]["lr"], best[param][str(cfg.widths[-1])]["lr"]
        return round(math.log2(hi / lo), 2) if lo and hi else None

    def lr_1e3_spread(param: str) -> float | None:
        vals = [r["val_bpb"] for r in rows if r["param"] == param and r["lr"] == 1e-3]
        return round(max(vals) - min(vals), 4) if vals and None not in vals else None

    ablation = {}
    mid_lr = cfg.lrs[len(cfg.lrs) // 2]
    for variant in ("SP", "muP", "muP, readout N(0, 0.02)"):
        model = tiny_lm(cfg.base_width, cfg.layers, mup_base=None if variant == "SP" else cfg.base_width, seed=cfg.seed)
        if variant.startswith("muP,"):
            with torch.no_grad():
                torch.nn.init.normal_(model.lm_head.weight, 0.0, model.config.initializer_range)
        run_cfg = LMRun(cfg.steps, cfg.batch_size, mid_lr, cfg.warmup, seed=cfg.seed)
        ablation[variant] = round(final_val_bpb(train_lm(model, lm, run_cfg, variant)), 4)
    coord = {
        p: coordinate_check(list(cfg.coord_widths), cfg.coord_widths[0], p == "muP", steps=4) for p in ("SP", "muP")
    }
    coord_last = {p: {str(w): round(v["logits"][-1], 4) for w, v in coord[p].items()} for p in coord}
    summary = {
        "best_lr": best,
        "best_lr_shift_log2_smallest_to_largest": {p: shift(p) for p in ("SP", "muP")},
        "widest_best_val_bpb": {p: best[p][str(cfg.widths[-1])]["val_bpb"] for p in ("SP", "muP")},
        "coord_check_logit_mean_abs_after_4_steps": coord_last,
        "base_width_ablation_val_bpb": {"lr": mid_lr, **ablation},
        "lr_1e-3_val_bpb_spread_across_widths": {p: lr_1e3_spread(p) for p in ("SP", "muP")},
    }
    log.info("%s: %s", NAME, summary)

    def plot(fig: Figure, rows: list[dict]) -> None:
        axes = fig.subplots(1, 3)
        for ax, param in zip(axes[:2], ("SP", "muP")):
            for width in cfg.widths:
                pts = [(r["lr"], r["val_bpb"]) for r in rows if r["param"] == param and r["width"] == width]
                ok = [(x, y) for x, y in pts if y is not None]
                ax.plot([x for x, _ in ok], [y for _, y in ok], marker="o", label=f"width {width}")
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation bits/byte")
            ax.set_title(f"{param}: {cfg.steps} steps, {cfg.layers} layers")
            ax.legend()
        for param, style in (("SP", "-o"), ("muP", "--s")):
            ws = list(cfg.coord_widths)
            axes[2].plot(ws, [coord[param][w]["logits"][-1] for w in ws], style, label=param)
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log")
        axes[2].set_xlabel("width")
        axes[2].set_ylabel("mean |logit| after 4 Adam steps (lr 1e-2)")
        axes[2].set_title("coordinate check")
        axes[2].legend()

    meta = {
        "config": asdict(cfg),
        "tiny": tiny,
        "summary": summary,
        "notes": [
            "byte-level llama on the zoo corpus; val_bpb None = diverged (NaN)",
            "the LR grid was fixed before any run; nothing tuned to the sheet",
        ],
    }
    return write_report(NAME, rows, out_dir, plot, meta)
