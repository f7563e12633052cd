"""Loss functions on tensors, chosen by name through LOSSES; never inferred from label dtypes.

Each takes model outputs and targets and returns a scalar. Which outputs a loss receives is the task's business
(model_core/tasks.py); here is only the maths, so each loss is testable without a model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Single-label classification: logits (B, C), labels (B,) int class ids."""
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


def bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label classification: logits (B, C), labels (B, C) multi-hot 0/1."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def mse(preds: Tensor, labels: Tensor) -> Tensor:
    """Regression: preds (B,), labels (B,)."""
    return F.mse_loss(preds.float(), labels.float())


def cosine_similarity_loss(u: Tensor, v: Tensor, scores: Tensor) -> Tensor:
    """Scored pairs: MSE between cos(u, v) and the gold score, which must already be scaled to [-1, 1] or [0, 1]."""
    return F.mse_loss(F.cosine_similarity(u.float(), v.float()), scores.float())


def cosent(u: Tensor, v: Tensor, scores: Tensor, scale: float = 20.0) -> Tensor:
    """CoSENT (Su 2022): log(1 + sum over pairs (i, j) with score_i < score_j of exp(scale * (cos_i - cos_j))).

    Only the order of the gold scores matters, so they need no rescaling.
    """
    cos = F.cosine_similarity(u.float(), v.float()) * scale
    diff = cos[:, None] - cos[None, :]                       # (B, B): cos_i - cos_j
    wrong_order = scores[:, None] < scores[None, :]           # pairs where i should score lower than j
    diff = diff.masked_fill(~wrong_order, float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)


def mnrl(a: Tensor, b: Tensor, scale: float = 20.0, symmetric: bool = False) -> Tensor:
    """In-batch negatives (MultipleNegativesRanking / InfoNCE): a_i's positive is b_i, every other b_j a negative.

    Gradient accumulation does not add negatives: the loss only ever sees one micro-batch.
    """
    sims = scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (B, B)
    targets = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(sims, targets)
    return (loss + F.cross_entropy(sims.T, targets)) / 2 if symmetric else loss


def mnrl_symmetric(a: Tensor, b: Tensor, scale: float = 20.0) -> Tensor:
    return mnrl(a, b, scale=scale, symmetric=True)


def distill_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Distillation to teacher embeddings (B, D): mean squared error."""
    return F.mse_loss(student.float(), teacher.float())


def distill_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Distillation to teacher embeddings (B, D): 1 - cosine similarity, averaged."""
    return (1 - F.cosine_similarity(student.float(), teacher.float())).mean()


LOSSES = {
    "cross_entropy": cross_entropy,
    "bce": bce,
    "mse": mse,
    "cosine": cosine_similarity_loss,
    "cosent": cosent,
    "mnrl": mnrl,
    "mnrl_symmetric": mnrl_symmetric,
    "distill_mse": distill_mse,
    "distill_cosine": distill_cosine,
}
