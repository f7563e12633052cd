"""Overhead of the Ray Train loop against a bare single-process PyTorch loop: same model, data, batch, optimizer.

    python bench/bench_train_overhead.py [--steps 60] [--batch 32] [--reps 2] [--model MODEL]

Both loops train all-MiniLM-L6-v2 (classification head) on AG News texts (data/ag_news_1k.parquet, the same
training rows and order, no shuffling), batch 32 at up to 128 tokens, AdamW, 2 torch threads. The bare loop is what
one would write by hand: read the Parquet with pyarrow, collate with the same collator, forward/backward/step. The
Ray loop is `jobs.train` on one worker with 2 CPUs (Ray Data shard, per-step bookkeeping, a synced report every 10
steps, one evaluation and checkpoint at the last step, after the measured window).

Steady state = optimizer steps per second from step 10 to the last report before the final evaluation, both as
the mean over that window and from its fastest 10-step interval (robust to load from other processes on a shared
machine; the Ray numbers come from the job's own metrics.jsonl timestamps). Total = wall time of everything each
side needs, start to finish (the Ray side includes starting Ray Train's actors, the final evaluation and the
export). Repetitions alternate bare and Ray so that outside load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.common import init_ray  # noqa: E402
from jobs.train import run  # noqa: E402
from jobs.train_config import TrainConfig, load_train_config  # noqa: E402
from jobs.train_data import TaskCollateFn, in_validation  # noqa: E402
from jobs.train_loop import load_start_model  # noqa: E402
from jobs.train_optim import build_optimizer, build_scheduler, plan_steps  # noqa: E402
from model_core.tasks import TASKS, compute_loss  # noqa: E402

WARMUP_STEPS = 10


def config(args, name: str) -> TrainConfig:
    return load_train_config(REPO / "configs/train_agnews.yaml", [
        f"model.encoder={args.model}", "model.max_length=128", f"batch_size={args.batch}", f"max_steps={args.steps}",
        "log_every=10", f"eval_every={args.steps}", "data.shuffle_buffer=0", "early_stopping.patience=0",
        "scaling.cpus_per_worker=2", f"run.storage={args.output / 'ray_results'}", f"run.name={name}"])


def bare_loop(cfg: TrainConfig) -> dict[str, float]:
    """The same work without Ray: returns steady-state steps/s and total seconds."""
    started = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    model, collator = load_start_model(cfg)
    model.train()
    table = pq.read_table(REPO / cfg.data.train, columns=["text", "label"])
    texts = table.column("text").to_numpy(zero_copy_only=False)
    keep = ~in_validation(texts, cfg.data.val_fraction, cfg.seed)          # the job's training rows, in order
    rows = {"text": texts[keep], "label": table.column("label").to_numpy()[keep]}
    plan = plan_steps(cfg, int(keep.sum()), 1)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, plan, cfg.optim.schedule)
    collate, task = TaskCollateFn(cfg, collator, model.config.num_labels), TASKS[cfg.task]
    starts = range(0, len(rows["text"]), cfg.batch_size)                # epochs of batches, as Ray Data cuts them
    stamps = []
    for step in range(cfg.max_steps):
        start = starts[step % len(starts)]
        loss, _ = compute_loss(model, collate({k: v[start: start + cfg.batch_size] for k, v in rows.items()}), task,
                               cfg.loss_name)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    marks = {step: stamps[step - 1] for step in report_steps(cfg)}
    return rates(marks) | {"total_s": time.perf_counter() - started}


def report_steps(cfg: TrainConfig) -> list[int]:
    """Steps 10, 20, ... up to the last report before the final (evaluating) one."""
    return list(range(WARMUP_STEPS, (cfg.max_steps // 10 - 1) * 10 + 1, 10))


def rates(marks: dict[int, float]) -> dict[str, float]:
    steps = sorted(marks)
    intervals = [(marks[b] - marks[a]) / (b - a) for a, b in zip(steps, steps[1:])]
    return {"steps_per_s": (steps[-1] - steps[0]) / (marks[steps[-1]] - marks[steps[0]]),
            "best_steps_per_s": 1 / min(intervals)}


def ray_loop(cfg: TrainConfig, output: Path) -> dict[str, float]:
    started = time.perf_counter()
    run(cfg, output)
    total = time.perf_counter() - started
    records = {r["step"]: r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())}
    return rates({step: records[step]["time_s"] for step in report_steps(cfg)}) | {"total_s": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--output", type=Path, default=REPO / "out/bench/train_overhead")
    args = parser.parse_args(argv)
    init_ray(num_cpus=4)   # logical CPUs: the 2-thread worker plus Ray Data's read tasks
    results: dict[str, list[dict]] = {"bare": [], "ray": []}
    for rep in range(args.reps):
        name = f"overhead_{int(time.time())}_{rep}"
        results["bare"].append(bare_loop(config(args, name)))
        results["ray"].append(ray_loop(config(args, name), args.output / name))
        print(f"rep {rep}: bare {results['bare'][-1]}  ray {results['ray'][-1]}", flush=True)
    keys = ("steps_per_s", "best_steps_per_s", "total_s")
    summary = {side: {k: statistics.median(r[k] for r in runs) for k in keys} for side, runs in results.items()}
    print(json.dumps({"runs": results, "median": summary}, indent=2))
    for key in ("steps_per_s", "best_steps_per_s"):
        bare, ray_rate = summary["bare"][key], summary["ray"][key]
        print(f"steady state ({key}): bare {bare:.3f}, ray {ray_rate:.3f} -> Ray overhead "
              f"{1 - ray_rate / bare:+.1%} (limit 10%)")
    print(f"total: bare {summary['bare']['total_s']:.1f} s, ray {summary['ray']['total_s']:.1f} s "
          f"({args.steps} steps of {args.batch})")


if __name__ == "__main__":
    main()
