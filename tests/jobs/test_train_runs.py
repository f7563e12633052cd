"""jobs.train end to end on the shared Ray cluster, one short run per task config on committed real data.

What each run proves: DDP + accumulation equals one big batch (AG News); early stopping stops at the expected
evaluation (IMDB); rerunning an interrupted run resumes it and a killed worker is restarted from the last
checkpoint (multi-label 20 Newsgroups); real MiniLM on STS pairs; contrastive with GradCache on two workers;
distillation from MiniLM teacher embeddings. (BBC's config is checked in test_train_inputs.py.)

    python -m pytest tests/jobs/test_train_runs.py -v
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.embed import run as embed_run
from jobs.embed_config import EmbedConfig
from jobs.train import run
from jobs.train_config import load_train_config
from jobs.train_loop import load_start_model
from jobs.train_state import STATE_FILE
from model_core import load_artifact, load_model
from tests.conftest import DATA, REPO

pytestmark = pytest.mark.slow
CONFIGS = REPO / "configs"
NO_DROPOUT = ["model.dropout=0.0", "model.encoder_kwargs.hidden_dropout_prob=0.0",
              "model.encoder_kwargs.attention_probs_dropout_prob=0.0"]


def train(config: str, tmp_path: Path, output: str, *overrides: str) -> tuple[dict, Path]:
    """One run of configs/<config> into tmp_path/<output>; returns (summary, output dir)."""
    cfg = load_train_config(CONFIGS / config, [f"run.storage={tmp_path / 'ray_results'}", *overrides])
    return run(cfg, tmp_path / output), tmp_path / output


def history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def final_train_state(summary: dict) -> dict:
    return torch.load(Path(summary["latest_checkpoint"]) / STATE_FILE, weights_only=True)


def adam_steps(state: dict) -> set[int]:
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


def ag_news_file(tmp_path: Path, name: str, start: int, stop: int) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pq.read_table(DATA / "ag_news_1k.parquet").slice(start, stop - start), path)
    return str(path)


def test_two_workers_with_accumulation_equal_one_worker_with_the_whole_batch(ray_cluster, tiny_encoder_dirs,
                                                                              tmp_path):
    """2 workers x 2 micro-batches x 2 rows = 1 worker x 8 rows: the same parameters after one AdamW step."""
    common = [f"model.encoder={tiny_encoder_dirs['bert']}", *NO_DROPOUT, "data.shuffle_buffer=0",
              f"data.train={ag_news_file(tmp_path, 'train8', 0, 8)}",
              f"data.val={ag_news_file(tmp_path, 'val', 8, 12)}",
              "max_steps=1", "log_every=1", "optim.lr=0.001", "optim.warmup_ratio=0", "optim.schedule=constant",
              "optim.max_grad_norm=0"]
    _, single = train("train_agnews.yaml", tmp_path, "single", *common, "scaling.num_workers=1", "batch_size=8")
    _, multi = train("train_agnews.yaml", tmp_path, "multi", *common, "scaling.num_workers=2", "batch_size=2",
                     "grad_accum=2")
    one, two = history(single)[0], history(multi)[0]
    assert one["step"] == two["step"] == 1
    # Adam hides a gradient's scale, so compare the logged (unclipped) gradient norm and loss as well.
    assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4)
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5)
    torch.manual_seed(0)  # as the workers do before building the fresh head
    start, _ = load_start_model(load_train_config(CONFIGS / "train_agnews.yaml", common[:4]))
    a, b = load_artifact(single)[0].state_dict(), load_artifact(multi)[0].state_dict()
    moved = max((a[k] - start.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-4
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_early_stopping_stops_at_the_expected_evaluation(ray_cluster, tiny_encoder_dirs, tmp_path, monkeypatch):
    """lr=0 keeps validation AUROC constant: best at step 2, no gain at 4 and 6, patience 2 -> stop at step 6.
    (Of equal checkpoints the later one counts as best, as Ray ranks them.) Also: a relative run.storage is taken
    from the driver's working directory (Ray Train itself only accepts absolute paths and URIs)."""
    monkeypatch.chdir(tmp_path)
    summary, output = train("train_imdb.yaml", tmp_path, "imdb", f"model.encoder={tiny_encoder_dirs['bert']}",
                            "optim.lr=0.0", "batch_size=4", "max_steps=20", "eval_every=2", "log_every=2",
                            "early_stopping.patience=2", "model.max_length=64", "run.storage=relative_results",
                            f"data.train={DATA / 'imdb_200.parquet'}")
    assert summary["best_checkpoint"].startswith(str(tmp_path / "relative_results"))
    evaluations = [r["step"] for r in history(output) if "val/auroc" in r]
    assert evaluations == [2, 4, 6]
    assert summary["stopped_early"] and summary["last_step"] == 6 and summary["best_step"] == 6
    assert (output / "training_curves.png").stat().st_size > 10_000
    assert load_artifact(output)[0].config.num_labels == 2


