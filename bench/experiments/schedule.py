"""Experiment exp_schedule: linear warmup (10%) + cosine decay to 0 vs a constant learning rate.

The sheet: warmup 0-10% to 0.001, cosine to 0; "vs fixed lr: less stable, worse final accuracy".
Sources: warmup, Goyal et al. 2017 (large-batch ImageNet); cosine annealing, Loshchilov & Hutter
2017 (SGDR). Measured here: the byte-level llama through `training.loop.train` (`WarmupCosine` with
min_ratio 0 vs warmup 0 and min_ratio 1, i.e. constant), at four peak LRs including the sheet's
0.001, same batches, 3 seeds, gradient clipping off so that instability is visible. Stability:
the largest rise of the validation loss (every `eval_interval` steps; the per-batch training loss is
dominated by which domain each batch drew) above its running minimum after warmup, and whether the
run diverged; quality: final validation bits/byte.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from bench.common import write_report
from bench.experiments.common import LMRun, final_val_bpb, lm_data, mean, tiny_lm, train_curve, train_lm, val_curve

NAME = "exp_schedule"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    width: int = 64
    layers: int = 2
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 64
    warmup_fraction: float = 0.1
    eval_interval: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)  # final_val_bpb is the mean; max_val_rise_bpb the largest over seeds


TINY = ScheduleConfig(lrs=(3e-3,), width=16, steps=10, batch_size=2, seq_len=16, eval_interval=5, seeds=(0,))


def max_spike(steps: list[int], losses: list[float], after: int) -> float:
    """Largest rise of the loss above its running minimum, counted from step `after` (inf if it diverged)."""
    best, spike = math.inf, 0.0
    for step, loss in zip(steps, losses):
        if not math.isfinite(loss):
            return math.inf
        best = min(best, loss)
        if step >= after:
            spike = max(spike, loss - best)
    return spike


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    cfg = TINY if tiny else ScheduleConfig()
    lm = lm_data(cfg.seq_len, 200_000 if tiny else 2_000_000, 512 if tiny else 16_384)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    rows, curves = [], {}
    grid = [(s, lr) for s in ("constant", "warmup+cosine") for lr in cfg.lrs]
    for sched, lr in tqdm(grid, desc=NAME):
        shape = {"warmup": 0, "min_lr_ratio": 1.0} if sched == "constant" else {"warmup": warmup, "min_lr_ratio": 0.0}
        vals, rises = [], []
        for seed in cfg.seeds:
            model = tiny_lm(cfg.width, cfg.layers, seed=seed)
            run_cfg = LMRun(
                cfg.steps, cfg.batch_size, lr, grad_clip=1e9, eval_interval=cfg.eval_interval, seed=seed, **shape
            )
            record = train_lm(model, lm, run_cfg, f"{sched}-{lr:g}-s{seed}")
            if seed == cfg.seeds[0]:
                curves[(sched, lr)] = train_curve(record)
            vals.append(final_val_bpb(record))
            rises.append(max_spike(*val_curve(record), after=warmup))
        finite = all(math.isfinite(v) for v in vals + rises)
        rows.append(
            {
                "schedule": sched,
                "peak_lr": lr,
                "max_val_rise_bpb": round(max(rises), 4) if finite else None,
                "diverged": not finite,
                "final_val_bpb": round(mean(vals), 4) if finite else None,
                "final_val_bpb_per_seed": [round(v, 4) for v in vals],
            }
        )

    def pick(sched: str, key: str) -> dict:
        return {str(r["peak_lr"]): r[key] for r in rows if r["schedule"] == sched}

    wins = sum(
        1
        for lr in cfg.lrs
        for c, w in [(pick("constant", "final_val_bpb")[str(lr)], pick("warmup+cosine", "final_val_bpb")[str(lr)])]
        if w is not None and (c is None or w < c)
    )
    summary = {
        "final_val_bpb": {s: pick(s, "final_val_bpb") for s in ("constant", "warmup+cosine")},
        "max_val_rise_bpb": {s: pick(s, "max_val_rise_bpb") for s in ("constant", "warmup+cosine")},
        "warmup_cosine_better_at_n_of_lrs": f"{wins}/{len(cfg.lrs)}",
    }
    log.info("%s: %s", NAME, summary)

    def plot(fig: Figure, rows: list[dict]) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for i, lr in enumerate(cfg.lrs):
            for sched, style in (("constant", "-"), ("warmup+cosine", "--")):
                steps, losses = curves[(sched, lr)]
                ax1.plot(steps, losses, style, color=f"C{i}", label=f"{sched} {lr:g}")
        ax1.set_ylim(1.5, 8.5)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training bits/byte")
        ax1.set_title(f"training loss, seed {cfg.seeds[0]} (no gradient clipping)")
        ax1.legend(fontsize=7, ncol=2)
        for sched, style in (("constant", "-o"), ("warmup+cosine", "--s")):
            pts = [r for r in rows if r["schedule"] == sched and r["final_val_bpb"] is not None]
            ax2.plot([r["peak_lr"] for r in pts], [r["final_val_bpb"] for r in pts], style, label=sched)
        ax2.set_xscale("log")
        ax2.set_xlabel("peak learning rate")
        ax2.set_ylabel("final validation bits/byte")
        ax2.set_title(f"{cfg.steps} steps, {cfg.layers}x{cfg.width} byte llama, mean of {len(cfg.seeds)} seeds")
        ax2.legend()

    meta = {"config": asdict(cfg), "tiny": tiny, "summary": summary}
    return write_report(NAME, rows, out_dir, plot, meta)
