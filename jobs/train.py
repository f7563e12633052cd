"""Fine-tune the shared model with Ray Train V2.

    python -m jobs.train --config configs/train_agnews.yaml [key=value ...] --output DIR

Locally it starts Ray inside this process; under `ray job submit` (RAY_ADDRESS set) it joins that cluster. DIR
receives the best checkpoint's artifact (load it with `jobs.embed --model DIR` or model_core.load_model), the
metrics history (metrics.jsonl), a plot (training_curves.png) and a summary. Rerunning with the same run name
(`run.name`, default: DIR's name) resumes from that run's latest checkpoint. See docs/train.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jobs.common import cli_main, init_ray, worker_env
from jobs.train_config import TrainConfig, check_metric_name, load_train_config
from jobs.train_data import DataPlan, build_datasets, check_inputs, resolve_path
from jobs.train_export import export_run
from jobs.train_loop import load_start_model, train_worker
from model_core.tasks import TASKS


def preflight(cfg: TrainConfig) -> DataPlan:
    """Every check that can fail before Ray starts: the model fits the task, the data fits both."""
    model, _ = load_start_model(cfg)
    TASKS[cfg.task].check(model.config, cfg.loss_name)
    check_metric_name(cfg, model.config.num_labels)
    return check_inputs(cfg, model.config.num_labels, model.embedding_dim)


def build_trainer(cfg: TrainConfig, plan: DataPlan, run_name: str):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = cfg.scaling
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "train_rows": plan.train_rows},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=resolve_path(cfg.run.storage) if cfg.run.storage else None,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.metric_key,
                                               checkpoint_score_order=cfg.metric_mode),
            worker_runtime_env={"env_vars": worker_env()}),
        datasets=build_datasets(cfg),
        # Only "train" is split (every worker reads all of "val", see Trainer.evaluate); one worker needs no split
        # coordinator actor at all.
        dataset_config=DataConfig(datasets_to_split=["train"] if scaling.num_workers > 1 else []),
    )


def run(cfg: TrainConfig, output: str | Path) -> dict[str, Any]:
    """Check, train, export; returns the summary written to DIR/train_summary.json."""
    output = Path(output).expanduser().resolve()
    plan = preflight(cfg)
    init_ray()
    result = build_trainer(cfg, plan, cfg.run.name or output.name).fit()
    return export_run(result, cfg, output)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (configs/train_*.yaml)")
    parser.add_argument("--output", required=True, help="directory for the best model, metrics and plot")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5 scaling.num_workers=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # config, data and model errors are ValueErrors: say what is wrong, no traceback
    return cli_main("jobs.train", lambda: run(load_train_config(args.config, args.overrides), args.output),
                    (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
