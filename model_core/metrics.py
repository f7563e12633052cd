"""torcheval metrics per task: update per batch, compute once per evaluation, synced across ranks.

Guard against torcheval 0.0.7's macro-metric bugs: `MulticlassRecall(average="macro")` crashes when a class is
absent from the data seen (torcheval issues 150/189/216, fix PR 166 never released), and its macro scores do not
follow one convention. So classification state is a torcheval `MulticlassConfusionMatrix` (plain sums, which merge
exactly across ranks) and precision/recall/F1 are derived from it the way scikit-learn defines them: macro averages
over the classes present in the targets or predictions, 0 where a ratio is 0/0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torcheval.metrics import BinaryAUROC, Cat, Mean, MeanSquaredError, Metric, MulticlassConfusionMatrix
from torcheval.metrics.toolkit import sync_and_compute_collection

from model_core.tasks import Task

RECALL_AT = (1, 5, 10)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def scores_from_confusion(cm: Tensor) -> dict[str, float]:
    """Accuracy and precision/recall/F1 (macro and micro) from a (C, C) confusion matrix [true, predicted]."""
    cm = cm.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    total = cm.sum().clamp(min=1)
    micro = float(tp.sum() / total)  # single-label: micro P = micro R = micro F1 = accuracy
    return {"accuracy": micro, "precision_macro": float(precision[present].mean()),
            "recall_macro": float(recall[present].mean()), "f1_macro": float(f1[present].mean()),
            "precision_micro": micro, "recall_micro": micro, "f1_micro": micro}


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).scatter_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.norm() * y.norm()).item()
    return float((x * y).sum() / den) if den > 0 else 0.0


def spearman(x: Tensor, y: Tensor) -> float:
    return pearson(average_ranks(x.double()), average_ranks(y.double()))


def retrieval_scores(a: Tensor, b: Tensor) -> dict[str, float]:
    """Each a_i's relevant item is b_i among all of b: recall@k and MRR over cosine similarity."""
    sims = F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T
    rank = (sims > sims.diag().unsqueeze(1)).sum(1) + 1  # 1-based rank of the true match (ties count in its favour)
    out = {f"recall@{k}": float((rank <= k).double().mean()) for k in RECALL_AT if k <= len(b)}
    return out | {"mrr": float((1.0 / rank.double()).mean())}


def multilabel_scores(logits: Tensor, labels: Tensor) -> dict[str, float]:
    pred, gold = (logits > 0), labels > 0.5
    tp, fp, fn = (pred & gold).sum(0).double(), (pred & ~gold).sum(0).double(), (~pred & gold).sum(0).double()
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    present = (tp + fp + fn) > 0
    return {"f1_micro": float(_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
            "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
            "exact_match": float((pred == gold).all(1).double().mean())}


class MetricSet:
    """The torcheval metrics of one task; `compute` returns plain floats, identical on every rank."""

    def __init__(self, task: Task, num_labels: int = 0, device: str | torch.device = "cpu"):
        self.task, self.num_labels = task, num_labels
        kind = task.name if task.name in ("multilabel", "pair_score", "contrastive", "distillation") else \
            ("classification" if task.label_kind == "class" else "regression")
        self.kind = kind
        self.metrics: dict[str, Metric] = {
            "classification": lambda: {"confusion": MulticlassConfusionMatrix(num_labels, device=device)}
            | ({"auroc": BinaryAUROC(device=device)} if num_labels == 2 else {}),
            "multilabel": lambda: {"logits": Cat(device=device), "labels": Cat(device=device)},
            "regression": lambda: {"mse": MeanSquaredError(device=device), "preds": Cat(device=device),
                                   "labels": Cat(device=device)},
            "pair_score": lambda: {"scores": Cat(device=device), "labels": Cat(device=device)},
            "contrastive": lambda: {"a": Cat(device=device), "b": Cat(device=device)},
            "distillation": lambda: {"mse": MeanSquaredError(device=device), "cosine": Mean(device=device)},
        }[kind]()

    def update(self, outputs: dict[str, Tensor]) -> None:
        m, o = self.metrics, {k: v.detach() for k, v in outputs.items()}
        if self.kind == "classification":
            m["confusion"].update(o["logits"].argmax(-1), o["labels"])
            if "auroc" in m:
                m["auroc"].update(o["logits"].float().softmax(-1)[:, 1], o["labels"])
        elif self.kind == "distillation":
            m["mse"].update(o["student"].float(), o["teacher"].float())
            m["cosine"].update(F.cosine_similarity(o["student"].float(), o["teacher"].float()))
        else:
            if self.kind == "regression":
                m["mse"].update(o["preds"].float(), o["labels"].float())
            for name in m.keys() - {"mse"}:
                m[name].update(o[name].float())

    def compute(self) -> dict[str, float]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            values = sync_and_compute_collection(self.metrics)
        else:
            values = {name: metric.compute() for name, metric in self.metrics.items()}
        return self._derive(values)

    def _derive(self, v: dict[str, Tensor]) -> dict[str, float]:
        if self.kind == "classification":
            return scores_from_confusion(v["confusion"]) | ({"auroc": float(v["auroc"])} if "auroc" in v else {})
        if self.kind == "multilabel":
            return multilabel_scores(v["logits"], v["labels"])
        if self.kind == "regression":
            return {"mse": float(v["mse"]), "pearson": pearson(v["preds"], v["labels"]),
                    "spearman": spearman(v["preds"], v["labels"])}
        if self.kind == "pair_score":
            return {"spearman": spearman(v["scores"], v["labels"]), "pearson": pearson(v["scores"], v["labels"])}
        if self.kind == "contrastive":
            return retrieval_scores(v["a"], v["b"])
        return {"mse": float(v["mse"]), "cosine": float(v["cosine"])}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def build_metrics(task: Task, num_labels: int = 0, device: str | torch.device = "cpu") -> MetricSet:
    return MetricSet(task, num_labels, device)