def test_interrupted_run_resumes_on_rerun_and_a_killed_worker_restarts(ray_cluster, tiny_encoder_dirs, tmp_path):
    """Multi-label 20 Newsgroups, checkpoints every 3 steps, 12 steps in all.

    Run 1 (max_failures=0): the worker hard-exits after step 5, so the run fails; its last checkpoint is step 3.
    Run 2, the same run name: resumes from step 3. The worker dies again after step 8 (max_failures=1): Ray
    restarts the worker group from the step-6 checkpoint and the run finishes at step 12, with one unbroken
    history and the optimizer and scheduler having counted every step exactly once. (One worker keeps this test
    short; which rank dies does not matter to Ray, which restarts the whole group, and the multi-worker paths are
    covered by the DDP and GradCache runs.)
    """
    base = [f"model.encoder={tiny_encoder_dirs['bert']}", "batch_size=2", "max_steps=12", "eval_every=3",
            "log_every=1"]
    first, second = tmp_path / "crash_1", tmp_path / "crash_2"
    with pytest.raises(Exception, match="(?i)fail"):
        train("train_multilabel.yaml", tmp_path, "multilabel", *base, "run.max_failures=0",
              "fault_injection.crash_after_step=5", f"fault_injection.marker={first}")
    assert first.read_text() == "crashed after step 5\n"
    assert not (tmp_path / "multilabel" / "metrics.jsonl").exists()

    summary, output = train("train_multilabel.yaml", tmp_path, "multilabel", *base, "run.max_failures=1",
                            "fault_injection.crash_after_step=8", f"fault_injection.marker={second}")
    assert second.read_text() == "crashed after step 8\n"
    records = history(output)
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [3, 6]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 13))
    state = final_train_state(summary)
    assert adam_steps(state) == {12} and state["scheduler"]["last_epoch"] == 12 and state["progress"]["step"] == 12
    assert summary["last_step"] == 12 and 0.0 <= records[-1]["val/f1_micro"] <= 1.0


def test_sts_pairs_with_the_real_minilm(ray_cluster, tmp_path):
    summary, output = train("train_sts.yaml", tmp_path, "sts", "max_steps=6", "eval_every=6", "log_every=3")
    assert summary["metric"] == "val/spearman" and 0.6 < summary["best_value"] < 1.0
    model, collator = load_model(output)
    emb = model.eval().embed(collator(["A man is playing a guitar.", "Someone plays guitar."]))
    assert emb.shape == (2, 384) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


def test_contrastive_with_gradcache_on_two_workers(ray_cluster, tiny_encoder_dirs, tmp_path):
    summary, output = train("train_contrastive.yaml", tmp_path, "contrastive",
                            f"model.encoder={tiny_encoder_dirs['bert']}", "scaling.num_workers=2", "batch_size=8",
                            "gradcache=3", "max_steps=4", "eval_every=4", "log_every=2", "model.max_length=48")
    last = history(output)[-1]
    assert last["step"] == 4 and np.isfinite(last["train/loss"])
    assert {"val/recall@1", "val/recall@5", "val/recall@10", "val/mrr"} <= last.keys()
    assert 0.0 < last["val/mrr"] <= 1.0 and summary["metric"] == "val/mrr"


def test_distillation_from_minilm_teacher_embeddings(ray_cluster, tiny_encoder_dirs, tmp_path):
    """The teacher file is what users have: jobs.embed's output directory for the same rows."""
    rows = pq.read_table(DATA / "ag_news_1k.parquet").slice(0, 96)
    pq.write_table(rows, tmp_path / "corpus.parquet")
    embed_run(EmbedConfig(input=str(tmp_path / "corpus.parquet"), output=str(tmp_path / "teacher"),
                          model="sentence-transformers/all-MiniLM-L6-v2"))
    summary, output = train("train_distill.yaml", tmp_path, "distill", f"model.encoder={tiny_encoder_dirs['bert']}",
                            "model.dense_dim=384", f"data.train={ag_news_file(tmp_path, 'train', 0, 64)}",
                            f"data.val={ag_news_file(tmp_path, 'val', 64, 96)}",
                            f"data.teacher={tmp_path / 'teacher'}", "batch_size=16", "max_steps=6",
                            "eval_every=3", "log_every=3", "optim.lr=0.001")
    mse = [r["val/mse"] for r in history(output) if "val/mse" in r]
    assert len(mse) == 2 and mse[1] < mse[0]
    assert load_artifact(output)[0].embedding_dim == 384
