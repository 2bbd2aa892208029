"""The shared loop: deterministic resume, early stopping, the JSON log."""

import json

import torch

from models.config import ModelConfig
from models.decoder import CausalLM
from training.loop import TrainConfig, train
from training.losses import causal_lm_loss
from training.optim import OptimConfig


def _setup():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_dropout=0.1,
    )
    model = CausalLM(config)
    data = torch.randint(0, 32, (64, 17))

    def batch_fn(step):
        rows = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(step))
        return data[rows, :-1], data[rows, 1:]

    def loss_fn(m, batch):
        return causal_lm_loss(m(batch[0]).logits, batch[1]), {}

    return model, batch_fn, loss_fn, data


def _config(tmp_path, steps, **kw):
    return TrainConfig(
        name="t",
        max_steps=steps,
        optim=OptimConfig(lr=1e-2),
        warmup_steps=2,
        run_dir=str(tmp_path),
        progress=False,
        restore_best=False,
        **kw,
    )


def test_resume_continues_exactly(tmp_path):
    model, batch_fn, loss_fn, _ = _setup()
    train(model, loss_fn, batch_fn, _config(tmp_path / "straight", 10))
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, batch_fn, loss_fn, _ = _setup()
    first = train(model, loss_fn, batch_fn, _config(tmp_path / "resumed", 10, max_seconds=0.0))
    assert first.hit_time_limit and first.steps == 1  # stopped after one step, checkpoint written
    model, batch_fn, loss_fn, _ = _setup()  # a fresh process: new model, same run dir
    record = train(model, loss_fn, batch_fn, _config(tmp_path / "resumed", 10))
    assert record.resumed_from_step == 1 and record.steps == 10
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, straight[k])
    log = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert log["steps"] == 10 and log["history"][0]["step"] == 0 and "tokens" in log["history"][0]


def test_early_stopping_restores_best(tmp_path):
    model, batch_fn, loss_fn, _ = _setup()
    values = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    config = TrainConfig(name="t", max_steps=60, eval_interval=5, patience=2, run_dir=None, progress=False)
    record = train(model, loss_fn, batch_fn, config, eval_fn=lambda m: next(values))
    assert record.stopped_early and record.steps == 20 and record.best_step == 10 and record.best_val_loss == 2.0


def test_sam_runs_in_the_loop(tmp_path):
    model, batch_fn, loss_fn, data = _setup()
    before = float(loss_fn(model, (data[:, :-1], data[:, 1:]))[0].detach())
    config = TrainConfig(
        name="t", max_steps=20, optim=OptimConfig(lr=1e-2, sam_rho=0.05), warmup_steps=2, progress=False
    )
    train(model, loss_fn, batch_fn, config)
    model.eval()
    assert float(loss_fn(model, (data[:, :-1], data[:, 1:]))[0].detach()) < before


def test_thread_governor_picks_the_faster_setting_and_reprobes_when_slow():
    from training.loop import ThreadGovernor

    gov = ThreadGovernor(max_threads=2, interval=50, probe=2)
    plan = [gov.threads_for(s) for s in range(4)]
    assert plan == [1, 1, 2, 2]
    for s, t in zip(range(4), [0.5, 0.5, 0.2, 0.2], strict=True):
        gov.threads_for(s)
        gov.record(s, t)
    assert gov.threads_for(4) == 2 and gov.reference == 0.2
    gov.record(4, 0.3)  # a little slower: keep going
    assert gov.threads_for(5) == 2
    gov.record(5, 1.0)  # 5x slower: the load changed, probe again from step 6
    assert [gov.threads_for(s) for s in (6, 7, 8)] == [1, 1, 2]
