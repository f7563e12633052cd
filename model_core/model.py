"""TextModel: encoder -> pooler -> [dense projection] -> [L2 normalise] -> embedding -> [task head] -> logits.

One class for every architecture; `build_model(cfg)` is the only place that maps a ModelConfig to modules.
"""
from __future__ import annotations

from torch import Tensor, nn

from model_core.config import ModelConfig
from model_core.encoder import Encoder
from model_core.heads import DenseProjection, build_task_head
from model_core.pooling import Pooler, l2_normalize


class TextModel(nn.Module):
    def __init__(self, config: ModelConfig, encoder: Encoder, dense: DenseProjection | None = None,
                 head: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.pooler = Pooler(config.pooler)
        self.dense = dense
        self.head = head

    @property
    def embedding_dim(self) -> int:
        return self.config.dense_dim if self.dense is not None else self.encoder.hidden_size

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, D) float32 document embeddings."""
        pooled = self.pooler(self.encoder(batch), batch)
        if self.dense is not None:
            pooled = self.dense(pooled.to(self.dense.linear.weight.dtype)).float()
        return l2_normalize(pooled) if self.config.normalize else pooled

    def forward(self, batch: dict[str, Tensor], other: dict[str, Tensor] | None = None) -> Tensor:
        """Task output: logits (B, C), a value (B,) for regression, or embeddings (B, D) without a task head.

        A pair_classification model takes the pair's second side as `other`; going through forward (not a separate
        method) keeps DDP's gradient hooks in play.
        """
        if self.config.head == "pair_classification":
            if other is None:
                raise TypeError("a pair_classification model takes two batches: model(batch_a, batch_b)")
            return self.head(self.embed(batch), self.embed(other))
        z = self.embed(batch)
        if self.head is None:
            return z
        out = self.head(z.to(self.head.linear.weight.dtype))
        return out.squeeze(-1) if self.config.head == "regression" else out


def build_model(cfg: ModelConfig, encoder: Encoder | None = None, trust_remote_code: bool = False) -> TextModel:
    """Build the model for cfg; the encoder's weights come from `cfg.encoder` unless one is given.

    Pooler, dense projection and head start freshly initialised; `load_artifact` fills them from disk.
    """
    if encoder is None:
        encoder = Encoder.from_pretrained(cfg.encoder, cfg.encoder_kwargs, trust_remote_code=trust_remote_code)
    if cfg.global_attention == "none" and encoder.config.model_type == "longformer":
        encoder.freeze_unused_global_attention()
    dense = DenseProjection(encoder.hidden_size, cfg.dense_dim, cfg.dense_activation) if cfg.dense_dim else None
    dim = cfg.dense_dim or encoder.hidden_size
    return TextModel(cfg, encoder, dense, build_task_head(cfg, dim))


def unwrap(model: nn.Module) -> TextModel:
    """The TextModel inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, TextModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a TextModel (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model
