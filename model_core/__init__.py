"""model_core: the one pure-PyTorch document encoder shared by training, tuning and batch embedding.

Never imports ray (tests/model_core/test_no_ray.py enforces it). See docs/DESIGN.md for how the pieces fit.
"""
from model_core.artifact import ArtifactError, is_artifact, load_artifact, save_artifact
from model_core.config import ConfigError, ModelConfig
from model_core.encoder import Encoder
from model_core.model import TextModel, build_model, unwrap
from model_core.losses import LOSSES
from model_core.metrics import MetricSet, build_metrics
from model_core.pooling import POOL_FUNCTIONS, Pooler
from model_core.resolve import ModelResolveError, load_model
from model_core.st_compat import STCompatError, load_sentence_transformers
from model_core.st_export import export_sentence_transformers
from model_core.tasks import TASKS, Task, collate_task_batch, compute_loss, get_task
from model_core.tokenization import TextCollator, TokenizedDocs, is_empty, token_budget_batches

__all__ = [
    "LOSSES", "POOL_FUNCTIONS", "TASKS", "ArtifactError", "ConfigError", "Encoder", "MetricSet", "ModelConfig",
    "ModelResolveError", "Pooler", "STCompatError", "Task", "TextCollator", "TextModel", "TokenizedDocs",
    "build_metrics", "build_model", "collate_task_batch", "compute_loss", "export_sentence_transformers",
    "get_task", "is_artifact", "is_empty", "load_artifact", "load_model", "load_sentence_transformers",
    "save_artifact", "token_budget_batches", "unwrap",
]
