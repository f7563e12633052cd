"""sentence-transformers interop without importing sentence_transformers.

`load_sentence_transformers(path)` reads a sentence-transformers (ST) model directory into a TextModel;
model_core/st_export.py writes one back. The one pipeline both sides share:

    Transformer (at "" or an old-style "0_Transformer/") -> Pooling (one mode) -> [Dense] -> [Normalize]

What loading reads, and what it refuses (an STCompatError naming the problem, raised before any weights load):
- modules.json types in the v5 spelling (`sentence_transformers.models.Pooling`) or v6 module paths
  (`sentence_transformers.base.modules.transformer.Transformer`,
  `sentence_transformers.sentence_transformer.modules.pooling.Pooling`, `...base.modules.dense.Dense`,
  `...base.modules.normalize.Normalize`); anything else (custom modules, Router/Asym, CNN, LSTM...) is refused.
- 1_Pooling/config.json in both key styles: v5 (`word_embedding_dimension` + `pooling_mode_*` booleans) and v6
  (`embedding_dimension`, `pooling_mode` as a string or a list). As in ST v6, `pooling_mode` wins over the
  booleans and no mode at all means mean. Several concatenated modes are refused. `include_prompt` is ignored:
  model_core never prepends prompts, and without a prompt it changes nothing.
- Dense: config.json (in/out features, bias, activation) + model.safetensors, or pytorch_model.bin read only with
  torch.load(weights_only=True). The activation must be a torch class model_core has (Tanh, Identity, ReLU, GELU);
  ST would silently fall back to Tanh for other untrusted names, we refuse. `bias: false` loads as a zero bias
  (same output; it becomes trainable). Residual Dense, several Dense modules, or Normalize before Dense: refused.
- Normalize: its folder may be missing (the packaged all-MiniLM-L6-v2 lists 2_Normalize without one).
- sentence_bert_config.json: `max_seq_length` -> ModelConfig.max_length (v6 saves omit it and keep the limit in the
  tokenizer's model_max_length; then we use that, capped at max_position_embeddings, as ST does);
  `do_lower_case: true` prepends a Lowercase normaliser to the (fast) tokenizer, exactly as ST does, and records it
  where save_pretrained keeps it (see lowercase_tokenizer), so artifacts and exports keep lowercasing.
- config_sentence_transformers.json: a default prompt (ST would prepend it to every text) or a model_type other
  than SentenceTransformer is refused; named prompts are ignored.

Exporting is model_core/st_export.py.
"""
from __future__ import annotations

import inspect
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from model_core.config import ConfigError, ModelConfig
from model_core.encoder import Encoder
from model_core.heads import ACTIVATIONS
from model_core.model import TextModel, build_model
from model_core.tokenization import TextCollator

# ST Pooling mode -> our pooler. The legacy booleans are listed in ST's own concatenation order.
ST_TO_POOLER = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
                "weightedmean": "weighted_mean", "lasttoken": "last_token"}
POOLER_TO_ST = {ours: st for st, ours in ST_TO_POOLER.items()}
LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                       "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
MODULE_NAMESPACES = ("sentence_transformers.models.", "sentence_transformers.base.modules.",
                     "sentence_transformers.sentence_transformer.modules.")
MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
TRANSFORMER_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json",
                            "sentence_distilbert_config.json", "sentence_camembert_config.json",
                            "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                            "sentence_xlnet_config.json")
ACTIVATION_BY_CLASS = {cls.__name__: name for name, cls in ACTIVATIONS.items()}   # "Tanh" -> "tanh"


class STCompatError(ValueError):
    """A sentence-transformers directory model_core cannot load faithfully, or a model it cannot export as one."""


@dataclass
class DenseSpec:
    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str          # one of model_core's ACTIVATIONS names


@dataclass
class STPlan:
    """Everything a sentence-transformers directory says, read from its JSON files (no weights)."""
    root: Path
    encoder_dir: Path
    pooler: str
    pooling_dim: int
    max_seq_length: int | None
    do_lower_case: bool
    dense: DenseSpec | None
    normalize: bool


