"""The per-worker training loop Ray Train runs on every rank: plain PyTorch, with Ray in five places only
(get_context, prepare_model, get_dataset_shard, get_checkpoint in `train_worker`; report in `Trainer.report`).

One optimizer step = `grad_accum` micro-batches of `batch_size` rows on each of the workers; DDP averages the
gradients once per step (the accumulating micro-batches run under `no_sync`). Every `log_every` steps the running
train metrics are synced and reported; every evaluation (`eval_every` steps, or each epoch) validates on the
validation shards, updates early stopping (rank 0 decides, every rank follows) and saves a checkpoint.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torcheval.metrics import Mean
from torcheval.metrics.toolkit import sync_and_compute

from jobs.train_config import TrainConfig
from jobs.train_data import TaskCollateFn
from jobs.train_gradcache import gradcache_backward
from jobs.train_optim import autocast, build_optimizer, build_scheduler, grad_scaler, plan_steps
from jobs.train_state import EarlyStopper, RunState, restore_checkpoint, save_checkpoint
from model_core.losses import LOSSES
from model_core.metrics import build_metrics
from model_core.model import unwrap
from model_core.resolve import load_model
from model_core.tasks import TASKS, compute_loss, move_batch


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: loop_config = {"config": TrainConfig as a dict, "train_rows": int}."""
    cfg = TrainConfig.from_dict(loop_config["config"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray's prefetch thread already overlaps tokenizing
    if not cfg.scaling.use_gpu:  # a CPU worker computes with as many threads as CPUs it reserved
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    context = ray.train.get_context()
    trainer = Trainer(cfg, loop_config["train_rows"], context.get_world_rank(), context.get_world_size(),
                      ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(Path(directory))
    trainer.model = ray.train.torch.prepare_model(trainer.model, parallel_strategy_kwargs={"broadcast_buffers": False})
    trainer.fit(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"))


def load_start_model(cfg: TrainConfig):
    """The starting model: cfg.model.encoder resolved by model_core, with the model fields the config sets."""
    overrides = {name: getattr(cfg.model, name) for name in cfg.model_overrides}
    return load_model(cfg.model.encoder, **overrides)


def with_last_flag(items: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs: an epoch's last micro-batch closes its accumulation group even when short."""
    iterator = iter(items)
    current = next(iterator, StopIteration)
    while current is not StopIteration:
        following = next(iterator, StopIteration)
        yield current, following is StopIteration
        current = following


def synced_mean(metric: Mean) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return float(sync_and_compute(metric))
    return float(metric.compute())


class Trainer:
    def __init__(self, cfg: TrainConfig, train_rows: int, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.task = TASKS[cfg.task]
        torch.manual_seed(cfg.seed)  # a fresh head starts the same on every rank (DDP also broadcasts rank 0's)
        model, self.collator = load_start_model(cfg)
        self.model = model.to(device).train()  # HF from_pretrained leaves the encoder in eval mode (no dropout)
        self.num_labels = model.config.num_labels
        self.plan = plan_steps(cfg, train_rows, world)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.plan, cfg.optim.schedule)
        self.scaler = grad_scaler(device, cfg.precision)
        stopping = cfg.early_stopping
        self.state = RunState(stopper=EarlyStopper(cfg.metric_mode, stopping.patience, stopping.min_delta))
        self.collate = TaskCollateFn(cfg, self.collator, self.num_labels)
        self.loss_fn = partial(LOSSES[cfg.loss_name], **cfg.loss_args)
        self.train_metrics = build_metrics(self.task, self.num_labels, device)
        self.train_loss = Mean(device=device)
        self.stopped_early, self.last_eval_step, self.last_lr, self.grad_norm = False, -1, 0.0, 0.0
        self.started = self.interval_start = time.perf_counter()
        self.interval_steps = 0

    # ---- resume --------------------------------------------------------------------------------------------
    def restore(self, directory: Path) -> None:
        self.state = restore_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.scaler)
        self.last_eval_step = self.state.progress.step  # checkpoints are only written at evaluations
        self.state.history.append({"step": self.state.progress.step, "event": "resumed"})

    def reseed(self) -> None:
        """Dropout randomness depends only on (seed, rank, step), so a resumed run continues like an unbroken one."""
        torch.manual_seed(self.cfg.seed + 1_000_003 * self.rank + self.state.progress.step)

    @property
    def finished(self) -> bool:
        progress = self.state.progress
        epochs_done = self.cfg.max_steps == 0 and progress.epoch >= self.cfg.epochs
        return self.stopped_early or epochs_done or progress.step >= self.plan.total_steps

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self, train_shard, val_shard) -> None:
        self.val_shard = val_shard
        self.reseed()
        while not self.finished:
            self.run_epoch(train_shard)
        if self.last_eval_step != self.state.progress.step:
            self.after_step(force_eval=True)

    def run_epoch(self, shard) -> None:
        cfg, progress = self.cfg, self.state.progress
        shuffle = max(cfg.data.shuffle_buffer, cfg.batch_size) if cfg.data.shuffle_buffer else None
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=self.collate, prefetch_batches=1,
                                           local_shuffle_buffer_size=shuffle,
                                           local_shuffle_seed=cfg.seed + progress.epoch)
        pending, seen = 0, False
        for batch, is_last in with_last_flag(islice(batches, progress.batches_in_epoch, None)):
            seen, pending = True, pending + 1
            sync = pending == cfg.grad_accum or is_last
            self.micro_step(move_batch(batch, self.device), sync)
            if sync:
                self.optimizer_step(pending)
                progress.batches_in_epoch += pending
                if is_last:
                    progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
                pending = 0
                self.after_step(epoch_done=is_last)
                if self.finished:
                    return
        if not seen:
            if progress.batches_in_epoch == 0:
                raise RuntimeError(f"rank {self.rank} got no training rows in epoch {progress.epoch}")
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0  # resumed exactly at an epoch's end

    def micro_step(self, batch: dict, sync: bool) -> None:
        """Forward and backward of one micro-batch; DDP all-reduces only when `sync` (the step's last one)."""
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else nullcontext():
            if self.cfg.gradcache:
                loss, outputs = gradcache_backward(self.model, batch, self.loss_fn, self.cfg.gradcache,
                                                   partial(autocast, self.device, self.cfg.precision),
                                                   self.scale_loss, sync, self.device)
            else:
                with autocast(self.device, self.cfg.precision):
                    loss, outputs = compute_loss(self.model, batch, self.task, self.cfg.loss_name,
                                                 **self.cfg.loss_args)
                self.scale_loss(loss).backward()
        self.train_loss.update(loss.detach().float())
        self.train_metrics.update(outputs)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss / self.cfg.grad_accum)

    def optimizer_step(self, micro_batches: int) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if micro_batches < self.cfg.grad_accum:  # a short last group: make it the mean of its own micro-batches
            for p in params:
                p.grad.mul_(self.cfg.grad_accum / micro_batches)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.last_lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.progress.step += 1
        self.interval_steps += 1

    # ---- logging, evaluation, checkpoints ------------------------------------------------------------------
    def after_step(self, epoch_done: bool = False, force_eval: bool = False) -> None:
        step, cfg = self.state.progress.step, self.cfg
        record = self.train_record() if step % cfg.log_every == 0 or force_eval else {}
        due = (step % cfg.eval_every == 0) if cfg.eval_every else epoch_done
        evaluate = force_eval or due or step >= self.plan.total_steps
        if evaluate:
            record |= self.evaluate()
        if record:
            self.report(record, checkpoint=evaluate)
        self.maybe_crash(step)

    def train_record(self) -> dict[str, float]:
        """Running train loss and metrics since the last record, averaged over every rank."""
        if self.interval_steps == 0:
            return {}
        elapsed = time.perf_counter() - self.interval_start
        record = {"train/loss": synced_mean(self.train_loss), "train/lr": self.last_lr,
                  "train/grad_norm": self.grad_norm, "train/steps_per_s": self.interval_steps / max(elapsed, 1e-9)}
        record |= {f"train/{k}": v for k, v in self.train_metrics.compute().items()}
        self.train_loss.reset()
        self.train_metrics.reset()
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        return record

    def evaluate(self) -> dict[str, float]:
        """Loss and task metrics over the validation shards of all ranks; updates early stopping on every rank."""
        model, metrics, loss = unwrap(self.model), build_metrics(self.task, self.num_labels, self.device), \
            Mean(device=self.device)
        model.eval()
        batches = self.val_shard.iter_batches(batch_size=self.cfg.batch_size * self.world, batch_format="numpy")
        with torch.no_grad():
            for rows in batches:   # each rank takes every world-th row of each batch: all rows, each once
                mine = {name: column[self.rank::self.world] for name, column in rows.items()}
                if len(next(iter(mine.values()))) == 0:
                    continue
                with autocast(self.device, self.cfg.precision):
                    value, outputs = compute_loss(model, move_batch(self.collate(mine), self.device), self.task,
                                                  self.cfg.loss_name, **self.cfg.loss_args)
                loss.update(value.float())
                metrics.update(outputs)
        model.train()
        values = {"val/loss": synced_mean(loss)} | {f"val/{k}": v for k, v in metrics.compute().items()}
        if self.cfg.metric_key not in values:
            raise KeyError(f"metric {self.cfg.metric_key!r} is not among the validation metrics {sorted(values)}")
        self.state.stopper.update(values[self.cfg.metric_key], self.state.progress.step)
        self.stopped_early = self.broadcast_flag(self.state.stopper.should_stop)
        self.last_eval_step = self.state.progress.step
        return values | ({"stopped_early": 1.0} if self.stopped_early else {})

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision on every rank, so that all ranks leave the loop (and its report barrier) together."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        progress = self.state.progress
        epoch = progress.epoch + progress.batches_in_epoch / max(1, self.plan.batches_per_epoch)
        record = {"step": progress.step, "epoch": round(epoch, 4),
                  "time_s": round(time.perf_counter() - self.started, 3)} | metrics
        self.state.history.append(record)
        if not checkpoint:
            ray.train.report(record)
            return
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if self.rank == 0:
                save_checkpoint(Path(tmp), self.model, self.collator, self.optimizer, self.scheduler, self.scaler,
                                self.state)
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(record, checkpoint=saved, checkpoint_dir_name=f"checkpoint_{progress.step:07d}")
        self.reseed()

    def maybe_crash(self, step: int) -> None:
        """Fault injection for recovery tests: the last rank dies like a lost node, once (the marker says so)."""
        fault = self.cfg.fault_injection
        if fault.crash_after_step == step and self.rank == self.world - 1 and not Path(fault.marker).exists():
            Path(fault.marker).write_text(f"crashed after step {step}\n")
            os._exit(1)
