"""Training tasks: what a batch holds, which head and losses fit, and how one loss step runs.

A task ties three things together so that the training loop stays generic:
- the batch kind (`single`, `pair`, `contrastive`, `distill`) and the canonical columns it reads
  (`text`, `text_a`, `text_b`, `label`, `teacher`);
- the heads and losses that make sense for it (the first loss is the default);
- the outputs its metrics consume (see model_core/metrics.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model_core.config import ConfigError, ModelConfig
from model_core.losses import LOSSES
from model_core.tokenization import TextCollator

EMBEDDING_HEADS = ("none", "dense")


@dataclass(frozen=True)
class Task:
    name: str
    batch_kind: str           # single | pair | contrastive | distill
    heads: tuple[str, ...]    # ModelConfig.head values that fit
    losses: tuple[str, ...]   # loss names that fit; the first is the default
    label_kind: str           # class | multi_hot | float | embedding | none

    @property
    def text_columns(self) -> tuple[str, ...]:
        return ("text",) if self.batch_kind in ("single", "distill") else ("text_a", "text_b")

    @property
    def columns(self) -> tuple[str, ...]:
        target = {"embedding": ("teacher",), "none": ()}.get(self.label_kind, ("label",))
        return self.text_columns + target

    def check(self, cfg: ModelConfig, loss: str) -> None:
        """Raise if the model's head or the named loss does not fit this task."""
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        if loss not in self.losses:
            raise ConfigError(f"loss {loss!r} does not fit task {self.name!r}; use one of {list(self.losses)}")
        if cfg.head not in self.heads:
            raise ConfigError(f"task {self.name!r} needs model.head in {list(self.heads)}, got {cfg.head!r}")


TASKS = {t.name: t for t in (
    Task("classification", "single", ("classification",), ("cross_entropy",), "class"),
    Task("multilabel", "single", ("multilabel",), ("bce",), "multi_hot"),
    Task("regression", "single", ("regression",), ("mse",), "float"),
    Task("pair_classification", "pair", ("pair_classification",), ("cross_entropy",), "class"),
    Task("pair_score", "pair", EMBEDDING_HEADS, ("cosine", "cosent"), "float"),
    Task("contrastive", "contrastive", EMBEDDING_HEADS, ("mnrl", "mnrl_symmetric"), "none"),
    Task("distillation", "distill", EMBEDDING_HEADS, ("distill_mse", "distill_cosine"), "embedding"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def check_labels(task: Task, labels: np.ndarray, num_labels: int) -> None:
    """Raise naming the offending values if class labels fall outside [0, num_labels)."""
    if task.label_kind == "class":
        values = np.asarray(labels)
        bad = np.unique(values[(values < 0) | (values >= num_labels)])
    elif task.label_kind == "multi_hot":
        values = np.concatenate([np.asarray(v).ravel() for v in labels]) if len(labels) else np.zeros(0)
        bad = np.unique(values[(values < 0) | (values >= num_labels)])
    else:
        return
    if bad.size:
        raise ConfigError(f"task {task.name!r}: label values {bad[:10].tolist()} are outside [0, {num_labels}) "
                          f"(model.num_labels={num_labels})")


def _multi_hot(labels: np.ndarray, num_labels: int) -> Tensor:
    """Accept a (B, C) 0/1 array or a column of label-index lists."""
    if labels.dtype != object and labels.ndim == 2:
        return torch.as_tensor(labels, dtype=torch.float32)
    out = torch.zeros(len(labels), num_labels)
    for row, indices in enumerate(labels):
        out[row, torch.as_tensor(np.asarray(indices), dtype=torch.long)] = 1.0
    return out


def _target(task: Task, rows: dict[str, np.ndarray], num_labels: int) -> dict[str, Tensor]:
    if task.label_kind == "class":
        return {"labels": torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long)}
    if task.label_kind == "multi_hot":
        return {"labels": _multi_hot(rows["label"], num_labels)}
    if task.label_kind == "float":
        return {"labels": torch.as_tensor(np.asarray(rows["label"], dtype=np.float32))}
    if task.label_kind == "embedding":
        return {"teacher": torch.as_tensor(np.stack(list(rows["teacher"])).astype(np.float32))}
    return {}


def collate_task_batch(task: Task, collator: TextCollator, rows: dict[str, np.ndarray],
                       num_labels: int = 0) -> dict:
    """Rows with canonical column names (numpy, as Ray Data hands them over) -> the task's batch of tensors."""
    texts = {col: [str(t) if t is not None else None for t in rows[col]] for col in task.text_columns}
    if task.batch_kind in ("single", "distill"):
        batch = {"inputs": collator(texts["text"])}
    else:
        batch = {"a": collator(texts["text_a"]), "b": collator(texts["text_b"])}
    return batch | _target(task, rows, num_labels)


def move_batch(batch: dict, device: torch.device | str) -> dict:
    return {k: move_batch(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def compute_loss(model: torch.nn.Module, batch: dict, task: Task, loss: str, **loss_kwargs) -> tuple[Tensor, dict]:
    """One forward pass and the named loss; returns (loss, detached outputs for the task's metrics).

    `model` may be wrapped in DDP: only its forward is called, so DDP's gradient hooks see every pass.
    """
    fn = LOSSES[loss]
    if task.batch_kind == "single":
        out = model(batch["inputs"])
        key = "preds" if task.label_kind == "float" else "logits"
        return fn(out, batch["labels"], **loss_kwargs), {key: out.detach(), "labels": batch["labels"]}
    if task.batch_kind == "distill":
        student = model(batch["inputs"])
        return fn(student, batch["teacher"], **loss_kwargs), {"student": student.detach(), "teacher": batch["teacher"]}
    if task.name == "pair_classification":
        logits = model(batch["a"], batch["b"])
        return fn(logits, batch["labels"], **loss_kwargs), {"logits": logits.detach(), "labels": batch["labels"]}
    u, v = model(batch["a"]), model(batch["b"])
    if task.batch_kind == "contrastive":
        return fn(u, v, **loss_kwargs), {"a": u.detach(), "b": v.detach()}
    scores = F.cosine_similarity(u.detach(), v.detach())
    return fn(u, v, batch["labels"], **loss_kwargs), {"scores": scores, "labels": batch["labels"]}
