"""What a training checkpoint holds and how a run picks up from one; early stopping.

A checkpoint directory is a model_core artifact (so `jobs.embed --model CHECKPOINT` works on it) with two files
beside it: `train_state.pt` (optimizer, scheduler, grad scaler, progress and early-stopping state: tensors and
plain Python values only, written by torch.save and read back with torch.load(weights_only=True), which never
unpickles code) and `history.jsonl` (every metrics record reported so far, so the history survives restarts).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_core.artifact import load_artifact, save_artifact
from model_core.model import unwrap

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.jsonl"


@dataclass
class Progress:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # the epoch in progress (0-based)
    batches_in_epoch: int = 0     # micro-batches of that epoch already consumed (a whole number of steps)


@dataclass
class EarlyStopper:
    """Stops after `patience` evaluations in a row that do not beat the best value by more than `min_delta`."""
    mode: str = "max"
    patience: int = 0             # 0: never stop early (still tracks the best)
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            gain = value - self.best if self.mode == "max" else self.best - value
            improved = gain > self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience


@dataclass
class RunState:
    progress: Progress = field(default_factory=Progress)
    stopper: EarlyStopper = field(default_factory=EarlyStopper)
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None   # the step of the checkpoint this attempt started from


def save_checkpoint(directory: Path, model: torch.nn.Module, collator, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, state: RunState) -> Path:
    """Write the artifact plus train_state.pt and history.jsonl into `directory` (rank 0 only)."""
    save_artifact(unwrap(model), collator, directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "progress": asdict(state.progress),
                "stopper": asdict(state.stopper)}, directory / STATE_FILE)
    write_history(directory / HISTORY_FILE, state.history)
    return directory


def restore_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                       scaler: torch.amp.GradScaler) -> RunState:
    """Load weights and every piece of training state from a checkpoint written by save_checkpoint."""
    trained, _ = load_artifact(directory)
    unwrap(model).load_state_dict(trained.state_dict())
    saved = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    progress = Progress(**saved["progress"])
    return RunState(progress, EarlyStopper(**saved["stopper"]), read_history(directory / HISTORY_FILE),
                    resumed_from=progress.step)


def write_history(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
