"""export_sentence_transformers: write a TextModel as a directory that `SentenceTransformer(path)` loads, with no
remote code, giving the same embeddings (the reverse of model_core/st_compat.py).

Export writes: HF encoder + tokenizer at the root, sentence_bert_config.json, 1_Pooling/config.json in the v5 key
style (ST v6 converts those keys silently, so both v5 and v6 load it), optional 2_Dense (config.json +
model.safetensors), an (empty) Normalize folder, modules.json with v5 type names (v6 maps them silently) and
config_sentence_transformers.json. It refuses: poolers without an ST mode (sum, local_mean), Longformer global
attention and BigBird's padded minimum length (ST does neither, so embeddings would differ), and task heads: an ST
model only embeds, so pass `drop_head=True` to export the embedding part (encoder, pooler, dense, normalize) alone.
Our encoders are built without the HF pooler layer, so ST's load report lists `pooler.dense.*` as MISSING (newly
initialised); ST never uses that layer for embeddings, so it changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

from model_core.model import TextModel, unwrap
from model_core.st_compat import LEGACY_POOLING_KEYS, POOLER_TO_ST, STCompatError
from model_core.tokenization import TextCollator


def _check_exportable(model: TextModel, collator: TextCollator, drop_head: bool) -> None:
    cfg = model.config
    if cfg.pooler not in POOLER_TO_ST:
        raise STCompatError(f"pooler {cfg.pooler!r} has no sentence-transformers Pooling mode; exportable poolers "
                            f"are {sorted(POOLER_TO_ST)}")
    if cfg.head not in ("none", "dense") and not drop_head:
        raise STCompatError(f"the model has a task head ({cfg.head!r}); a sentence-transformers model only embeds, "
                            "so its head cannot be exported: pass drop_head=True to export the embedding part alone")
    if cfg.global_attention != "none":
        raise STCompatError(f"global_attention={cfg.global_attention!r} has no sentence-transformers equivalent "
                            "(ST sends no global_attention_mask), so its embeddings would differ")
    if collator.min_length > 0:
        raise STCompatError(f"this architecture needs batches padded to {collator.min_length} tokens (BigBird "
                            "block-sparse); ST does not pad so, and would give different embeddings (set "
                            "encoder_kwargs attention_type='original_full' to export)")


def _pooling_config(pooler: str, dim: int) -> dict[str, Any]:
    """v5 key style: ST v5 needs it and ST v6 converts it silently."""
    mode = POOLER_TO_ST[pooler]
    flags = {key: key_mode == mode for key, key_mode in LEGACY_POOLING_KEYS.items()}
    return {"word_embedding_dimension": dim, **flags, "include_prompt": True}


def _dense_config(model: TextModel) -> dict[str, Any]:
    activation = type(model.dense.activation)
    return {"in_features": model.dense.linear.in_features, "out_features": model.dense.linear.out_features,
            "bias": True, "activation_function": f"{activation.__module__}.{activation.__qualname__}"}


def _write_json(file: Path, data: Any) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2))


def export_sentence_transformers(model: torch.nn.Module, collator: TextCollator, path: str | Path, *,
                                 drop_head: bool = False) -> Path:
    """Write `model` as a sentence-transformers directory at `path` (which must be empty or absent)."""
    model, path = unwrap(model), Path(path)
    _check_exportable(model, collator, drop_head)
    if path.exists() and any(path.iterdir()):
        raise STCompatError(f"{path} is not empty; export into a new directory so no stale module is left behind")
    path.mkdir(parents=True, exist_ok=True)
    model.encoder.hf.save_pretrained(path)
    collator.tokenizer.save_pretrained(path)
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": collator.max_length, "do_lower_case": False})
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    _write_json(path / "1_Pooling" / "config.json", _pooling_config(model.config.pooler, model.encoder.hidden_size))
    if model.dense is not None:
        modules.append(("2_Dense", "Dense"))
        _write_json(path / "2_Dense" / "config.json", _dense_config(model))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.dense.state_dict().items()},
                  str(path / "2_Dense" / "model.safetensors"))
    if model.config.normalize:
        folder = f"{len(modules)}_Normalize"
        (path / folder).mkdir()
        modules.append((folder, "Normalize"))
    _write_json(path / "modules.json", [{"idx": i, "name": str(i), "path": folder,
                                         "type": f"sentence_transformers.models.{kind}"}
                                        for i, (folder, kind) in enumerate(modules)])
    _write_json(path / "config_sentence_transformers.json",
                {"__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
                 "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"})
    return path
