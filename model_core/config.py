"""ModelConfig: everything needed to rebuild the model, and nothing about how it was trained.

It is saved as `model_config.json` inside every artifact. Run settings (learning rate, batch size, loss...) live in
the jobs' own configs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POOLERS = ("mean", "cls", "max", "sum", "mean_sqrt_len", "weighted_mean", "last_token", "local_mean")
HEADS = ("none", "dense", "classification", "multilabel", "pair_classification", "regression")
HEAD_ACTIVATIONS = ("identity", "tanh", "relu", "gelu")
GLOBAL_ATTENTION = ("none", "first")


class ConfigError(ValueError):
    """A configuration names something unknown or is inconsistent."""


@dataclass
class ModelConfig:
    encoder: str                          # where the encoder came from (HF id or path); informational once saved
    pooler: str = "mean"                  # one of POOLERS
    normalize: bool = False               # L2-normalise the embedding (after the dense projection, if any)
    dense_dim: int = 0                    # > 0 adds a dense projection (sentence-transformers' Dense) of this width
    dense_activation: str = "tanh"        # activation of the dense projection; ST's default is tanh
    head: str = "none"                    # task head on top of the embedding; one of HEADS ("dense" = projection only)
    num_labels: int = 0                   # classes for classification heads
    dropout: float = 0.1                  # dropout before the task head's linear layer
    max_length: int = 512                 # tokens per sequence incl. special tokens; capped at the model's limit
    global_attention: str = "none"        # Longformer: "first" puts global attention on the first token
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # HF config overrides, e.g. attention_type

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choice("pooler", self.pooler, POOLERS)
        _check_choice("head", self.head, HEADS)
        _check_choice("dense_activation", self.dense_activation, HEAD_ACTIVATIONS)
        _check_choice("global_attention", self.global_attention, GLOBAL_ATTENTION)
        if self.head == "dense" and self.dense_dim <= 0:
            raise ConfigError("head='dense' needs dense_dim > 0 (the projection's output width)")
        if self.head in ("classification", "multilabel", "pair_classification") and self.num_labels < 2:
            raise ConfigError(f"head={self.head!r} needs num_labels >= 2, got {self.num_labels}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pooler == "local_mean" and self.global_attention == "none":
            raise ConfigError("pooler='local_mean' excludes global-attention tokens: set global_attention='first'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")