def check_overrides(overrides: dict[str, Any], forbidden: tuple[str, ...], source: str) -> None:
    """Refuse override names ModelConfig does not have, or ones `source` decides itself."""
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown ModelConfig overrides {unknown}; known keys: {sorted(known)}")
    clashing = sorted(set(overrides) & set(forbidden))
    if clashing:
        raise ConfigError(f"cannot override {clashing} when loading {source}: it decides them itself")


def require_safetensors(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise STCompatError(f"{folder} has no *.safetensors weights; model_core never unpickles pytorch_model.bin "
                            "for an encoder (load it once with transformers and save_pretrained it to convert)")


def _read_json(file: Path, expected: type = dict) -> Any:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise STCompatError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, expected):
        raise STCompatError(f"{file} holds a JSON {type(data).__name__}, expected a {expected.__name__}")
    return data


def _module_kind(type_name: str, where: str) -> str:
    kind = type_name.rsplit(".", 1)[-1]
    if type_name.startswith(MODULE_NAMESPACES) and kind in MODULE_KINDS:
        return kind
    raise STCompatError(f"{where}: module type {type_name!r} is not supported; model_core loads only "
                        f"{list(MODULE_KINDS)} from sentence_transformers (custom modules need their own code)")


def _read_modules(root: Path) -> list[tuple[str, Path]]:
    """(kind, folder) per modules.json entry, in order, checked against the one pipeline we support."""
    entries = _read_json(root / "modules.json", list)
    if not all(isinstance(e, dict) and "type" in e for e in entries):
        raise STCompatError(f"{root / 'modules.json'} is not a list of modules with a 'type'")
    modules = []
    for entry in sorted(entries, key=lambda e: e.get("idx", 0)):
        rel = Path(entry.get("path", ""))
        if rel.is_absolute() or ".." in rel.parts:
            raise STCompatError(f"{root / 'modules.json'}: module path {str(rel)!r} leaves the model directory")
        modules.append((_module_kind(entry["type"], str(root / "modules.json")), root / rel))
    kinds = "".join(kind[0] for kind, _ in modules)       # e.g. "TPDN"
    if kinds not in ("TP", "TPD", "TPN", "TPDN"):
        raise STCompatError(f"{root}: module sequence {[k for k, _ in modules]} is not supported; model_core "
                            "loads Transformer -> Pooling -> [one Dense] -> [Normalize]")
    return modules


def _transformer_settings(folder: Path) -> tuple[int | None, bool]:
    """(max_seq_length, do_lower_case) from the Transformer module's sentence_bert_config.json."""
    found = [folder / name for name in TRANSFORMER_CONFIG_FILES if (folder / name).is_file()]
    config = _read_json(found[0]) if found else {}
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise STCompatError(f"{found[0]}: transformer_task {task!r} is not supported (only 'feature-extraction')")
    if config.get("processing_kwargs"):
        raise STCompatError(f"{found[0]}: processing_kwargs {config['processing_kwargs']} change tokenisation, "
                            "which model_core does not reproduce")
    return config.get("max_seq_length"), bool(config.get("do_lower_case", False))


def _pooling_settings(folder: Path) -> tuple[str, int]:
    """(our pooler name, embedding dimension) from 1_Pooling/config.json in either key style."""
    file = folder / "config.json"
    if not file.is_file():
        raise STCompatError(f"the Pooling module has no {file}")
    config = _read_json(file)
    modes = config.get("pooling_mode")
    if modes is None:   # v5 style: one boolean per mode; none set means mean, as ST v6 reads it
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1:
        raise STCompatError(f"{file}: several concatenated pooling modes {modes} are not supported; "
                            "model_core pools with exactly one mode")
    if modes[0] not in ST_TO_POOLER:
        raise STCompatError(f"{file}: unknown pooling mode {modes[0]!r}; ST modes are {list(ST_TO_POOLER)}")
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if not isinstance(dim, int):
        raise STCompatError(f"{file} gives no embedding_dimension / word_embedding_dimension")
    return ST_TO_POOLER[modes[0]], dim


