"""Experiment exp_residual: trainability of deep narrow networks, with and without residual connections,
under three initialisations.

The sheet: "Without residuals: can train ~20 layers; with residuals: ~100+", "Xavier/He: w ~ N(0,
1/fan_in)", and "Standard: w ~ N(0, 1)". Primary sources: Glorot & Bengio 2010 (Xavier, Var =
2/(fan_in + fan_out)), He et al. 2015 (Var = 2/fan_in for ReLU), He et al. 2016 (ResNet: 152 layers on
ImageNet, 1202 on CIFAR-10). N(0, 1/fan_in) is LeCun's init.

Measured here: ReLU MLPs of width 64 on digits (input 64 -> `depth` hidden layers -> 10 classes), SGD
with momentum 0.9, the same seeded batches. `plain`: h <- relu(W h). `residual`: h <- h + W relu(h) /
sqrt(depth) (pre-activation block, branch scaled by 1/sqrt(depth) so the stream's variance stays O(1),
as in GPT-2 / Fixup). Inits: N(0, 1) (the sheet's "standard"), Xavier, He. Reported: gradient norm
per layer at initialisation, final training loss and test accuracy; "trains" = final training loss
below half of the initial ln(10).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from bench.common import write_report
from bench.experiments.common import FitConfig, digits, fit_classifier

NAME = "exp_residual"
log = logging.getLogger(__name__)
INITS = ("N(0,1)", "xavier", "he")


@dataclass(frozen=True)
class ResidualConfig:
    depths: tuple[int, ...] = (10, 20, 50, 100)
    width: int = 64
    epochs: int = 15
    lr: float = 0.01
    batch_size: int = 64
    plot_depth: int = 50  # the depth whose per-layer gradient norms are plotted
    seed: int = 0


TINY = ResidualConfig(depths=(4,), width=16, epochs=1, plot_depth=4)


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int, residual: bool, init: str) -> None:
        super().__init__()
        self.residual, self.depth = residual, depth
        self.inp = nn.Linear(64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)
        for layer in [self.inp, *self.hidden, self.out]:
            fan_in, fan_out = layer.in_features, layer.out_features
            std = {"N(0,1)": 1.0, "xavier": math.sqrt(2 / (fan_in + fan_out)), "he": math.sqrt(2 / fan_in)}[init]
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (B, W)
        for layer in self.hidden:
            h = h + layer(torch.relu(h)) / math.sqrt(self.depth) if self.residual else torch.relu(layer(h))
        return self.out(torch.relu(h) if self.residual else h)


def grad_norms_at_init(model: DeepMLP, x: Tensor, y: Tensor) -> list[float]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    norms = [float(layer.weight.grad.norm()) for layer in model.hidden]
    model.zero_grad()
    return norms


def run(tiny: bool, out_dir: Path) -> dict[str, Path]:
    cfg = TINY if tiny else ResidualConfig()
    split = digits()
    x, y = split["train"]
    rows, grad_profiles = [], {}
    grid = [(d, arch, init) for d in cfg.depths for arch in ("plain", "residual") for init in INITS]
    for depth, arch, init in tqdm(grid, desc=NAME):
        torch.manual_seed(cfg.seed)
        model = DeepMLP(depth, cfg.width, arch == "residual", init)
        norms = grad_norms_at_init(model, x[:256], y[:256])
        if depth == cfg.plot_depth:
            grad_profiles[(arch, init)] = norms
        res = fit_classifier(model, split, FitConfig(cfg.epochs, cfg.batch_size, cfg.lr, "sgd", seed=cfg.seed))
        loss = res["train_loss"]
        finite = [n for n in norms if math.isfinite(n)]
        rows.append(
            {
                "depth": depth,
                "arch": arch,
                "init": init,
                "grad_norm_first": norms[0],
                "grad_norm_last": norms[-1],
                "grad_ratio_first_over_last": norms[0] / norms[-1]
                if norms[-1] > 0 and len(finite) == len(norms)
                else None,
                "final_train_loss": loss if math.isfinite(loss) else None,
                "test_acc": res["test_acc"],
                "trains": bool(math.isfinite(loss) and loss < 0.5 * math.log(10)),
            }
        )

    def deepest(arch: str, init: str) -> int:
        ok = [r["depth"] for r in rows if r["arch"] == arch and r["init"] == init and r["trains"]]
        return max(ok) if ok else 0

    summary = {
        "deepest_trained": {f"{a}/{i}": deepest(a, i) for a in ("plain", "residual") for i in INITS},
        "test_acc_at_max_depth": {
            f"{r['arch']}/{r['init']}": r["test_acc"] for r in rows if r["depth"] == cfg.depths[-1]
        },
        "max_depth": cfg.depths[-1],
    }
    log.info("%s: %s", NAME, summary)

    def plot(fig: Figure, rows: list[dict]) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for (arch, init), norms in grad_profiles.items():
            ax1.plot(
                range(1, len(norms) + 1),
                [n if math.isfinite(n) else float("nan") for n in norms],
                "-" if arch == "plain" else "--",
                label=f"{arch}, {init}",
            )
        ax1.set_yscale("log")
        ax1.set_xlabel("hidden layer")
        ax1.set_ylabel("||dL/dW|| at initialisation")
        ax1.set_title(f"gradient norm per layer, depth {cfg.plot_depth}")
        ax1.legend(fontsize=7)
        for arch, style in (("plain", "-o"), ("residual", "--s")):
            for init in INITS:
                pts = [r for r in rows if r["arch"] == arch and r["init"] == init]
                ax2.plot([r["depth"] for r in pts], [r["test_acc"] for r in pts], style, label=f"{arch}, {init}")
        ax2.set_xlabel("depth (hidden layers)")
        ax2.set_ylabel(f"test accuracy after {cfg.epochs} epochs SGD")
        ax2.set_title("trainability vs depth (digits)")
        ax2.legend(fontsize=7)

    meta = {
        "config": asdict(cfg),
        "tiny": tiny,
        "summary": summary,
        "notes": ["residual branches scaled by 1/sqrt(depth); final_train_loss None = diverged"],
    }
    return write_report(NAME, rows, out_dir, plot, meta)
