"""Quality check: one epoch of jobs.train on STS benchmark train must raise all-MiniLM-L6-v2's dev Spearman.

    python bench/quality_sts.py [--train ../shared/data/sts_train.parquet] [--dev ../shared/data/sts_dev.parquet]
                                [--output out/bench/quality_sts] [key=value ...]

Both numbers are computed the same way, outside the training job: Spearman between the cosine of the two
sentences' embeddings and the gold score over every dev pair (as sentence-transformers' EmbeddingSimilarity
evaluator does). The run uses configs/train_sts.yaml (cosine loss) with one epoch; extra key=value pairs override it.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.common import init_ray  # noqa: E402
from jobs.train import run  # noqa: E402
from jobs.train_config import load_train_config  # noqa: E402
from model_core import load_model  # noqa: E402
from model_core.metrics import spearman  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def embed(model, collator, texts: list[str], batch: int = 64) -> torch.Tensor:
    order = np.argsort([len(t) for t in texts])            # similar lengths together: little padding
    out = torch.empty(len(texts), model.embedding_dim)
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            idx = order[start: start + batch]
            out[idx] = model.embed(collator([texts[i] for i in idx]))
    return out


def dev_spearman(model_name: str, dev: Path) -> float:
    model, collator = load_model(model_name)
    model.eval()
    table = pq.read_table(dev, columns=["sentence1", "sentence2", "score"])
    a = embed(model, collator, table.column("sentence1").to_pylist())
    b = embed(model, collator, table.column("sentence2").to_pylist())
    return spearman(F.cosine_similarity(a, b), torch.tensor(table.column("score").to_numpy()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default=str(REPO.parent / "shared/data/sts_train.parquet"))
    parser.add_argument("--dev", default=str(REPO.parent / "shared/data/sts_dev.parquet"))
    parser.add_argument("--output", default=str(REPO / "out/bench/quality_sts"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = dev_spearman(MINILM, Path(args.dev))
    print(f"base all-MiniLM-L6-v2   STS-b dev Spearman: {base:.4f}", flush=True)

    cfg = load_train_config(REPO / "configs/train_sts.yaml", [
        f"data.train={args.train}", f"data.val={args.dev}", "epochs=1", "eval_every=0", "log_every=20",
        "scaling.cpus_per_worker=2", f"run.storage={Path(args.output).parent / 'ray_results'}",
        f"run.name=quality_sts_{int(time.time())}", *args.overrides])
    init_ray(num_cpus=4)    # logical CPUs: the 2-thread worker plus Ray Data's read tasks
    started = time.perf_counter()
    summary = run(cfg, args.output)
    minutes = (time.perf_counter() - started) / 60
    tuned = dev_spearman(args.output, Path(args.dev))
    print(json.dumps(summary, indent=2))
    print(f"base all-MiniLM-L6-v2   STS-b dev Spearman: {base:.4f}")
    print(f"after 1 epoch ({minutes:.1f} min) STS-b dev Spearman: {tuned:.4f}  ({tuned - base:+.4f})")


if __name__ == "__main__":
    main()