def _dense_settings(folder: Path) -> DenseSpec:
    file = folder / "config.json"
    if not file.is_file():
        raise STCompatError(f"the Dense module has no {file}")
    config = _read_json(file)
    if config.get("use_residual") or config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise STCompatError(f"{file}: only a plain Dense on the sentence embedding is supported (no residual, "
                            "no other input)")
    activation_path = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    activation = ACTIVATION_BY_CLASS.get(activation_path.rsplit(".", 1)[-1])
    if not activation_path.startswith("torch.") or activation is None:
        raise STCompatError(f"{file}: activation {activation_path!r} is not supported; model_core has "
                            f"{sorted(ACTIVATION_BY_CLASS)} from torch.nn")
    if not all(isinstance(config.get(key), int) for key in ("in_features", "out_features")):
        raise STCompatError(f"{file} needs integer in_features and out_features")
    return DenseSpec(folder, config["in_features"], config["out_features"], bool(config.get("bias", True)), activation)


def _check_normalize(folder: Path) -> None:
    file = folder / "config.json"
    config = _read_json(file) if file.is_file() else {}   # the folder may be missing entirely
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise STCompatError(f"{file}: Normalize on {config['module_input_name']!r} is not supported "
                            "(only on the sentence embedding)")


def _check_model_settings(root: Path) -> None:
    file = root / "config_sentence_transformers.json"
    config = _read_json(file) if file.is_file() else {}
    if config.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise STCompatError(f"{file}: model_type {config['model_type']!r} is not a SentenceTransformer")
    if config.get("default_prompt_name"):
        raise STCompatError(f"{file}: default prompt {config['default_prompt_name']!r} would be prepended to every "
                            "text by ST; model_core does not add prompts")


def read_sentence_transformers(path: str | Path) -> STPlan:
    """Parse and check an ST directory's JSON files; raises STCompatError before any weights are read."""
    root = Path(path)
    if not (root / "modules.json").is_file():
        raise STCompatError(f"{root} is not a sentence-transformers directory: no modules.json")
    _check_model_settings(root)
    modules = _read_modules(root)
    by_kind = {kind: folder for kind, folder in modules}
    max_seq_length, lower = _transformer_settings(by_kind["Transformer"])
    pooler, dim = _pooling_settings(by_kind["Pooling"])
    dense = _dense_settings(by_kind["Dense"]) if "Dense" in by_kind else None
    if "Normalize" in by_kind:
        _check_normalize(by_kind["Normalize"])
    return STPlan(root, by_kind["Transformer"], pooler, dim, max_seq_length, lower, dense, "Normalize" in by_kind)


def _check_dimensions(plan: STPlan, hidden_size: int) -> None:
    if plan.pooling_dim != hidden_size:
        raise STCompatError(f"{plan.root}: Pooling embedding dimension {plan.pooling_dim} does not match the "
                            f"encoder's hidden size {hidden_size}")
    if plan.dense is not None and plan.dense.in_features != hidden_size:
        raise STCompatError(f"{plan.dense.folder}: Dense in_features {plan.dense.in_features} does not match the "
                            f"pooled embedding dimension {hidden_size}")


def _read_dense_weights(spec: DenseSpec) -> dict[str, torch.Tensor]:
    """ST Dense weights (`linear.weight`, `linear.bias`), checked against its config; no bias -> zeros."""
    safetensors, pickled = spec.folder / "model.safetensors", spec.folder / "pytorch_model.bin"
    try:
        if safetensors.is_file():
            tensors = load_file(str(safetensors))
        elif pickled.is_file():
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        else:
            raise STCompatError(f"{spec.folder} has no model.safetensors or pytorch_model.bin")
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise STCompatError(f"cannot read the Dense weights in {spec.folder}: {err}") from err
    if not isinstance(tensors, dict):
        raise STCompatError(f"{spec.folder}: Dense weights are a {type(tensors).__name__}, not a state dict")
    expected = {"linear.weight": (spec.out_features, spec.in_features)}
    if spec.bias:
        expected["linear.bias"] = (spec.out_features,)
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    if found != expected:
        raise STCompatError(f"{spec.folder}: Dense weights {found} do not match its config.json {expected}")
    tensors = {key: value.float() for key, value in tensors.items()}
    tensors.setdefault("linear.bias", torch.zeros(spec.out_features))
    return tensors


