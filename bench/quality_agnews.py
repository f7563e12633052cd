"""Quality check: AG News accuracy of a jobs.train classification run against a logistic-regression probe on the
frozen all-MiniLM-L6-v2 embeddings.

    python bench/quality_agnews.py [--data ../shared/data/ag_news_test.parquet] [--output out/bench/quality_agnews]
                                   [key=value ...]

Data decision: the shared AG News test split only (7,600 articles, 1,900 per class; the 581-row train sample is
too small to matter). The job's own seeded hash split (data.val_fraction=0.25, seed 0) holds out ~1,900 articles;
both the fine-tuned model and the probe learn from the other ~5,700 and are scored on exactly those held-out rows.
The fine-tuned accuracy is computed here from the exported artifact (and matches the job's val/accuracy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.common import init_ray  # noqa: E402
from jobs.train import run  # noqa: E402
from jobs.train_config import load_train_config  # noqa: E402
from jobs.train_data import in_validation  # noqa: E402
from model_core import load_model  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FRACTION, SEED = 0.25, 0


def batched(model, collator, texts: list[str], fn, batch: int = 64) -> torch.Tensor:
    order = np.argsort([len(t) for t in texts])
    outputs = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            idx = order[start: start + batch]
            for i, row in zip(idx, fn(model, collator([texts[i] for i in idx]))):
                outputs[i] = row
    return torch.stack(outputs)


def probe_accuracy(texts: list[str], labels: np.ndarray, held_out: np.ndarray) -> float:
    model, collator = load_model(MINILM, max_length=128)
    features = batched(model.eval(), collator, texts, lambda m, b: m.embed(b)).numpy()
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(features[~held_out], labels[~held_out])
    return float(probe.score(features[held_out], labels[held_out]))


def tuned_accuracy(output: str, texts: list[str], labels: np.ndarray, held_out: np.ndarray) -> float:
    model, collator = load_model(output)
    test = [t for t, h in zip(texts, held_out) if h]
    logits = batched(model.eval(), collator, test, lambda m, b: m(b))
    return float((logits.argmax(-1).numpy() == labels[held_out]).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/ag_news_test.parquet"))
    parser.add_argument("--output", default=str(REPO / "out/bench/quality_agnews"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    table = pq.read_table(args.data, columns=["text", "label"])
    texts, labels = table.column("text").to_pylist(), table.column("label").to_numpy()
    held_out = in_validation(np.asarray(texts, dtype=object), FRACTION, SEED)
    print(f"{len(texts)} articles: {int((~held_out).sum())} train, {int(held_out.sum())} held out", flush=True)
    started = time.perf_counter()
    probe = probe_accuracy(texts, labels, held_out)
    print(f"logistic-regression probe on frozen MiniLM: {probe:.4f} ({time.perf_counter() - started:.0f} s)",
          flush=True)

    cfg = load_train_config(REPO / "configs/train_agnews.yaml", [
        f"data.train={args.data}", f"data.val_fraction={FRACTION}", f"seed={SEED}", "epochs=1", "batch_size=32",
        "log_every=20", "early_stopping.patience=0", "scaling.cpus_per_worker=2",
        f"run.storage={Path(args.output).parent / 'ray_results'}", f"run.name=quality_agnews_{int(time.time())}",
        *args.overrides])
    init_ray(num_cpus=4)
    started = time.perf_counter()
    summary = run(cfg, args.output)
    minutes = (time.perf_counter() - started) / 60
    tuned = tuned_accuracy(args.output, texts, labels, held_out)
    print(json.dumps(summary, indent=2))
    print(f"logistic-regression probe on frozen MiniLM: {probe:.4f}")
    print(f"fine-tuned, 1 epoch ({minutes:.1f} min):       {tuned:.4f} "
          f"(job's val/accuracy {summary['best_value']:.4f})")


if __name__ == "__main__":
    main()
