"""What a finished run leaves in the output directory: the best artifact, the metrics history and a plot.

    DIR/model_config.json, encoder/, tokenizer/, modules.safetensors   the best checkpoint's artifact
    DIR/metrics.jsonl                                                  every reported record (train and val)
    DIR/training_curves.png                                            loss, learning rate, validation metrics
    DIR/train_summary.json                                             best metric/step, run name, checkpoint paths
    DIR/run_config.yaml                                                the effective run config
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from jobs.train_config import TrainConfig
from jobs.train_state import HISTORY_FILE, read_history
from model_core.artifact import CONFIG_FILE, MODULES_FILE

ARTIFACT_ENTRIES = (CONFIG_FILE, MODULES_FILE, "encoder", "tokenizer")


def pick_best(checkpoints: list[tuple[Any, dict]], metric: str, mode: str):
    """(checkpoint, metrics) with the best value of `metric`; NaN never wins. A tie goes to the later step, as in
    Ray's own ranking (CheckpointConfig keeps the later of equal checkpoints), so the pick is always still kept."""
    scored = [(c, m) for c, m in checkpoints if isinstance(m.get(metric), (int, float)) and not math.isnan(m[metric])]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda cm: (sign * cm[1][metric], cm[1].get("step", 0)))


def copy_artifact(source: Path, output: Path) -> None:
    """The artifact part of a checkpoint (not its optimizer state) into `output`, replacing an older one."""
    output.mkdir(parents=True, exist_ok=True)
    for entry in ARTIFACT_ENTRIES:
        target = output / entry
        if target.is_dir():
            shutil.rmtree(target)
        if (source / entry).is_dir():
            shutil.copytree(source / entry, target)
        else:
            shutil.copy2(source / entry, target)


def export_run(result, cfg: TrainConfig, output: Path) -> dict[str, Any]:
    """Write the output directory from a finished Ray Train Result; returns the summary it wrote."""
    if result.checkpoint is None:
        raise RuntimeError(f"the run reported no checkpoint (error: {result.error})")
    best, best_metrics = pick_best(result.best_checkpoints or [], cfg.metric_key, cfg.metric_mode) or \
        (result.checkpoint, {})
    with best.as_directory() as directory:
        copy_artifact(Path(directory), output)
    with result.checkpoint.as_directory() as directory:
        history = read_history(Path(directory) / HISTORY_FILE)
    (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    plot_history(history, output / "training_curves.png", cfg.metric_key)
    (output / "run_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    last = next((r for r in reversed(history) if "val/loss" in r), {})
    summary = {"run_name": result.path.rstrip("/").rsplit("/", 1)[-1], "run_path": result.path,
               "metric": cfg.metric_key, "mode": cfg.metric_mode, "best_value": best_metrics.get(cfg.metric_key),
               "best_step": best_metrics.get("step"), "best_checkpoint": best.path,
               "latest_checkpoint": result.checkpoint.path, "last_step": last.get("step"),
               "stopped_early": bool(last.get("stopped_early", False))}
    (output / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in history if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_history(history: list[dict], path: Path, metric: str) -> None:
    """Three panels over optimizer steps: train/val loss, learning rate, validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, val_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        loss_ax.plot(*_series(history, key), style, label=key)
    lr_ax.plot(*_series(history, "train/lr"), label="train/lr")
    val_keys = sorted({k for r in history for k in r if k.startswith("val/") and k != "val/loss"})
    for key in val_keys:
        val_ax.plot(*_series(history, key), "o-", label=key, linewidth=2.5 if key == metric else 1.0)
    for ax, title in ((loss_ax, "loss"), (lr_ax, "learning rate"), (val_ax, "validation metrics")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
