"""Benchmark: jobs.embed end to end vs SentenceTransformer.encode in one process, same corpus, same machine, one run.

    python bench/bench_embed.py                                  # 7,600 AG News docs, all-MiniLM-L6-v2, CPU
    python bench/bench_embed.py --repeats 3 --limit 2000         # quicker; medians of 3 alternating runs
    python bench/bench_embed.py --gpu                            # bf16 on one GPU, for both sides

Each side runs as a fresh Python process timed from here, start to exit: imports, model load, reading the Parquet
file, embedding and writing the embeddings to Parquet; for the job also Ray's start-up and shutdown. The two sides
alternate within a repeat so that a noisy neighbour hurts both. Real tokens are counted with the model's tokenizer
(same truncation for both); sentence-transformers' padding is simulated from its batching (sorted by characters,
`--st-batch-size` texts per batch, padded to the longest).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "ag_news_test.parquet"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

ST_SCRIPT = """
import json, sys, time
import pyarrow as pa, pyarrow.parquet as pq, torch
from sentence_transformers import SentenceTransformer
from model_core.resolve import MINILM_ID, packaged_minilm
source, model_name, batch_size, gpu, output = sys.argv[1:6]
path = str(packaged_minilm()) if model_name.lower() == MINILM_ID.lower() else model_name
kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if gpu == "1" else {}
model = SentenceTransformer(path, device="cuda" if gpu == "1" else "cpu", **kwargs)
table = pq.read_table(source, columns=["doc_id", "text"])
started = time.perf_counter()
emb = model.encode(table["text"].to_pylist(), batch_size=int(batch_size), convert_to_numpy=True).astype("float32")
encode_s = time.perf_counter() - started
column = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
pq.write_table(pa.table({"doc_id": table["doc_id"], "embedding": column}), output)
print(json.dumps({"encode_s": encode_s, "max_seq_length": model.max_seq_length}))
"""


def token_stats(source: Path, model: str, st_batch_size: int) -> dict:
    """Real tokens per doc (as both sides truncate) and sentence-transformers' padded tokens."""
    from model_core import load_model

    _, collator = load_model(model)
    texts = pq.read_table(source, columns=["text"])["text"].to_pylist()
    lengths = collator.tokenize(texts, allow_empty=True).n_tokens
    order = np.argsort([-len(t) for t in texts], kind="stable")    # SentenceTransformer.encode's order
    padded = sum(len(b) * lengths[b].max() for b in np.array_split(order, -(-len(order) // st_batch_size)))
    return {"docs": len(texts), "real_tokens": int(lengths.sum()), "st_padded_tokens": int(padded)}


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def run_st(args, source: Path, work: Path, env: dict) -> dict:
    command = [sys.executable, "-c", ST_SCRIPT, str(source), args.model, str(args.st_batch_size),
               "1" if args.gpu else "0", str(work / "st.parquet")]
    wall, stdout = timed(command, env)
    return {"wall_s": wall, **json.loads(stdout.strip().splitlines()[-1])}


def run_job(args, source: Path, work: Path, env: dict) -> dict:
    command = [sys.executable, "-m", "jobs.embed", "--input", str(source), "--output", str(work / "job"),
               "--model", args.model, "--on-existing", "overwrite", *(["--gpus-per-actor", "1"] if args.gpu else []),
               *args.job_args]
    wall, _ = timed(command, env)
    summary = json.loads((work / "job" / "_SUMMARY.json").read_text())
    return {"wall_s": wall, "padding_efficiency": summary["padding_efficiency"], "ray_start_s": summary["ray_start_s"],
            "embed_s": summary["embed_s"], "actors": summary["actors"], "precision": summary["precision"]}


def report(name: str, walls: list[float], docs: int, real: int, efficiency: float) -> float:
    wall = statistics.median(walls)
    print(f"{name:<34} {wall:8.1f} s {docs / wall:9.1f} docs/s {real / wall:10.0f} real tok/s "
          f"{efficiency:9.3f}   runs: {', '.join(f'{w:.1f}' for w in walls)}")
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--model", default=MINILM_ID)
    parser.add_argument("--limit", type=int, default=0, help="first N documents only (0 = all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--st-batch-size", type=int, default=32, help="encode() batch size (its default is 32)")
    parser.add_argument("--gpu", action="store_true", help="bf16 on one GPU for both sides")
    parser.add_argument("--job-args", nargs=argparse.REMAINDER, default=[], help="extra jobs.embed flags (last)")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        work, source = Path(tmp), args.input
        if args.limit:
            source = work / "input.parquet"
            pq.write_table(pq.read_table(args.input).slice(0, args.limit), source)
        stats = token_stats(source, args.model, args.st_batch_size)
        st_runs, job_runs = [], []
        for repeat in range(args.repeats):   # alternate who goes first
            order = [("st", run_st), ("job", run_job)][:: 1 if repeat % 2 == 0 else -1]
            for name, runner in order:
                result = runner(args, source, work, env)
                (st_runs if name == "st" else job_runs).append(result)
                print(f"  repeat {repeat + 1} {name}: {json.dumps(result)}", flush=True)
    docs, real = stats["docs"], stats["real_tokens"]
    print(f"\n{docs} docs, {real} real tokens, {os.cpu_count()} CPUs, {'GPU bf16' if args.gpu else 'CPU fp32'}, "
          f"input {args.input}")
    print(f"{'':<34} {'wall':>10} {'docs/s':>16} {'real tok/s':>21} {'pad eff':>9}")
    st_wall = report(f"SentenceTransformer.encode (bs {args.st_batch_size})", [r["wall_s"] for r in st_runs], docs,
                     real, real / stats["st_padded_tokens"])
    job_wall = report("jobs.embed (Ray start-up included)", [r["wall_s"] for r in job_runs], docs, real,
                      job_runs[-1]["padding_efficiency"])
    print(f"ratio jobs.embed / SentenceTransformer (docs/s, end to end): {st_wall / job_wall:.2f}x")


if __name__ == "__main__":
    main()
