"""Run configuration of `python -m jobs.train`: typed dataclasses read from YAML plus `key=value` overrides.

The `model:` section is model_core's ModelConfig. Its `encoder` names where the weights start from (an artifact,
a sentence-transformers or HF directory, or a hub id); the other model fields written in the config override the
starting model's, and fields left out keep the starting model's values (its pooler, dense layer, head...).
Everything else here is about how to train, and never goes into the saved model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs.common import RunConfigError, from_dict, merge, parse_overrides
from model_core.config import ModelConfig
from model_core.losses import LOSSES
from model_core.tasks import TASKS

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
# The validation metric that picks the best checkpoint when the config names none (see model_core/metrics.py).
DEFAULT_METRIC = {"classification": "accuracy", "pair_classification": "accuracy", "multilabel": "f1_micro",
                  "regression": "spearman", "pair_score": "spearman", "contrastive": "mrr", "distillation": "cosine"}
LOWER_IS_BETTER = ("loss", "mse")
_CLASS_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro",
                  "f1_micro")
# What model_core.metrics reports per task on validation (plus "loss"); "auroc" only with two classes.
VALIDATION_METRICS = {
    "classification": _CLASS_METRICS, "pair_classification": _CLASS_METRICS,
    "multilabel": ("f1_micro", "f1_macro", "exact_match"), "regression": ("mse", "pearson", "spearman"),
    "pair_score": ("spearman", "pearson"), "contrastive": ("recall@1", "recall@5", "recall@10", "mrr"),
    "distillation": ("mse", "cosine")}


@dataclass
class DataSettings:
    train: str = ""                      # Parquet file or directory with the training rows
    val: str = ""                        # Parquet validation rows; empty = hold out `val_fraction` of `train`
    val_fraction: float = 0.0            # used only without `val`; the split is seeded by `seed`
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column in the files: {text: body}
    label_names: list[str] = field(default_factory=list)   # string labels: class id = position in this list
    label_separator: str = ""            # multilabel string labels: "sci|space" is split on this
    score_scale: float = 1.0             # float labels are multiplied by it (STS 0..5 -> 0.2 for the cosine loss)
    teacher: str = ""                    # distillation: Parquet written by jobs.embed (id + embedding)
    id_column: str = "doc_id"            # joins training rows to teacher rows
    teacher_id_column: str = ""          # the teacher file's id column; empty = id_column
    teacher_column: str = "embedding"
    shuffle_buffer: int = 10_000         # rows in Ray Data's local shuffle buffer (>= rows: a full shuffle per
                                         # epoch; files sorted by label or genre need that); 0 keeps the file order


@dataclass
class OptimSettings:
    lr: float = 2e-5
    weight_decay: float = 0.01           # AdamW's decoupled decay; never applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "linear"             # after warm-up: linear or cosine decay to 0, or constant
    warmup_ratio: float = 0.1            # warm-up as a fraction of the total optimizer steps
    warmup_steps: int = 0                # > 0 overrides warmup_ratio
    max_grad_norm: float = 1.0           # clip the global gradient norm; 0 turns clipping off


@dataclass
class EarlyStopping:
    patience: int = 0                    # evaluations without improvement before stopping; 0 turns it off
    min_delta: float = 0.0               # an improvement smaller than this does not count


@dataclass
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class RunSettings:
    name: str = ""                       # stable run name; rerunning it resumes. Empty = the output dir's name
    storage: str = ""                    # Ray Train storage (shared: NFS/S3 on a cluster); empty = ~/ray_results
    max_failures: int = 2                # worker-group restarts from the latest checkpoint before giving up
    keep_checkpoints: int = 2            # the best N by `metric` are kept (plus always the latest)


@dataclass
class FaultInjection:
    """Proves failure recovery (tests, cluster drills): the last rank hard-exits once after this optimizer step."""
    crash_after_step: int = 0            # 0 = never
    marker: str = ""                     # file created just before the crash; while it exists, no crash


@dataclass
class TrainConfig:
    model: ModelConfig
    task: str = "classification"
    loss: str = ""                       # empty = the task's default loss
    loss_args: dict[str, Any] = field(default_factory=dict)  # e.g. {scale: 20.0} for mnrl/cosent
    data: DataSettings = field(default_factory=DataSettings)
    metric: str = ""                     # validation metric for best checkpoints and early stopping
    mode: str = ""                       # "max" or "min"; empty = min for loss/mse, else max
    epochs: int = 1
    max_steps: int = 0                   # > 0 stops after this many optimizer steps
    batch_size: int = 32                 # rows per micro-batch on each worker
    grad_accum: int = 1                  # micro-batches per optimizer step
    gradcache: int = 0                   # contrastive: > 0 embeds in chunks of this many rows (GradCache)
    precision: str = "fp32"              # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    seed: int = 0
    log_every: int = 10                  # optimizer steps between running train-metric reports
    eval_every: int = 0                  # optimizer steps between evaluations + checkpoints; 0 = each epoch
    optim: OptimSettings = field(default_factory=OptimSettings)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    fault_injection: FaultInjection = field(default_factory=FaultInjection)
    model_overrides: list[str] = field(default_factory=list)  # model fields set in the config (filled by the loader)

    @property
    def loss_name(self) -> str:
        return self.loss or TASKS[self.task].losses[0]

    @property
    def metric_key(self) -> str:
        """The metric as reported to Ray, e.g. "val/accuracy"."""
        name = self.metric or DEFAULT_METRIC[self.task]
        return name if name.startswith("val/") else f"val/{name}"

    @property
    def metric_mode(self) -> str:
        return self.mode or ("min" if self.metric_key.split("/", 1)[1] in LOWER_IS_BETTER else "max")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The run config from a YAML file plus `key=value` overrides, validated; remembers which model keys were set."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise RunConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
    data = merge(data, parse_overrides(overrides or []))
    if not isinstance(data.get("model"), dict) or not data["model"].get("encoder"):
        raise RunConfigError("the config needs a model section naming the starting model: model.encoder=...")
    data["model_overrides"] = sorted(set(data["model"]) - {"encoder"})
    cfg = TrainConfig.from_dict(data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise RunConfigError for any setting that cannot work, before anything heavy starts."""
    if cfg.task not in TASKS:
        raise RunConfigError(f"unknown task {cfg.task!r}; choose one of {sorted(TASKS)}")
    task = TASKS[cfg.task]
    if cfg.loss and cfg.loss not in LOSSES:
        raise RunConfigError(f"unknown loss {cfg.loss!r}; choose one of {sorted(LOSSES)}")
    if cfg.loss_name not in task.losses:
        raise RunConfigError(f"loss {cfg.loss_name!r} does not fit task {cfg.task!r}; use one of {list(task.losses)}")
    _check_choice("precision", cfg.precision, PRECISIONS)
    _check_choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _check_choice("mode", cfg.metric_mode, ("max", "min"))
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "scaling.num_workers"):
        value = cfg.scaling.num_workers if name == "scaling.num_workers" else getattr(cfg, name)
        if value < 1:
            raise RunConfigError(f"{name} must be at least 1, got {value}")
    if cfg.gradcache and task.batch_kind != "contrastive":
        raise RunConfigError(f"gradcache only applies to the contrastive task, not {cfg.task!r}")
    if not cfg.data.train:
        raise RunConfigError("data.train must name the training Parquet file or directory")
    if not cfg.data.val and not 0.0 < cfg.data.val_fraction < 1.0:
        raise RunConfigError("give data.val (a validation Parquet) or data.val_fraction in (0, 1)")
    if task.label_kind == "embedding" and not cfg.data.teacher:
        raise RunConfigError("the distillation task needs data.teacher: the teacher embeddings written by jobs.embed")
    if cfg.fault_injection.crash_after_step and not cfg.fault_injection.marker:
        raise RunConfigError("fault_injection.crash_after_step needs fault_injection.marker (a file path that "
                             "records the crash, so that it happens only once)")
    if cfg.run.keep_checkpoints < 1:
        raise RunConfigError(f"run.keep_checkpoints must be at least 1, got {cfg.run.keep_checkpoints}")


def check_metric_name(cfg: TrainConfig, num_labels: int) -> None:
    """The chosen metric must be one the task reports, or early stopping would fail at the first evaluation."""
    known = ("loss",) + VALIDATION_METRICS[cfg.task]
    if TASKS[cfg.task].label_kind == "class" and num_labels == 2:
        known += ("auroc",)
    name = cfg.metric_key.split("/", 1)[1]
    if name not in known:
        raise RunConfigError(f"metric {cfg.metric_key!r} is not reported by task {cfg.task!r}; choose one of "
                             f"{['val/' + k for k in known]}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RunConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")
