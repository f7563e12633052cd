"""Bad configs and broken artifacts fail with an error that names the problem."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model_core import (ArtifactError, ConfigError, Encoder, ModelConfig, TextCollator, build_model, get_task,
                        load_artifact, save_artifact)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_encoder_dirs):
    model = build_model(ModelConfig(encoder="tiny-bert", head="classification", num_labels=3, dense_dim=16),
                        encoder=Encoder.from_pretrained(tiny_encoder_dirs["bert"]))
    collator = TextCollator.for_model(model, AutoTokenizer.from_pretrained(tiny_encoder_dirs["bert"]))
    return save_artifact(model, collator, tmp_path_factory.mktemp("art") / "model")


@pytest.fixture
def broken(artifact, tmp_path):
    """A private copy of the artifact to break."""
    return shutil.copytree(artifact, tmp_path / "copy")


@pytest.mark.parametrize("field,value,message", [
    ("pooler", "avg", "unknown pooler 'avg'"),
    ("head", "softmax", "unknown head 'softmax'"),
    ("dense_activation", "swish", "unknown dense_activation 'swish'"),
    ("global_attention", "all", "unknown global_attention 'all'"),
])
def test_unknown_names_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(encoder="x", **{field: value})


def test_inconsistent_configs_are_rejected():
    with pytest.raises(ConfigError, match="num_labels >= 2"):
        ModelConfig(encoder="x", head="classification")
    with pytest.raises(ConfigError, match="dense_dim > 0"):
        ModelConfig(encoder="x", head="dense")
    with pytest.raises(ConfigError, match="unknown ModelConfig keys \\['poolr'\\]"):
        ModelConfig.from_dict({"encoder": "x", "poolr": "mean"})


def test_unknown_task_and_loss_are_rejected():
    with pytest.raises(ConfigError, match="unknown task 'ranking'"):
        get_task("ranking")
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        get_task("classification").check(ModelConfig(encoder="x", head="classification", num_labels=2), "hinge")
    with pytest.raises(ConfigError, match="does not fit task 'classification'"):
        get_task("classification").check(ModelConfig(encoder="x", head="classification", num_labels=2), "mnrl")


@pytest.mark.parametrize("name", ["modules.safetensors", "encoder/model.safetensors", "model_config.json",
                                  "encoder/config.json"])
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    with pytest.raises(ArtifactError, match=f"missing \\['{name}'\\]"):
        load_artifact(broken)


@pytest.mark.parametrize("name", ["modules.safetensors", "encoder/model.safetensors"])
def test_corrupt_weights_are_reported(broken, name):
    (broken / name).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactError, match="cannot read the weights"):
        load_artifact(broken)


def test_corrupt_config_is_reported(broken):
    (broken / "model_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="model_config.json is not valid JSON"):
        load_artifact(broken)


def test_config_naming_an_unknown_pooler_is_reported(broken):
    manifest = json.loads((broken / "model_config.json").read_text())
    manifest["config"]["pooler"] = "attention"
    (broken / "model_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="unknown pooler 'attention'"):
        load_artifact(broken)


def test_head_weights_that_do_not_match_the_config_are_reported(broken):
    manifest = json.loads((broken / "model_config.json").read_text())
    manifest["config"]["num_labels"] = 5                       # the stored head has 3 outputs
    (broken / "model_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"mis-shaped=\['head.linear.weight: file \(3, 16\) vs config \(5, 16\)"):
        load_artifact(broken)


def test_missing_head_tensor_is_reported(broken):
    tensors = load_file(broken / "modules.safetensors")
    del tensors["dense.linear.bias"]
    save_file(tensors, broken / "modules.safetensors")
    with pytest.raises(ArtifactError, match=r"missing=\['dense.linear.bias'\]"):
        load_artifact(broken)


def test_encoder_weights_that_do_not_match_its_config_are_reported(broken):
    config = json.loads((broken / "encoder/config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 64, 128
    (broken / "encoder/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="encoder weights in .* do not fit its config"):
        load_artifact(broken)


def test_a_tokenizer_larger_than_the_vocabulary_is_reported(broken):
    config = json.loads((broken / "encoder/config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(broken / "tokenizer")
    tokenizer.add_tokens([f"newtoken{i}" for i in range(5)])
    tokenizer.save_pretrained(broken / "tokenizer")
    with pytest.raises(ArtifactError, match=f"tokenizer has {config['vocab_size'] + 5} tokens"):
        load_artifact(broken)


def test_not_an_artifact_manifest(broken):
    (broken / "model_config.json").write_text(json.dumps({"pooler": "mean"}))
    with pytest.raises(ArtifactError, match="is not a docembed-artifact manifest"):
        load_artifact(broken)
