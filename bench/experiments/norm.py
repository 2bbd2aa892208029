"""Experiment exp_norm: batch normalisation vs layer normalisation, on the language model at small
batch sizes and on a small vision task (digits CNN).

The sheet: BatchNorm for CNNs, LayerNorm for Transformers, because "Batch Norm needs large batches".
Sources: BatchNorm, Ioffe & Szegedy 2015; LayerNorm, Ba, Kiros & Hinton 2016; Llama and modelserve's
decoder use RMSNorm (Zhang & Sennrich 2019), a LayerNorm without mean-centring.

- LM: the byte-level llama with its RMSNorms swapped for LayerNorm or for BatchNorm over all (B, T)
  positions of the batch, at batch sizes 2, 8 and 32 with the same number of training sequences
  (2400, so 1200, 300 and 75 steps; same LR), 3 seeds. Validation runs in eval
  mode (BatchNorm uses its running statistics). Caveat measured, not hidden: in a causal LM, training-
  mode BatchNorm mixes statistics over the whole sequence, so future tokens leak into the training
  loss; the train-minus-validation gap shows it.
- Vision: a 2-conv CNN on 8x8 digits with BatchNorm2d, LayerNorm over (C, H, W) (GroupNorm with one
  group), or no normalisation, at batch sizes 2, 8 and 64, the same number of epochs, 3 seeds: test
  accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from bench.common import write_report
from bench.experiments.common import (
    LN2,
    FitConfig,
    LMRun,
    digits,
    final_val_bpb,
    fit_classifier,
    lm_data,
    mean,
    tiny_lm,
    train_lm,
)
from models.layers import RMSNorm

NAME = "exp_norm"
log = logging.getLogger(__name__)
LM_NORMS = ("rmsnorm", "layernorm", "batchnorm")
CNN_NORMS = ("batchnorm", "layernorm", "none")


@dataclass(frozen=True)
class NormConfig:
    lm_batches: tuple[int, ...] = (2, 8, 32)
    lm_width: int = 64
    lm_layers: int = 2
    lm_sequences: int = 2400  # training sequences per run: steps = lm_sequences // batch (equal tokens)
    seq_len: int = 64
    lr: float = 3e-3
    cnn_batches: tuple[int, ...] = (2, 8, 64)
    cnn_epochs: int = 6
    cnn_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)  # values are means over seeds; per_seed keeps each


TINY = NormConfig(lm_batches=(2,), lm_width=16, lm_sequences=8, seq_len=16, cnn_batches=(8,), cnn_epochs=1, seeds=(0,))


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over every (batch, position) of a (B, T, H) activation."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, h = x.shape
        return self.bn(x.reshape(b * t, h)).reshape(b, t, h)  # (B*T, H) -> (B, T, H)


def swap_norms(model: nn.Module, kind: str) -> nn.Module:
    if kind == "rmsnorm":
        return model
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                hidden = child.weight.numel()
                setattr(parent, child_name, nn.LayerNorm(hidden) if kind == "layernorm" else TokenBatchNorm(hidden))
    return model


class SmallCNN(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return {"batchnorm": nn.BatchNorm2d(c), "layernorm": nn.GroupNorm(1, c), "none": nn.Identity()}[norm]

        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            norm_layer(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            norm_layer(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x.reshape(-1, 1, 8, 8))  # (B, 64) -> (B, 32, 4, 4)
        return self.head(h.flatten(1))


def result_row(task: str, norm: str, batch: int, metric: str, values: list[float], gaps: list[float]) -> dict:
    """One report row: the metric's mean over seeds, each seed's value, and the mean train - val gap."""
    per_seed = [round(v, 4) for v in values]
    return {
        "task": task,
        "norm": norm,
        "batch": batch,
        "metric": metric,
        "value": round(mean(values), 4),
        "per_seed": per_seed,
        "train_minus_val": round(mean(gaps), 4),
    }


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    cfg = TINY if tiny else NormConfig()
    lm = lm_data(cfg.seq_len, 200_000 if tiny else 2_000_000, 512 if tiny else 16_384)
    rows = []
    for batch, norm in tqdm([(b, n) for b in cfg.lm_batches for n in LM_NORMS], desc=f"{NAME} LM"):
        vals, gaps = [], []
        for seed in cfg.seeds:
            model = swap_norms(tiny_lm(cfg.lm_width, cfg.lm_layers, seed=seed), norm)
            run_cfg = LMRun(cfg.lm_sequences // batch, batch, cfg.lr, seed=seed)
            record = train_lm(model, lm, run_cfg, f"{norm}-b{batch}-s{seed}")
            vals.append(final_val_bpb(record))
            gaps.append(mean([h["loss"] for h in record.history if "loss" in h][-5:]) / LN2 - vals[-1])
        rows.append(result_row("byte LM", norm, batch, "val bits/byte", vals, gaps))
    split = digits()
    for batch, norm in tqdm([(b, n) for b in cfg.cnn_batches for n in CNN_NORMS], desc=f"{NAME} CNN"):
        accs, gaps = [], []
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            res = fit_classifier(SmallCNN(norm), split, FitConfig(cfg.cnn_epochs, batch, cfg.cnn_lr, seed=seed))
            accs.append(res["test_acc"])
            gaps.append(res["gap"])
        rows.append(result_row("digits CNN", norm, batch, "test accuracy", accs, gaps))

    def get(task: str, norm: str, batch: int) -> float:
        return next(r["value"] for r in rows if r["task"] == task and r["norm"] == norm and r["batch"] == batch)

    def gap(task: str, norm: str, batch: int) -> float:
        return next(
            r["train_minus_val"] for r in rows if r["task"] == task and r["norm"] == norm and r["batch"] == batch
        )

    def diff(task: str, batch: int) -> float:
        return round(get(task, "batchnorm", batch) - get(task, "layernorm", batch), 4)

    lb, cb = cfg.lm_batches, cfg.cnn_batches
    summary = {
        "lm_val_bpb": {n: {str(b): get("byte LM", n, b) for b in lb} for n in LM_NORMS},
        "lm_batchnorm_minus_layernorm_smallest_batch": diff("byte LM", lb[0]),
        "lm_batchnorm_minus_layernorm_largest_batch": diff("byte LM", lb[-1]),
        "lm_train_minus_val_smallest_batch": {n: gap("byte LM", n, lb[0]) for n in LM_NORMS},
        "cnn_test_acc": {n: {str(b): get("digits CNN", n, b) for b in cb} for n in CNN_NORMS},
        "cnn_batchnorm_minus_layernorm_largest_batch": diff("digits CNN", cb[-1]),
        "cnn_batchnorm_minus_layernorm_smallest_batch": diff("digits CNN", cb[0]),
    }
    log.info("%s: %s", NAME, summary)

    def plot(fig: Figure, rows: list[dict]) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for norm in LM_NORMS:
            ax1.plot(lb, [get("byte LM", norm, b) for b in lb], "-o", label=norm)
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("batch size (sequences of 64 bytes)")
        ax1.set_ylabel("validation bits/byte (eval mode)")
        ax1.set_title(f"byte llama, {cfg.lm_sequences} sequences of {cfg.seq_len} bytes per run")
        ax1.legend()
        for norm in CNN_NORMS:
            ax2.plot(cb, [get("digits CNN", norm, b) for b in cb], "-o", label=norm)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("batch size")
        ax2.set_ylabel("test accuracy")
        ax2.set_title(f"digits CNN, {cfg.cnn_epochs} epochs")
        ax2.legend()

    meta = {"config": asdict(cfg), "tiny": tiny, "summary": summary}
    return write_report(NAME, rows, out_dir, plot, meta)
