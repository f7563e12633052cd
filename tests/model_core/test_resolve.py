"""load_model: artifact, sentence-transformers and HF directories, the packaged MiniLM id, overrides, and the clear
errors for what it cannot resolve (an unknown layout, an unknown hub id offline, bad overrides).

Run: python -m pytest tests/model_core/test_resolve.py
"""
from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from model_core import (ConfigError, ModelConfig, ModelResolveError, TextCollator, build_model, load_artifact,
                        load_model, save_artifact)
from tests.conftest import MINILM_ID

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "Hi"]


def embed(model, collator, texts=TEXTS) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval().embed(collator(texts))


@pytest.fixture
def artifact(tmp_path, tiny_encoder_dirs):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=str(tiny_encoder_dirs["bert"]), dense_dim=16, max_length=96)
    model = build_model(cfg)
    return save_artifact(model, TextCollator.for_model(model, AutoTokenizer.from_pretrained(cfg.encoder)),
                         tmp_path / "artifact")


def test_artifact_resolves_to_load_artifact(artifact):
    model, collator = load_model(artifact)
    expected_model, expected_collator = load_artifact(artifact)
    assert model.config == expected_model.config
    assert torch.equal(embed(model, collator), embed(expected_model, expected_collator))


def test_artifact_accepts_overrides_that_keep_every_weight(artifact):
    base, _ = load_model(artifact)
    model, collator = load_model(artifact, pooler="max", normalize=True, max_length=32)
    assert (model.config.pooler, model.config.normalize, collator.max_length) == ("max", True, 32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    torch.testing.assert_close(embed(model, collator).norm(dim=-1), torch.ones(len(TEXTS)))


def test_embedding_artifact_takes_a_fresh_task_head(artifact):
    base, _ = load_model(artifact)
    model, _ = load_model(artifact, head="classification", num_labels=3)
    assert model.head is not None and model.head.linear.out_features == 3
    assert torch.equal(model.dense.linear.weight, base.dense.linear.weight)


@pytest.mark.parametrize("first, then, refused", [
    ({}, {"dense_dim": 8}, "['dense_dim']"),
    ({"head": "classification", "num_labels": 3}, {"num_labels": 5}, "['num_labels']"),
    ({"head": "classification", "num_labels": 3}, {"head": "regression"}, "['head']"),
], ids=["dense", "num_labels-over-trained-head", "head-over-trained-head"])
def test_artifact_refuses_overrides_that_drop_or_misfit_weights(tmp_path, artifact, first, then, refused):
    model, collator = load_model(artifact, **first)
    path = save_artifact(model, collator, tmp_path / "second") if first else artifact
    with pytest.raises(ConfigError, match=rf"cannot override {re.escape(refused)} on the artifact .* weights would"):
        load_model(path, **then)
    assert load_model(path, **{**first, "dense_dim": 16})[0].config == model.config   # saved values: a no-op


def test_sentence_transformers_dir_and_the_packaged_hub_id(minilm_dir):
    by_id, collator = load_model(MINILM_ID)
    by_path, _ = load_model(minilm_dir)
    assert by_id.config == by_path.config
    assert by_id.config.encoder == str(minilm_dir)
    assert (by_id.config.pooler, by_id.config.normalize, collator.max_length) == ("mean", True, 256)


def test_st_dir_overrides_apply(minilm_dir):
    model, collator = load_model(minilm_dir, pooler="cls", normalize=False, max_length=128)
    assert (model.config.pooler, model.config.normalize, collator.max_length) == ("cls", False, 128)


def test_hf_dir_gets_model_config_defaults_and_overrides(tiny_encoder_dirs):
    model, collator = load_model(tiny_encoder_dirs["bert"])
    assert (model.config.pooler, model.config.normalize, model.config.head) == ("mean", False, "none")
    assert collator.max_length == 160   # the tiny config's position limit caps the 512 default
    model, collator = load_model(tiny_encoder_dirs["bert"], pooler="cls", normalize=True, max_length=128)
    assert (model.config.pooler, collator.max_length) == ("cls", 128)
    torch.testing.assert_close(embed(model, collator).norm(dim=-1), torch.ones(len(TEXTS)))


def test_hf_dir_without_safetensors_is_refused(tmp_path, tiny_encoder_dirs):
    """An old-style checkpoint (pytorch_model.bin): refused rather than unpickled."""
    hf = AutoModel.from_pretrained(tiny_encoder_dirs["bert"])
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_encoder_dirs["bert"]).save_pretrained(tmp_path / "bin")
    with pytest.raises(ValueError, match="has no \\*.safetensors weights; model_core never unpickles"):
        load_model(tmp_path / "bin")


def test_hf_dir_without_tokenizer_is_refused(tmp_path, tiny_encoder_dirs):
    AutoModel.from_pretrained(tiny_encoder_dirs["bert"]).save_pretrained(tmp_path / "no_tok")
    with pytest.raises(ModelResolveError, match="has an HF config.json but no tokenizer files"):
        load_model(tmp_path / "no_tok")


def test_directory_of_no_known_layout_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelResolveError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("model_config.json", "modules.json", "config.json"))


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelResolveError, match="is a file, not a model directory"):
        load_model(tmp_path / "model.bin")


def test_unknown_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import; make sure
    with pytest.raises(ModelResolveError) as err:
        load_model("model-core-tests/no-such-model")
    message = str(err.value)
    assert "'model-core-tests/no-such-model' is not available offline" in message
    assert "load_model accepts" in message and "modules.json" in message and MINILM_ID in message


def test_missing_path_that_is_no_hub_id(tmp_path):
    with pytest.raises(ModelResolveError, match="no such directory, and not a hub id"):
        load_model(str(tmp_path / "missing" / "model"))


@pytest.mark.parametrize("overrides, message", [
    ({"poolr": "cls"}, r"unknown ModelConfig overrides \['poolr'\]"),
    ({"encoder": "bert-base-uncased"}, r"cannot override \['encoder'\]"),
])
def test_bad_overrides_fail_before_loading(tiny_encoder_dirs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_model(tiny_encoder_dirs["bert"], **overrides)
