"""Shared pieces of the experiments: a byte-level language-model corpus, a tiny llama, one LM training
call through `training.loop.train`, and scikit-learn's bundled digits for the vision/MLP experiments.

The LM corpus is the zoo's corpus (`training.data`: stdlib code + pydoc English, split by document)
encoded as raw UTF-8 bytes (vocabulary 256), so the experiments need no tokenizer and no artifacts;
loss is reported in bits per byte (nats / ln 2), the zoo's unit. Everything is seeded.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.decoder import CausalLM
from training import data, evaluate
from training.loop import RunRecord, TrainConfig, train
from training.losses import causal_lm_loss
from training.mup import mup_config, mup_init
from training.optim import SAM, OptimConfig

VOCAB = 256
LN2 = math.log(2)


@dataclass(frozen=True)
class LMData:
    train: dict[str, Tensor]  # domain -> (N,) byte ids
    val_windows: Tensor  # (N, T+1)
    seq_len: int


@functools.lru_cache(maxsize=4)
def lm_data(seq_len: int, train_chars: int, val_tokens: int) -> LMData:
    """Byte streams of the zoo's train split (capped per domain) and validation windows of both domains."""
    split = data.split_documents(data.load_documents(), val_fraction=0.1, train_max_chars=train_chars)

    def encode(docs: list[data.Document]) -> Tensor:
        raw = b"\n".join(d.text.encode("utf-8", errors="replace") for d in docs)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # (N,)

    train_streams = {d: encode(split["train"][d]) for d in data.DOMAINS}
    val = torch.cat([data.eval_windows(encode(split["val"][d]), seq_len, val_tokens // 2) for d in data.DOMAINS])
    return LMData(train_streams, val, seq_len)


def tiny_lm(
    width: int, layers: int, heads: int = 4, mup_base: int | None = None, dropout: float = 0.0, seed: int = 0
) -> CausalLM:
    """A byte-level llama (SwiGLU MLP of 2 x width); μP init and multipliers when mup_base is set."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        hidden_dropout=dropout,
    )
    if mup_base is not None:
        config = mup_config(config, mup_base)
    model = CausalLM(config)
    if mup_base is not None:
        mup_init(model, mup_base)
    return model


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    ids, labels = batch
    return causal_lm_loss(model(ids).logits, labels), {}


@dataclass(frozen=True)
class LMRun:
    steps: int
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    mup_width_mult: float | None = None
    layer_lr_decay: float = 1.0
    sam_rho: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 0
    log_interval: int = 5
    seed: int = 0


def train_lm(model: CausalLM, lm: LMData, run: LMRun, name: str) -> RunRecord:
    """Train in place with the shared loop (one thread choice left to the caller); val loss in nats/byte."""
    sampler = data.BatchSampler(lm.train, {"code": 0.7, "english": 0.3}, run.batch_size, lm.seq_len, run.seed)
    optim = OptimConfig(
        lr=run.lr,
        weight_decay=run.weight_decay,
        mup_width_mult=run.mup_width_mult,
        layer_lr_decay=run.layer_lr_decay,
        sam_rho=run.sam_rho,
    )
    config = TrainConfig(
        name=name,
        max_steps=run.steps,
        optim=optim,
        warmup_steps=run.warmup,
        min_lr_ratio=run.min_lr_ratio,
        grad_clip=run.grad_clip,
        eval_interval=run.eval_interval,
        restore_best=False,
        seed=run.seed,
        log_interval=run.log_interval,
        adaptive_threads=False,
        progress=False,
    )
    return train(model, lm_loss, sampler, config, eval_fn=lambda m: evaluate.val_loss(m, lm.val_windows))


def final_val_bpb(record: RunRecord) -> float:
    """Validation bits per byte at the end of the run (the loop validates at the last step)."""
    vals = [h["val_loss"] for h in record.history if "val_loss" in h]
    return vals[-1] / LN2 if vals and math.isfinite(vals[-1]) else math.nan


def val_curve(record: RunRecord) -> tuple[list[int], list[float]]:
    """(steps, validation bits per byte) from the loop's validations (every eval_interval steps and at the end)."""
    rows = [h for h in record.history if "val_loss" in h]
    return [h["step"] for h in rows], [h["val_loss"] / LN2 for h in rows]


def train_curve(record: RunRecord) -> tuple[list[int], list[float]]:
    """(steps, training loss in bits per byte) from the loop's log entries."""
    rows = [h for h in record.history if "loss" in h]
    return [h["step"] for h in rows], [h["loss"] / LN2 for h in rows]


@functools.lru_cache(maxsize=2)
def digits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's bundled 8x8 digits (1797 images, offline), split 60/20/20: {"train"|"val"|"test": (x, y)}.

    Pixels scaled to [0, 1], x is (N, 64); the split is seeded and stratified. "val" is only for
    early stopping; accuracies and gaps are reported on "test".
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx = list(range(len(y)))
    train, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=bunch.target)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=bunch.target[rest])
    return {name: (x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)  # (N, 10)
    return float((logits.argmax(-1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    # "adam": torch Adam, whose weight_decay is classic L2 (added to the gradient);
    # "adamw": decoupled weight decay; "sgd": momentum 0.9.
    optimizer: str = "adam"
    weight_decay: float = 0.0
    sam_rho: float = 0.0  # > 0 wraps the optimiser in training.optim.SAM
    patience: int = 0  # early stopping on validation loss, in epochs (best weights restored); 0: off
    train_subset: int | None = None  # first n training examples (a small-data regime); None: all
    seed: int = 0


def fit_classifier(model: nn.Module, split: dict[str, tuple[Tensor, Tensor]], cfg: FitConfig) -> dict:
    """Train a classifier on split["train"]; returns final train/test accuracy and loss, the epoch
    history, seconds per optimiser step and the epoch early stopping chose."""
    x, y = split["train"]
    if cfg.train_subset is not None:
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sam = SAM(opt, cfg.sam_rho) if cfg.sam_rho > 0 else None
    loss_fn = nn.functional.cross_entropy
    history, best, best_state, bad, steps, seconds = [], math.inf, None, 0, 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        for idx in minibatches(len(y), cfg.batch_size, epoch, cfg.seed):
            start = time.perf_counter()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if sam is not None:
                sam.perturb()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
            (sam or opt).step()
            opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            steps += 1
        train_acc, train_loss = accuracy_and_loss(model, x, y)
        val_acc, val_loss = accuracy_and_loss(model, *split["val"])
        history.append(
            {
                "epoch": epoch + 1,
                "train_acc": train_acc,
                "train_loss": train_loss,
                "val_acc": val_acc,
                "val_loss": val_loss,
            }
        )
        if not math.isfinite(train_loss):
            break
        if cfg.patience:
            if val_loss < best - 1e-4:
                best, bad = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    train_acc, train_loss = accuracy_and_loss(model, x, y)
    test_acc, test_loss = accuracy_and_loss(model, *split["test"])
    return {
        "train_acc": train_acc,
        "test_acc": test_acc,
        "gap": train_acc - test_acc,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "epochs_run": len(history),
        "s_per_step": seconds / max(steps, 1),
        "history": history,
    }


def minibatches(n: int, batch_size: int, epoch: int, seed: int) -> list[Tensor]:
    """Seeded shuffled index batches for one epoch (the last partial batch dropped)."""
    gen = torch.Generator().manual_seed(seed * 10_007 + epoch)
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
