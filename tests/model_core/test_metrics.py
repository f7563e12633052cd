"""Task metrics: the guard against torcheval's macro-metric bugs, agreement with scikit-learn/scipy, and the
cross-rank sync (two real gloo processes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from sklearn import metrics as skm
from torcheval.metrics import MulticlassRecall

from model_core import TASKS, build_metrics
from model_core.metrics import average_ranks, retrieval_scores, scores_from_confusion


def _logits_for(preds, num_classes):
    return torch.nn.functional.one_hot(torch.as_tensor(preds), num_classes).float()


def test_torcheval_macro_recall_still_crashes_on_an_absent_class():
    """Why the guard exists (torcheval issues 150/189/216); if this starts passing, the guard may go."""
    metric = MulticlassRecall(num_classes=4, average="macro")
    metric.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 1, 1]))
    with pytest.raises(RuntimeError):
        metric.compute()


@pytest.mark.parametrize("case", range(20))
def test_classification_metrics_match_sklearn_even_with_absent_classes(case):
    rng = np.random.default_rng(case)
    num_classes = 5
    truth = rng.integers(0, 3, size=40)          # classes 3 and 4 never appear in the truth...
    preds = rng.integers(0, 4, size=40)          # ...and class 4 is never predicted either
    metrics = build_metrics(TASKS["classification"], num_classes)
    for chunk in np.array_split(np.arange(40), 3):   # updated per batch, computed once
        metrics.update({"logits": _logits_for(preds[chunk], num_classes), "labels": torch.as_tensor(truth[chunk])})
    got = metrics.compute()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(truth, preds))
    for name, fn in [("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)]:
        for avg in ("macro", "micro"):
            assert got[f"{name}_{avg}"] == pytest.approx(fn(truth, preds, average=avg, zero_division=0)), name


def test_binary_classification_adds_auroc():
    rng = np.random.default_rng(0)
    truth, logits = rng.integers(0, 2, 100), torch.as_tensor(rng.normal(size=(100, 2)), dtype=torch.float32)
    metrics = build_metrics(TASKS["classification"], 2)
    metrics.update({"logits": logits, "labels": torch.as_tensor(truth)})
    expected = skm.roc_auc_score(truth, logits.softmax(-1)[:, 1].numpy())
    assert metrics.compute()["auroc"] == pytest.approx(expected, abs=1e-6)


def test_pair_score_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 6, 200).astype(np.float32)          # many ties, as STS scores have
    pred = gold + rng.normal(scale=2.0, size=200).astype(np.float32)
    metrics = build_metrics(TASKS["pair_score"])
    metrics.update({"scores": torch.as_tensor(pred), "labels": torch.as_tensor(gold)})
    got = metrics.compute()
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, gold).statistic, abs=1e-9)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold).statistic, abs=1e-6)
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0])).tolist() == [2.5, 1.0, 2.5]


def test_retrieval_recall_and_mrr_over_the_whole_split():
    a = torch.eye(4)
    b = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # rows 1 and 2 are swapped
    got = retrieval_scores(a, b)
    assert got["recall@1"] == 0.5 and got["mrr"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)


def test_multilabel_scores_match_sklearn():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, size=(50, 4))
    logits = torch.as_tensor(rng.normal(size=(50, 4)), dtype=torch.float32)
    metrics = build_metrics(TASKS["multilabel"], 4)
    metrics.update({"logits": logits, "labels": torch.as_tensor(truth, dtype=torch.float32)})
    got, preds = metrics.compute(), (logits > 0).numpy()
    assert got["f1_micro"] == pytest.approx(skm.f1_score(truth, preds, average="micro"))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(truth, preds, average="macro", zero_division=0))
    assert got["exact_match"] == pytest.approx(skm.accuracy_score(truth, preds))


def _rank_main(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    truth = torch.arange(12) % 3
    preds = torch.tensor([0, 1, 1, 0, 1, 2, 2, 1, 0, 0, 2, 2])
    mine = slice(rank * 6, rank * 6 + 6)  # each rank sees half of the data
    metrics = build_metrics(TASKS["classification"], 3)
    metrics.update({"logits": _logits_for(preds[mine], 3), "labels": truth[mine]})
    scores = build_metrics(TASKS["pair_score"])
    scores.update({"scores": preds[mine].float() + 0.1 * rank, "labels": truth[mine].float()})
    results[rank] = (metrics.compute(), scores.compute())
    dist.destroy_process_group()


def test_compute_merges_all_ranks_and_agrees_on_every_rank():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1]
    truth, preds = np.arange(12) % 3, np.array([0, 1, 1, 0, 1, 2, 2, 1, 0, 0, 2, 2])
    assert results[0][0]["f1_macro"] == pytest.approx(skm.f1_score(truth, preds, average="macro"))
    single = scores_from_confusion(torch.as_tensor(skm.confusion_matrix(truth, preds)))
    assert results[0][0] == pytest.approx(single)
    assert results[0][1]["spearman"] < 1.0   # computed over both ranks' 12 pairs, not one rank's 6
