"""jobs.train parts that need no Ray: early stopping, schedules, step plans, label mapping, the validation split,
GradCache's gradients, checkpoint round trips, metrics export.

    python -m pytest tests/jobs/test_train_units.py -v
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from jobs.train_config import TrainConfig, load_train_config
from jobs.train_data import LabelEncoder, in_validation
from jobs.train_export import pick_best, plot_history
from jobs.train_gradcache import RngState, gradcache_backward
from jobs.train_loop import with_last_flag
from jobs.train_optim import StepPlan, build_optimizer, build_scheduler, grad_scaler, lr_factor, plan_steps
from jobs.train_state import EarlyStopper, Progress, RunState, restore_checkpoint, save_checkpoint
from model_core import ModelConfig, TextCollator, build_model, collate_task_batch, compute_loss
from model_core.losses import LOSSES
from model_core.tasks import TASKS
from transformers import AutoTokenizer

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def stop_index(values, mode="max", patience=2, min_delta=0.0):
    """The 1-based evaluation at which the stopper says stop, or None."""
    stopper = EarlyStopper(mode=mode, patience=patience, min_delta=min_delta)
    for i, value in enumerate(values, start=1):
        stopper.update(value, step=i)
        if stopper.should_stop:
            return i
    return None


@pytest.mark.parametrize("values, kwargs, expected", [
    ([0.50, 0.60, 0.59, 0.58, 0.70], {}, 4),                            # 2 evaluations without a new best
    ([0.50, 0.60, 0.59, 0.61, 0.60, 0.60], {}, 6),                      # an improvement resets the count
    ([0.50, 0.505, 0.509, 0.6], {"min_delta": 0.01}, 3),                # gains below min_delta do not count
    ([1.0, 0.9, 0.95, 0.91], {"mode": "min"}, 4),                       # lower is better for losses
    ([0.5, float("nan"), float("nan")], {}, 3),                         # NaN is never an improvement
    ([0.5, 0.4, 0.3, 0.2, 0.1], {"patience": 0}, None),                 # patience 0: never stops
])
def test_early_stopping_stops_at_the_expected_evaluation(values, kwargs, expected):
    assert stop_index(values, **kwargs) == expected


def test_early_stopper_tracks_best_value_and_step():
    stopper = EarlyStopper(mode="max", patience=3)
    for step, value in ((10, 0.3), (20, 0.7), (30, 0.6)):
        stopper.update(value, step)
    assert (stopper.best, stopper.best_step, stopper.bad_evals) == (0.7, 20, 1)


def test_lr_schedule_warms_up_from_a_nonzero_rate_then_decays():
    plan = StepPlan(batches_per_epoch=10, steps_per_epoch=10, total_steps=10, warmup_steps=2)
    linear = [lr_factor(s, plan, "linear") for s in range(10)]
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(linear[1:], linear[2:]))
    cosine = [lr_factor(s, plan, "cosine") for s in range(10)]
    assert cosine[2] == 1.0 and 0 < cosine[-1] < linear[-1]
    assert [lr_factor(s, plan, "constant") for s in (0, 5, 9)] == [0.5, 1.0, 1.0]


def _cfg(**changes) -> TrainConfig:
    base = ["model.encoder=x", "data.train=t.parquet", "data.val=v.parquet"]
    return load_train_config(None, base + [f"{k}={v}" for k, v in changes.items()])


def test_step_plan_counts_per_worker_batches_and_accumulation():
    plan = plan_steps(_cfg(batch_size=8, grad_accum=3, epochs=2), train_rows=101, world_size=2)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (7, 3, 6)   # 50 rows -> 7 -> 3
    assert plan_steps(_cfg(max_steps=50), train_rows=101, world_size=2).total_steps == 50


def test_with_last_flag_marks_only_the_final_item():
    assert list(with_last_flag(iter("abc"))) == [("a", False), ("b", False), ("c", True)]
    assert list(with_last_flag([])) == []


def test_config_records_which_model_fields_it_sets():
    cfg = _cfg(**{"model.head": "classification", "model.num_labels": 4})
    assert cfg.model_overrides == ["head", "num_labels"] and cfg.model.num_labels == 4
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg   # what Ray hands the workers


def test_label_encoder_maps_names_lists_and_scores():
    single = LabelEncoder(TASKS["classification"], ["neg", "pos"], "", 1.0)
    assert single(np.array(["pos", "neg"], dtype=object)).tolist() == [1, 0]
    multi = LabelEncoder(TASKS["multilabel"], ["comp", "sys", "mac"], ".", 1.0)
    assert [v.tolist() for v in multi(np.array(["comp.sys.mac", "comp"], dtype=object))] == [[0, 1, 2], [0]]
    scores = LabelEncoder(TASKS["pair_score"], [], "", 0.2)(np.array([5.0, 2.5]))
    assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="'neutral' is not in data.label_names"):
        single(np.array(["neutral"], dtype=object))


def test_validation_split_is_seeded_and_independent_of_row_order():
    texts = np.array([f"document number {i}" for i in range(2000)], dtype=object)
    held = in_validation(texts, 0.2, seed=0)
    assert 0.17 < held.mean() < 0.23
    assert (in_validation(texts[::-1], 0.2, seed=0) == held[::-1]).all()
    assert (in_validation(texts, 0.2, seed=1) != held).any()


@pytest.fixture(scope="module")
def tiny(tiny_encoder_dirs):
    path = tiny_encoder_dirs["bert"]
    return path, AutoTokenizer.from_pretrained(path)


def _model(tiny, **cfg):
    path, tokenizer = tiny
    cfg = {"encoder": str(path), "max_length": 64, "dropout": 0.0, **cfg}
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg))
    return model, TextCollator.for_model(model, tokenizer)


def _pairs(n=10):
    titles = [f"headline {i} about {w}" for i, w in enumerate(["markets", "football", "rain", "chips", "votes"] * 4)]
    return {"text_a": np.array(titles[:n], dtype=object),
            "text_b": np.array([t.upper() + " and more words" for t in titles[:n]], dtype=object)}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["mnrl", "mnrl_symmetric"])
def test_gradcache_gradients_equal_the_full_batch_loss(tiny, loss):
    model, collator = _model(tiny, encoder_kwargs=NO_DROPOUT)
    batch = collate_task_batch(TASKS["contrastive"], collator, _pairs(10))
    full, _ = compute_loss(model, batch, TASKS["contrastive"], loss)
    full.backward()
    expected = _grads(model)
    model.zero_grad()
    cached, outputs = gradcache_backward(model, batch, LOSSES[loss], chunk_size=3, autocast=nullcontext,
                                         scale=lambda x: x, sync=True, device=torch.device("cpu"))
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)
    assert outputs["a"].shape == (10, 32)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradcache_replays_dropout_masks(tiny):
    model, collator = _model(tiny)   # HF dropout 0.1 stays on: the replayed pass must draw the same masks
    model.train()
    batch = collator(["some words here", "other words there"])
    state = RngState(torch.device("cpu"))
    first = model(batch)
    second = model(batch)
    with state.replay():
        replayed = model(batch)
    assert not torch.equal(first, second) and torch.equal(first, replayed)


def test_checkpoint_round_trip_restores_every_piece_of_state(tiny, tmp_path):
    cfg = _cfg(**{"optim.lr": 0.01})
    model, collator = _model(tiny, head="classification", num_labels=3)
    plan = StepPlan(4, 4, 8, 1)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, plan, "linear")
    batch = collate_task_batch(TASKS["classification"], collator, {"text": np.array(["a b", "c d"], dtype=object),
                                                                  "label": np.array([0, 2])})
    for _ in range(3):
        compute_loss(model, batch, TASKS["classification"], "cross_entropy")[0].backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    state = RunState(Progress(step=3, epoch=1, batches_in_epoch=2), EarlyStopper("max", 2, 0.0, 0.5, 2, 1),
                     [{"step": 3, "val/accuracy": 0.5}])
    save_checkpoint(tmp_path, model, collator, optimizer, scheduler, grad_scaler(torch.device("cpu"), "fp32"), state)

    fresh, _ = _model(tiny, head="classification", num_labels=3)
    fresh_opt = build_optimizer(fresh, cfg.optim)
    fresh_sched = build_scheduler(fresh_opt, plan, "linear")
    restored = restore_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, grad_scaler(torch.device("cpu"), "fp32"))
    assert restored.progress == state.progress and restored.stopper == state.stopper
    assert restored.history == state.history and restored.resumed_from == 3
    assert fresh_sched.last_epoch == 3 and fresh_sched.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)


def test_best_checkpoint_pick_ignores_nan_and_prefers_the_later_tie():
    checkpoints = [("c1", {"step": 1, "val/f1": 0.5}), ("c2", {"step": 2, "val/f1": 0.7}),
                   ("c3", {"step": 3, "val/f1": 0.7}), ("c4", {"step": 4, "val/f1": math.nan})]
    assert pick_best(checkpoints, "val/f1", "max")[0] == "c3"
    assert pick_best(checkpoints, "val/f1", "min")[0] == "c1"
    assert pick_best(checkpoints, "val/other", "max") is None


def test_plot_history_writes_a_png(tmp_path):
    history = [{"step": s, "train/loss": 1 / s, "train/lr": 0.1} for s in range(1, 6)] + \
              [{"step": 5, "val/loss": 0.3, "val/accuracy": 0.8}]
    plot_history(history, tmp_path / "curves.png", "val/accuracy")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trainer(tiny, *overrides):
    from jobs.train_loop import Trainer

    cfg = load_train_config(None, [f"model.encoder={tiny[0]}", "model.head=classification", "model.num_labels=4",
                                   "data.train=t.parquet", "data.val=v.parquet", *NO_DROPOUT_OVERRIDES, *overrides])
    return Trainer(cfg, train_rows=64, rank=0, world=1, device=torch.device("cpu"))


NO_DROPOUT_OVERRIDES = ["model.dropout=0.0", "model.encoder_kwargs.hidden_dropout_prob=0.0",
                        "model.encoder_kwargs.attention_probs_dropout_prob=0.0", "model.max_length=32"]
AG_ROWS = {"text": np.array(["Stocks rally as oil slips", "Team wins the cup final", "New chip doubles speed",
                             "Talks resume in the capital"], dtype=object), "label": np.array([2, 1, 3, 0])}


def _rows(index) -> dict:
    return {k: v[index] for k, v in AG_ROWS.items()}


def test_accumulated_micro_batches_give_the_big_batch_gradient(tiny):
    """No Ray: 2 micro-batches of 2 with grad_accum=2 == 1 batch of 4; a short last group == its own mean."""
    whole = _trainer(tiny)
    whole.micro_step(whole.collate(_rows(slice(0, 4))), sync=True)
    accumulated = _trainer(tiny, "grad_accum=2")
    for part in (slice(0, 2), slice(2, 4)):
        accumulated.micro_step(accumulated.collate(_rows(part)), sync=False)
    for (name, a), b in zip(whole.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    short, plain = _trainer(tiny, "grad_accum=2"), _trainer(tiny)
    for trainer in (short, plain):
        trainer.micro_step(trainer.collate(_rows(slice(0, 2))), sync=True)
        trainer.optimizer_step(micro_batches=1)
    assert short.grad_norm == pytest.approx(plain.grad_norm, rel=1e-6) and short.state.progress.step == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_update_the_weights(tiny, precision):
    trainer = _trainer(tiny, f"precision={precision}", "optim.lr=0.01")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(2):
        trainer.micro_step(trainer.collate(_rows(slice(0, 4))), sync=True)
        trainer.optimizer_step(micro_batches=1)
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert trainer.scaler.state_dict()["scale"] > 0
