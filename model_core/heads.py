"""Heads on top of the pooled embedding: a dense projection (part of the embedding) and task heads (logits).

Task heads:
- classification / multilabel: dropout + linear to num_labels logits (softmax CE vs. per-label BCE is the loss's job);
- pair_classification: linear over (u, v, |u - v|), as in sentence-transformers' SoftmaxLoss / SBERT NLI;
- regression: dropout + linear to one value.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model_core.config import ModelConfig

ACTIVATIONS = {"identity": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class DenseProjection(nn.Module):
    """Linear + activation, weight-compatible with sentence-transformers' `Dense` module (`linear.weight/bias`)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str = "tanh"):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x))


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x))


class PairHead(nn.Module):
    """Classifies a pair from its two embeddings via [u, v, |u - v|] (Reimers & Gurevych 2019)."""

    def __init__(self, dim: int, num_labels: int, dropout: float):
        super().__init__()
        self.head = LinearHead(3 * dim, num_labels, dropout)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.head(torch.cat([u, v, (u - v).abs()], dim=-1))


def build_task_head(cfg: ModelConfig, dim: int) -> nn.Module | None:
    """The task head for cfg.head over embeddings of width `dim`; None when the model only embeds."""
    if cfg.head in ("none", "dense"):
        return None
    if cfg.head in ("classification", "multilabel"):
        return LinearHead(dim, cfg.num_labels, cfg.dropout)
    if cfg.head == "regression":
        return LinearHead(dim, 1, cfg.dropout)
    if cfg.head == "pair_classification":
        return PairHead(dim, cfg.num_labels, cfg.dropout)
    raise ValueError(f"unknown head {cfg.head!r}")  # unreachable: ModelConfig validates