def lowercase_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """ST's do_lower_case (a Lowercase normaliser in front of the tokenizer's own), made to survive save_pretrained.

    transformers 5 rebuilds a model-specific tokenizer's normaliser from its settings when loading, so a BERT-style
    tokenizer also gets do_lower_case=True (keeping its accent handling) in the settings it saves; a generic
    tokenizer.json tokenizer keeps the normaliser itself. Other tokenizers would lose it on save: refused.
    """
    from tokenizers.normalizers import Lowercase, Sequence
    from transformers import TokenizersBackend

    settings = inspect.signature(type(tokenizer).__init__).parameters
    if "do_lower_case" in settings:
        if not getattr(tokenizer, "do_lower_case", True):
            changes = {"do_lower_case": True}
            if "strip_accents" in settings:   # None means "strip when lowercasing"; ST's Lowercase never strips
                changes["strip_accents"] = bool(getattr(tokenizer, "strip_accents", None))
            for key, value in changes.items():
                tokenizer.init_kwargs[key] = value
                setattr(tokenizer, key, value)
    elif type(tokenizer) is not TokenizersBackend:
        raise STCompatError(f"do_lower_case=true on a {type(tokenizer).__name__} cannot be saved with it "
                            "(transformers rebuilds its normaliser on load); not supported")
    current = tokenizer.backend_tokenizer.normalizer
    parts = list(current) if isinstance(current, Sequence) else [current] if current is not None else []
    if not any(isinstance(part, Lowercase) for part in parts):
        tokenizer.backend_tokenizer.normalizer = Sequence([Lowercase(), *parts])


def _st_model_config(plan: STPlan, hf_config, tokenizer, overrides: dict[str, Any]) -> ModelConfig:
    """The ModelConfig the directory describes, with `overrides` on top (an ST Dense's shape cannot change)."""
    max_length = plan.max_seq_length
    if max_length is None:   # v6 saves: the limit lives in the tokenizer, capped at the position table, as ST does
        limits = [tokenizer.model_max_length, getattr(hf_config, "max_position_embeddings", None) or 10**9]
        max_length = min(limits) if min(limits) < 10**6 else ModelConfig.max_length
    settings: dict[str, Any] = dict(encoder=str(plan.encoder_dir), pooler=plan.pooler, normalize=plan.normalize,
                                    max_length=max_length)
    if plan.dense is not None:
        settings.update(dense_dim=plan.dense.out_features, dense_activation=plan.dense.activation)
        clashing = {k: v for k, v in overrides.items() if k in ("dense_dim", "dense_activation") and v != settings[k]}
        if clashing:
            raise ConfigError(f"{plan.root} has a trained Dense module ({plan.dense.out_features}, "
                              f"{plan.dense.activation}); cannot override {clashing}")
    return ModelConfig(**{**settings, **overrides})


def load_sentence_transformers(path: str | Path, trust_remote_code: bool = False,
                               **overrides: Any) -> tuple[TextModel, TextCollator]:
    """Load a sentence-transformers directory as (TextModel, TextCollator); `overrides` are ModelConfig fields
    (e.g. pooler="cls", normalize=False, max_length=128, or head="classification", num_labels=4 for a new head)."""
    check_overrides(overrides, forbidden=("encoder",), source=f"the sentence-transformers directory {path}")
    plan = read_sentence_transformers(path)
    require_safetensors(plan.encoder_dir)
    hf_config = AutoConfig.from_pretrained(plan.encoder_dir, trust_remote_code=trust_remote_code)
    _check_dimensions(plan, hf_config.hidden_size)
    dense_weights = _read_dense_weights(plan.dense) if plan.dense is not None else None
    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_dir, trust_remote_code=trust_remote_code)
    if plan.do_lower_case:
        lowercase_tokenizer(tokenizer)
    cfg = _st_model_config(plan, hf_config, tokenizer, overrides)
    encoder = Encoder.from_pretrained(plan.encoder_dir, cfg.encoder_kwargs, trust_remote_code=trust_remote_code)
    model = build_model(cfg, encoder=encoder)
    if dense_weights is not None and model.dense is not None:
        model.dense.load_state_dict(dense_weights)
    return model, TextCollator.for_model(model, tokenizer)
