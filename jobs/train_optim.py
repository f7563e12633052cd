"""Optimizer, learning-rate schedule, mixed precision and the step plan of a training run (plain PyTorch)."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from jobs.train_config import OptimSettings, TrainConfig


@dataclass
class StepPlan:
    batches_per_epoch: int        # micro-batches each worker sees per epoch
    steps_per_epoch: int          # optimizer steps per epoch
    total_steps: int              # optimizer steps of the whole run
    warmup_steps: int


def plan_steps(cfg: TrainConfig, train_rows: int, world_size: int) -> StepPlan:
    """Ray's equal split gives every worker train_rows // world_size rows; the last micro-batch may be short.

    With max_steps > 0 the run makes exactly that many steps, going over the data as often as needed.
    """
    batches = math.ceil((train_rows // world_size) / cfg.batch_size)
    steps = math.ceil(batches / cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else steps * cfg.epochs
    warmup = cfg.optim.warmup_steps or int(cfg.optim.warmup_ratio * total)
    return StepPlan(batches, steps, total, min(warmup, total))


def build_optimizer(model: nn.Module, optim: OptimSettings) -> torch.optim.AdamW:
    """AdamW; biases and normalisation weights (every 1-D parameter) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_factor(step: int, plan: StepPlan, schedule: str) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based): linear warm-up from
    1/warmup (never 0, so no step is wasted), then linear or cosine decay towards 0, or constant."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return 1.0
    done = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return max(0.0, 1.0 - done)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: StepPlan, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, plan, schedule))


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast on the worker's device; fp32 runs as is."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against gradient underflow; for fp32/bf16 the scaler is a disabled pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
