"""The one on-disk format, used by training checkpoints, tuning results and the embed job.

    model_config.json     {"format": "docembed-artifact", "version": 1, "config": ModelConfig}
    encoder/              HF save_pretrained layout (config.json + model.safetensors)
    tokenizer/            HF tokenizer files
    modules.safetensors   pooler/dense/head weights (no tensors when the model has none)

Loading is strict (every file present, every tensor accounted for, shapes equal) and never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model_core.config import ModelConfig
from model_core.encoder import Encoder
from model_core.model import TextModel, build_model, unwrap
from model_core.tokenization import TextCollator

FORMAT = "docembed-artifact"
VERSION = 1
CONFIG_FILE = "model_config.json"
MODULES_FILE = "modules.safetensors"
REQUIRED = (CONFIG_FILE, MODULES_FILE, "encoder/config.json", "encoder/model.safetensors", "tokenizer")


class ArtifactError(ValueError):
    """An artifact directory is missing a file, is corrupt, or does not match its config."""


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _head_state(model: TextModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def save_artifact(model: torch.nn.Module, collator: TextCollator, path: str | Path) -> Path:
    """Write model (DDP/compile wrappers are unwrapped) and its tokenizer to `path`; returns the path."""
    model, path = unwrap(model), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(manifest, indent=2))
    model.encoder.hf.save_pretrained(path / "encoder")
    collator.tokenizer.save_pretrained(path / "tokenizer")
    save_file(_head_state(model), str(path / MODULES_FILE), metadata={"format": FORMAT})
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        manifest = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "config" not in manifest:
        raise ArtifactError(f"{path / CONFIG_FILE} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path} has artifact version {manifest.get('version')}; this code reads {VERSION}")
    return ModelConfig.from_dict(manifest["config"])


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[TextModel, TextCollator]:
    """Rebuild the model and its collator from an artifact directory."""
    path = Path(path)
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise ArtifactError(f"{path} is not a complete artifact: missing {missing}")
    cfg = read_config(path)
    try:
        encoder = Encoder.from_pretrained(path / "encoder", strict=True)
        heads = load_file(str(path / MODULES_FILE))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"cannot read the weights in {path}: {err}") from err
    model = build_model(cfg, encoder=encoder)
    _load_heads(model, heads, path)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=False)
    if len(tokenizer) > encoder.config.vocab_size:
        raise ArtifactError(f"{path}: tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary has "
                            f"{encoder.config.vocab_size} rows")
    return model.to(device), TextCollator.for_model(model, tokenizer)


def _load_heads(model: TextModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = _head_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    mis_shaped = [f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        raise ArtifactError(f"{path / MODULES_FILE} does not match {CONFIG_FILE}: missing={missing} "
                            f"unexpected={unexpected} mis-shaped={mis_shaped}")
    model.load_state_dict(tensors, strict=False)
