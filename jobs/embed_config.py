"""EmbedConfig: the run config of jobs.embed (YAML file, key=value overrides and command-line flags all fill it)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from jobs.common import RunConfigError

CHOICES = {
    "long_docs": ("truncate", "chunk"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "output_dtype": ("float32", "float16"),
    "on_existing": ("error", "resume", "overwrite"),
    "duplicate_ids": ("error", "warn"),
}


def _opt(default: Any, help_text: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class EmbedConfig:
    input: str = _opt("", "Parquet file, directory, glob or URI (s3://, gs://)")
    output: str = _opt("", "output directory (local or URI) for the Parquet pieces and _SUMMARY.json")
    model: str = _opt("", "model_core artifact, sentence-transformers or HF directory, or a hub id")
    text_column: str = _opt("text", "column holding the text")
    id_column: str = _opt("doc_id", "column identifying each row; copied to the output with its type")
    carry_columns: list[str] = _opt([], "more input columns to copy to the output (comma-separated)")
    max_length: int = _opt(0, "tokens per sequence, special tokens included; 0 = the model's own limit")
    long_docs: str = _opt("truncate", "truncate: keep the first max_length tokens and flag the row; chunk: "
                                      "embed overlapping windows and pool them, token-weighted")
    chunk_overlap: int = _opt(32, "tokens shared by consecutive windows in chunk mode")
    batch_tokens: int = _opt(0, "padded tokens per forward pass; 0 = 1536 on CPU, 65536 on GPU")
    min_actors: int = _opt(0, "smallest actor pool; 0 = max_actors (a fixed pool)")
    max_actors: int = _opt(0, "largest actor pool; 0 = as many as the cluster's CPUs or GPUs hold")
    cpus_per_actor: float = _opt(0.0, "logical CPUs each actor reserves, also its torch threads on CPU; 0 = "
                                      "1 with GPUs or separate tokenising, else min(4, CPUs of the biggest node)")
    gpus_per_actor: float = _opt(0.0, "GPUs each actor reserves; 0 = embed on CPU")
    torch_threads: int = _opt(0, "torch threads per actor; 0 = the CPUs Ray gave the actor")
    tokenize_tasks: bool | None = _opt(None, "tokenise in separate CPU tasks; unset = only when actors use GPUs")
    precision: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 autocast")
    output_dtype: str = _opt("float32", "element type of the embedding column: float32 or float16")
    normalize: bool | None = _opt(None, "L2-normalise the embeddings; unset = as the model does")
    rows_per_file: int = _opt(100_000, "most rows in one output file (files are smaller on small inputs)")
    on_existing: str = _opt("error", "when OUT holds an earlier run: error, resume (compute only missing "
                                     "rows) or overwrite")
    duplicate_ids: str = _opt("error", "error, or warn and embed every row anyway")
    num_cpus: int = _opt(0, "logical CPUs of a Ray started here; 0 = the machine's")
    dashboard: bool = _opt(False, "start Ray's dashboard with a Ray started here (seconds of start-up)")

    @classmethod
    def cli_flags(cls) -> list[tuple[str, type, str]]:
        """(field name, argparse type, help) per field; list fields are given comma-separated."""
        hints = typing.get_type_hints(cls)
        kinds = {str: str, int: int, float: float, bool: bool, bool | None: bool, list[str]: str}
        return [(f.name, kinds[hints[f.name]], f.metadata["help"]) for f in dataclasses.fields(cls)]

    def validate(self) -> None:
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise RunConfigError(f"{name} is required (--{name} or `{name}:` in the config file)")
        self._check_types()
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise RunConfigError(f"{name}={getattr(self, name)!r}; choose one of {list(choices)}")
        minimum = {"rows_per_file": 1, "max_length": 0, "chunk_overlap": 0, "batch_tokens": 0, "min_actors": 0,
                   "max_actors": 0, "cpus_per_actor": 0, "gpus_per_actor": 0, "torch_threads": 0, "num_cpus": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise RunConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_length == 1:
            raise RunConfigError("max_length must be 0 (the model's limit) or at least 2")
        if self.max_actors and self.min_actors > self.max_actors:
            raise RunConfigError(f"min_actors={self.min_actors} exceeds max_actors={self.max_actors}")

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        if isinstance(self.carry_columns, str):
            self.carry_columns = [c for c in self.carry_columns.split(",") if c]
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            ok = {str: isinstance(value, str), int: isinstance(value, int) and not isinstance(value, bool),
                  float: isinstance(value, (int, float)) and not isinstance(value, bool),
                  bool: isinstance(value, bool), bool | None: value is None or isinstance(value, bool),
                  list[str]: isinstance(value, list) and all(isinstance(v, str) for v in value)}[hint]
            if not ok:
                raise RunConfigError(f"{f.name}={value!r} is not a valid {hint}")

    def model_overrides(self) -> dict[str, Any]:
        return {"max_length": self.max_length} if self.max_length else {}


def effective_precision(config: EmbedConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if config.gpus_per_actor > 0 else "fp32"
