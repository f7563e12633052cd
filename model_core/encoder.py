"""Encoder: one wrapper for every Hugging Face encoder architecture.

The architecture is whatever `AutoModel` builds from a config or checkpoint; nothing here is per-family except a few
named facts read from the HF config (Longformer's attention window, BigBird's block-sparse minimum length).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging as hf_logging

# Inputs an encoder forward may receive from our collator; anything else in a batch (labels, n_tokens...) is dropped.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "global_attention_mask")


def _model_class(hf_config: PretrainedConfig) -> type[PreTrainedModel]:
    try:
        return MODEL_MAPPING[type(hf_config)]
    except KeyError as err:
        raise ValueError(f"no AutoModel class for model_type {hf_config.model_type!r}") from err


def _build_kwargs(model_class: type[PreTrainedModel]) -> dict:
    """No unused HF pooler layer (it breaks DDP and wastes memory); SDPA only where the architecture has it."""
    kwargs = {"attn_implementation": "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return kwargs


class Encoder(nn.Module):
    """Any HF encoder; `forward(batch)` returns token embeddings (B, T, H)."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.hf = hf_model
        self.accepts = set(inspect.signature(hf_model.forward).parameters) & set(MODEL_INPUTS)

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder_kwargs: dict | None = None, trust_remote_code: bool = False,
                        strict: bool = False) -> "Encoder":
        """Load HF weights (safetensors only, float32). Missing or mis-shaped weights always raise; weights the
        model does not use raise only when `strict` (the HF pooler layer of a BERT checkpoint is expected extra)."""
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **(encoder_kwargs or {}))
        model_class = _model_class(hf_config)
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # our own check below replaces HF's load report
        try:
            hf_model, info = model_class.from_pretrained(
                path, config=hf_config, use_safetensors=True, dtype=torch.float32, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by name below instead of HF's generic RuntimeError
                trust_remote_code=trust_remote_code, **_build_kwargs(model_class))
        finally:
            hf_logging.set_verbosity(previous)
        unexpected = info["unexpected_keys"] if strict else {k for k in info["unexpected_keys"]
                                                               if not k.startswith("pooler.")}
        problems = {"missing": info["missing_keys"], "mis-shaped": info["mismatched_keys"], "unexpected": unexpected}
        problems = {kind: sorted(map(str, keys)) for kind, keys in problems.items() if keys}
        if problems:
            raise ValueError(f"encoder weights in {path} do not fit its config: {problems}")
        return cls(hf_model)

    @classmethod
    def from_config(cls, hf_config: PretrainedConfig) -> "Encoder":
        """Random initial weights, e.g. for tests built from tiny configs."""
        model_class = _model_class(hf_config)
        return cls(model_class._from_config(hf_config, **_build_kwargs(model_class)))

    @property
    def config(self) -> PretrainedConfig:
        return self.hf.config

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    def max_positions(self) -> int:
        """The longest input the position embeddings allow (RoBERTa-style models offset positions by pad+1)."""
        limit = getattr(self.config, "max_position_embeddings", None) or 10**9
        padding_idx = getattr(getattr(self.hf, "embeddings", None), "padding_idx", None)
        return limit - (padding_idx + 1) if padding_idx is not None else limit

    def padding_rules(self) -> tuple[int | None, int]:
        """(pad_to_multiple_of, min_length) the architecture needs from the collator.

        BigBird's block-sparse attention silently and permanently switches the whole model to full attention when
        a batch is <= (5 + 2 * num_random_blocks) * block_size tokens (transformers #20031); padding every batch to
        one more block keeps it block-sparse, so a document's embedding does not depend on its batch-mates.
        """
        cfg = self.config
        if getattr(cfg, "attention_type", None) == "block_sparse":
            block = cfg.block_size
            return block, (6 + 2 * cfg.num_random_blocks) * block
        window = getattr(cfg, "attention_window", None)
        if window is not None:  # Longformer pads to a multiple of its window anyway; doing it here avoids a warning
            return (max(window) if isinstance(window, (list, tuple)) else int(window)), 0
        return None, 0

    def freeze_unused_global_attention(self) -> None:
        """Longformer's global-attention projections get no gradient when no token is global; DDP rejects that."""
        for name, param in self.hf.named_parameters():
            if "_global" in name.rsplit(".", 2)[-2]:
                param.requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in self.accepts}
        return self.hf(**inputs).last_hidden_state
