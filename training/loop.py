"""The one training loop shared by every model of the zoo (pretraining, distillation, MoE, LoRA).

What varies between models is passed in as two callables: ``batch_fn(step) -> tuple of tensors``
(deterministic in ``step``, so resuming replays the same data) and ``loss_fn(model, batch) -> (loss,
metrics)``. The loop owns the rest: AdamW parameter groups (μP, layer-wise LR) and optional SAM,
warmup + cosine schedule, gradient clipping, periodic validation with early stopping (the best
weights are restored at the end), checkpoint + resume, a tqdm bar with loss, tokens/s and ETA, and a
JSON log of the run. `Trainer` holds one run and names its steps (resume, step, log_step, evaluate,
should_stop, save_checkpoint, finish); `train` is `Trainer(...).run()`.

Determinism: the batch of step s depends only on (seed, s) and the dropout RNG is reseeded from
(seed, s) every step, so a resumed run continues exactly as an uninterrupted one would (on CPU).
``max_seconds`` is a safety cap for shared machines: a run that hits it stops early, which the
run record says (``hit_time_limit``) and which makes its length depend on machine speed.
On CPU, `ThreadGovernor` picks the intra-op thread count by timing (see its docstring); the thread
count changes speed only, not results beyond float round-off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training.optim import SAM, OptimConfig, build_optimizer
from training.schedule import WarmupCosine

log = logging.getLogger(__name__)

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    name: str
    max_steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # Validate every eval_interval steps (and at the end); 0 validates only at the end.
    eval_interval: int = 0
    # Stop after this many validations without improving by min_delta; 0 never stops early.
    patience: int = 0
    min_delta: float = 1e-3
    restore_best: bool = True
    seed: int = 0
    # Wall-clock cap in seconds (shared CPUs); None: run all max_steps.
    max_seconds: float | None = None
    # Where checkpoint.pt and log.json go; None keeps nothing on disk.
    run_dir: str | None = None
    checkpoint_interval: int = 0  # steps; 0: only when the run ends early or finishes
    log_interval: int = 10
    device: str = "auto"
    # CPU only: re-pick 1 vs all intra-op threads by timing every 50 steps (shared machines).
    adaptive_threads: bool = True
    progress: bool = True


@dataclass
class RunRecord:
    name: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_train_loss: float = math.nan
    best_val_loss: float = math.nan
    best_step: int = -1
    stopped_early: bool = False
    hit_time_limit: bool = False
    resumed_from_step: int = 0
    device: str = "cpu"
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


class ThreadGovernor:
    """Chooses torch's CPU thread count (1 or max) by timing, on shared machines.

    Measured on a shared 2-core machine: with the machine idle, 2 intra-op threads train the student
    ~1.6x faster than 1; while another process is busy, 2 threads run 2-6x slower than 1 (OpenMP
    workers wait for a core). A cycle starts with `probe` steps at 1 thread and `probe` at max, then
    runs with whichever had the lower median step time. A new cycle starts every `interval` steps, or
    at once when a step takes more than `slow_factor` times the chosen setting's probe time (the
    load on the machine changed).
    """

    def __init__(self, max_threads: int, interval: int = 50, probe: int = 3, slow_factor: float = 2.5) -> None:
        self.max_threads, self.interval, self.probe, self.slow_factor = max_threads, interval, probe, slow_factor
        self.choice = max_threads
        self.cycle_start = 0
        self.reference: float | None = None
        self.times: dict[int, list[float]] = {1: [], max_threads: []}

    def threads_for(self, step: int) -> int:
        if self.max_threads <= 1:
            return 1
        if step - self.cycle_start >= self.interval:
            self.cycle_start = step
        phase = step - self.cycle_start
        if phase < self.probe:
            return 1
        return self.max_threads if phase < 2 * self.probe else self.choice

    def record(self, step: int, seconds: float) -> None:
        if self.max_threads <= 1:
            return
        phase = step - self.cycle_start
        if phase >= 2 * self.probe:
            if self.reference is not None and seconds > self.slow_factor * self.reference:
                self.cycle_start = step + 1  # re-probe from the next step
            return
        self.times[self.threads_for(step)].append(seconds)
        if phase == 2 * self.probe - 1:
            medians = {t: sorted(v)[len(v) // 2] for t, v in self.times.items() if v}
            self.choice = min(medians, key=medians.get)
            self.reference = medians[self.choice]
            self.times = {1: [], self.max_threads: []}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class StepResult:
    loss: float
    lr_factor: float  # the schedule's multiplier of the base LR at this step
    grad_norm: float  # before clipping
    metrics: dict[str, float]  # what loss_fn reported besides the loss
    tokens: int  # in the step's batch


class Trainer:
    """One training run, in named steps: `resume`, `step`, `log_step`, `evaluate`, `should_stop`,
    `save_checkpoint`, `finish`; `run` strings them together (see `train`)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch_fn: Callable[[int], Batch],
        config: TrainConfig,
        eval_fn: Callable[[nn.Module], float] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.batch_fn, self.config, self.eval_fn = model, loss_fn, batch_fn, config, eval_fn
        self.device = resolve_device(config.device)
        model.to(self.device)
        num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 0)
        self.optimizer = build_optimizer(model, config.optim, num_layers)
        self.sam = SAM(self.optimizer, config.optim.sam_rho) if config.optim.sam_rho > 0 else None
        self.schedule = WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.record = RunRecord(config.name, device=str(self.device))
        self.best_state: dict[str, Tensor] | None = None
        self.bad_evals = 0  # validations in a row without improvement (early stopping)
        self.run_dir = Path(config.run_dir) if config.run_dir else None
        self.ckpt_path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        self.smooth = math.nan  # exponential moving average of the training loss, for the progress bar
        self.started = time.perf_counter()  # reset by `run` to count a resumed run's earlier seconds

    # ---- checkpoint and resume
    def resume(self) -> int:
        """Load run_dir/checkpoint.pt when there is one; returns the step to start from."""
        if self.ckpt_path is None or not self.ckpt_path.is_file():
            return 0
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_state = state.get("best_state")
        self.bad_evals = state["bad_evals"]
        self.record = RunRecord(**{**state["record"], "history": state["history"]})
        self.record.resumed_from_step = self.record.steps
        log.info("%s: resuming from step %d", self.config.name, self.record.steps)
        return self.record.steps

    def save_checkpoint(self) -> None:
        if self.ckpt_path is None:
            return
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "bad_evals": self.bad_evals,
            "record": self.record.summary(),
            "history": self.record.history,
        }
        torch.save(state, self.ckpt_path.with_suffix(".tmp"))
        self.ckpt_path.with_suffix(".tmp").replace(self.ckpt_path)

    # ---- one optimiser step
    def step(self, step: int) -> StepResult:
        """Set the LR, run forward and backward (twice with SAM), clip, update."""
        config, device = self.config, self.device
        factor = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = config.optim.lr * group["lr_mult"] * factor
        torch.manual_seed(config.seed * 7919 + step)  # dropout masks reproducible across resume
        batch = tuple(t.to(device) for t in self.batch_fn(step))
        self.model.train()
        with _autocast(device):
            loss, metrics = self.loss_fn(self.model, batch)
        loss.backward()
        if self.sam is not None:
            self.sam.perturb()
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                self.loss_fn(self.model, batch)[0].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip))
        (self.sam or self.optimizer).step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(loss.detach()), factor, grad_norm, metrics, batch[0].numel())

    def log_step(self, step: int, result: StepResult) -> None:
        """Update the run record (and its history every log_interval steps and at the last step)."""
        record, config = self.record, self.config
        value = result.loss
        self.smooth = value if math.isnan(self.smooth) else 0.9 * self.smooth + 0.1 * value
        record.steps, record.tokens = step + 1, record.tokens + result.tokens
        record.seconds = time.perf_counter() - self.started
        record.final_train_loss = value
        if step % config.log_interval == 0 or step + 1 == config.max_steps:
            entry = {
                "step": step,
                "loss": value,
                "lr_factor": result.lr_factor,
                "grad_norm": result.grad_norm,
                "tokens": record.tokens,
                "threads": torch.get_num_threads(),
            }
            record.history.append({**entry, **result.metrics, "seconds": round(record.seconds, 3)})

    # ---- validation and stopping
    def evaluate(self, step: int) -> bool:
        """Validate; returns True when early stopping should end the run."""
        record, config = self.record, self.config
        self.model.eval()
        with torch.no_grad(), _autocast(self.device):
            val = float(self.eval_fn(self.model))
        record.history.append({"step": step, "val_loss": val})
        if math.isnan(record.best_val_loss) or val < record.best_val_loss - config.min_delta:
            record.best_val_loss, record.best_step, self.bad_evals = val, step, 0
            if config.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        return config.patience > 0 and self.bad_evals >= config.patience

    def should_stop(self, step: int) -> bool:
        """After step `step`: early stopping or the wall-clock cap ends the run (the record says which)."""
        record, config = self.record, self.config
        if record.stopped_early:
            log.info(
                "%s: early stop at step %d (best %.4f at %d)",
                config.name,
                step + 1,
                record.best_val_loss,
                record.best_step,
            )
            return True
        if config.max_seconds is not None and record.seconds > config.max_seconds and step + 1 < config.max_steps:
            record.hit_time_limit = True
            log.warning(
                "%s: stopped at step %d of %d by max_seconds=%.0f",
                config.name,
                step + 1,
                config.max_steps,
                config.max_seconds,
            )
            return True
        return False

    def finish(self) -> RunRecord:
        """Final validation (unless the last step had one), best weights back, checkpoint and log.json."""
        record = self.record
        last = record.history[-1] if record.history else {}
        if self.eval_fn is not None and (last.get("step") != record.steps or "val_loss" not in last):
            self.evaluate(record.steps)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        record.seconds = time.perf_counter() - self.started
        self.save_checkpoint()
        if self.run_dir is not None:
            payload = {"config": _jsonable(self.config), **asdict(record)}
            (self.run_dir / "log.json").write_text(json.dumps(payload, indent=1))
        return record

    # ---- the run
    def run(self) -> RunRecord:
        config = self.config
        start = self.resume()
        record = self.record
        self.started = time.perf_counter() - record.seconds
        bar = tqdm(
            total=config.max_steps,
            initial=start,
            desc=config.name,
            unit="step",
            disable=not config.progress,
            mininterval=0.5,
        )
        initial_threads = torch.get_num_threads()
        governor = ThreadGovernor(initial_threads) if self.device.type == "cpu" and config.adaptive_threads else None
        end = start if record.stopped_early else config.max_steps  # an early-stopped run is finished
        for step in range(start, end):
            step_start = time.perf_counter()
            if governor is not None:
                torch.set_num_threads(governor.threads_for(step))
            result = self.step(step)
            if governor is not None:
                governor.record(step, time.perf_counter() - step_start)
            self.log_step(step, result)
            bar.update(1)
            bar.set_postfix(loss=f"{self.smooth:.3f}", tok_s=f"{record.tokens / max(record.seconds, 1e-9):.0f}")
            if self.eval_fn is not None and config.eval_interval and (step + 1) % config.eval_interval == 0:
                record.stopped_early = self.evaluate(step + 1)
                bar.set_postfix(loss=f"{self.smooth:.3f}", val=f"{record.history[-1]['val_loss']:.3f}")
            if self.should_stop(step):
                break
            if config.checkpoint_interval and (step + 1) % config.checkpoint_interval == 0:
                self.save_checkpoint()
        bar.close()
        torch.set_num_threads(initial_threads)
        return self.finish()


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batch_fn: Callable[[int], Batch],
    config: TrainConfig,
    eval_fn: Callable[[nn.Module], float] | None = None,
) -> RunRecord:
    """Train in place; returns the run record (also written to run_dir/log.json)."""
    return Trainer(model, loss_fn, batch_fn, config, eval_fn).run()


def _jsonable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))
