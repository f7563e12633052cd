"""sentence-transformers interop: loading ST directories (both Pooling key styles, v6 saves, old layouts, Dense,
Normalize, do_lower_case), exporting models as ST directories, and the clear errors for what is not supported.

SentenceTransformer is the oracle: every directory we load or write is also loaded by it, and the embeddings must
agree to 1e-5. Small ST directories are written in tmp_path around the packaged MiniLM or a tiny random BERT
(weights symlinked, not copied).

Run: python -m pytest tests/model_core/test_st_compat.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from model_core import (ModelConfig, STCompatError, TextCollator, build_model, export_sentence_transformers,
                        load_artifact, load_model, load_sentence_transformers, save_artifact)
from tests.conftest import DATA

TOLERANCE = 1e-5
ST_FILES = {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "README.md"}
V5 = "sentence_transformers.models."
V6_TYPES = {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",
            "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
            "Dense": "sentence_transformers.base.modules.dense.Dense",
            "Normalize": "sentence_transformers.base.modules.normalize.Normalize"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    sts = pd.read_parquet(DATA / "sts_dev_300.parquet")
    return [*sts.sentence1[:8], *sts.sentence2[:8]]


def write_json(file: Path, data) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data))


def st_dir(root: Path, encoder_dir: Path, modules: list[tuple[str, str]], pooling: dict | None = None,
           transformer_path: str = "", bert_config: dict | None = None) -> Path:
    """An ST directory: encoder files symlinked into `transformer_path`, modules.json from (path, type) pairs."""
    target = root / transformer_path
    target.mkdir(parents=True)
    for file in encoder_dir.iterdir():
        if file.is_file() and file.name not in ST_FILES:
            (target / file.name).symlink_to(file)
    write_json(target / "sentence_bert_config.json", bert_config or {"max_seq_length": 128, "do_lower_case": False})
    write_json(root / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": kind}
                                       for i, (path, kind) in enumerate(modules)])
    if pooling is not None:
        write_json(root / "1_Pooling" / "config.json", pooling)
    return root


def st_embed(path: Path, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                                              show_progress_bar=False).cpu()


def assert_matches_st(model, collator, path: Path, texts: list[str]) -> None:
    with torch.inference_mode():
        got = model.eval().embed(collator(texts))
    diff = (got - st_embed(path, texts)).abs().max().item()
    assert diff <= TOLERANCE, f"{path}: max abs diff to SentenceTransformer {diff:.2e}"


def v5_pooling(mode: str | None, dim: int = 384, **extra) -> dict:
    keys = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    return {"word_embedding_dimension": dim, **{f"pooling_mode_{k}": k == mode for k in keys}, **extra}


BASIC = [("", V5 + "Transformer"), ("1_Pooling", V5 + "Pooling")]


# --- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling, expected", [
    (v5_pooling("max_tokens"), "max"),
    (v5_pooling("mean_sqrt_len_tokens"), "mean_sqrt_len"),
    (v5_pooling("weightedmean_tokens", include_prompt=True), "weighted_mean"),
    (v5_pooling(None), "mean"),                                       # no boolean set: mean, as ST v6 reads it
    ({"embedding_dimension": 384, "pooling_mode": "lasttoken", "include_prompt": True}, "last_token"),
    ({"embedding_dimension": 384, "pooling_mode": ["cls"]}, "cls"),
], ids=["v5-max", "v5-mean_sqrt_len", "v5-weightedmean", "v5-none-set", "v6-lasttoken", "v6-list-cls"])
def test_pooling_key_styles(tmp_path, minilm_dir, sentences, pooling, expected):
    path = st_dir(tmp_path / "st", minilm_dir, BASIC, pooling)
    model, collator = load_sentence_transformers(path)
    assert (model.config.pooler, model.config.normalize, model.config.max_length) == (expected, False, 128)
    assert_matches_st(model, collator, path, sentences)


def test_directory_saved_by_sentence_transformers_v6_loads(tmp_path, minilm_dir, sentences):
    """v6 type names, v6 Pooling keys, a 2_Normalize/config.json, no max_seq_length (it lives in the tokenizer)."""
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(minilm_dir), device="cpu").save(str(tmp_path / "v6"))
    types = [m["type"] for m in json.loads((tmp_path / "v6" / "modules.json").read_text())]
    assert types == [V6_TYPES[k] for k in ("Transformer", "Pooling", "Normalize")]
    assert "max_seq_length" not in json.loads((tmp_path / "v6" / "sentence_bert_config.json").read_text())
    model, collator = load_sentence_transformers(tmp_path / "v6")
    assert (model.config.pooler, model.config.normalize, collator.max_length) == ("mean", True, 256)
    assert_matches_st(model, collator, tmp_path / "v6", sentences)


def test_packaged_model_lists_a_normalize_folder_it_does_not_have(minilm_dir, sentences):
    assert not (minilm_dir / "2_Normalize").exists()
    model, collator = load_sentence_transformers(minilm_dir)
    assert model.config.normalize
    with torch.inference_mode():
        norms = model.eval().embed(collator(sentences)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_old_layout_with_a_0_Transformer_folder(tmp_path, minilm_dir, sentences):
    modules = [("0_Transformer", V5 + "Transformer"), ("1_Pooling", V5 + "Pooling"), ("2_Normalize", V5 + "Normalize")]
    path = st_dir(tmp_path / "st", minilm_dir, modules, v5_pooling("cls_token"), transformer_path="0_Transformer",
                  bert_config={"max_seq_length": 64, "do_lower_case": False})
    model, collator = load_sentence_transformers(path)
    assert model.config.encoder == str(path / "0_Transformer")
    assert (model.config.pooler, model.config.normalize, collator.max_length) == ("cls", True, 64)
    assert_matches_st(model, collator, path, sentences)


def write_dense(folder: Path, in_features: int, out_features: int, bias: bool, activation: str,
                pickled: bool = False, weight_in: int | None = None) -> None:
    torch.manual_seed(1)
    weights = {"linear.weight": torch.randn(out_features, weight_in or in_features) * 0.2}
    if bias:
        weights["linear.bias"] = torch.randn(out_features) * 0.1
    folder.mkdir(parents=True)
    if pickled:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    write_json(folder / "config.json", {"in_features": in_features, "out_features": out_features, "bias": bias,
                                        "activation_function": activation})


@pytest.mark.parametrize("pickled, bias, activation, expected", [
    (False, True, "torch.nn.modules.activation.Tanh", "tanh"),
    (True, False, "torch.nn.modules.linear.Identity", "identity"),
], ids=["safetensors-tanh", "pytorch_bin-identity-nobias"])
def test_dense_and_normalize(tmp_path, tiny_encoder_dirs, sentences, pickled, bias, activation, expected):
    modules = [*BASIC, ("2_Dense", V6_TYPES["Dense"]), ("3_Normalize", V6_TYPES["Normalize"])]
    path = st_dir(tmp_path / "st", tiny_encoder_dirs["bert"], modules, v5_pooling("mean_tokens", dim=32))
    write_dense(path / "2_Dense", 32, 16, bias, activation, pickled)
    model, collator = load_sentence_transformers(path)
    assert (model.config.dense_dim, model.config.dense_activation, model.config.normalize) == (16, expected, True)
    assert model.embedding_dim == 16
    assert_matches_st(model, collator, path, sentences)


def test_do_lower_case_matches_st_and_survives_saving(tmp_path, minilm_dir):
    """A cased tokenizer + do_lower_case: lowercased as ST does it, and still after an artifact round trip and an
    export (transformers 5 rebuilds a BERT tokenizer's normaliser from its settings when loading)."""
    cased = tmp_path / "cased"
    cased.mkdir()
    AutoTokenizer.from_pretrained(minilm_dir, do_lower_case=False).save_pretrained(cased)
    (cased / "config.json").symlink_to(minilm_dir / "config.json")
    (cased / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    path = st_dir(tmp_path / "st", cased, BASIC, v5_pooling("mean_tokens"),
                  bert_config={"max_seq_length": 128, "do_lower_case": True})
    texts = ["HELLO World, this is LOUD.", "Café ÉCOLE naïve Übermensch", "hello world, this is loud."]
    model, collator = load_sentence_transformers(path)
    assert collator.tokenize(texts[:1]).ids == collator.tokenize(texts[2:]).ids
    assert_matches_st(model, collator, path, texts)
    _, reloaded = load_artifact(save_artifact(model, collator, tmp_path / "artifact"))
    assert reloaded.tokenize(texts).ids == collator.tokenize(texts).ids
    assert_matches_st(model, collator, export_sentence_transformers(model, collator, tmp_path / "export"), texts)


# --- bad directories ----------------------------------------------------------------------------------------------

def test_unknown_module_type_is_named(tmp_path, minilm_dir):
    path = st_dir(tmp_path / "st", minilm_dir, [*BASIC, ("2_Custom", "my_package.modules.CustomPooling")],
                  v5_pooling("mean_tokens"))
    with pytest.raises(STCompatError, match=r"module type 'my_package\.modules\.CustomPooling' is not supported"):
        load_sentence_transformers(path)


@pytest.mark.parametrize("pooling", [
    {"embedding_dimension": 384, "pooling_mode": ["mean", "max"]},
    {**v5_pooling("mean_tokens"), "pooling_mode_cls_token": True},
], ids=["v6-list", "v5-booleans"])
def test_several_pooling_modes_are_not_supported(tmp_path, minilm_dir, pooling):
    path = st_dir(tmp_path / "st", minilm_dir, BASIC, pooling)
    with pytest.raises(STCompatError, match=r"several concatenated pooling modes .* are not supported"):
        load_sentence_transformers(path)


def test_pooling_dimension_must_match_the_encoder(tmp_path, minilm_dir):
    path = st_dir(tmp_path / "st", minilm_dir, BASIC, v5_pooling("mean_tokens", dim=768))
    with pytest.raises(STCompatError, match="Pooling embedding dimension 768 does not match the encoder's hidden "
                                            "size 384"):
        load_sentence_transformers(path)


@pytest.mark.parametrize("in_features, weight_in, message", [
    (64, None, "Dense in_features 64 does not match the pooled embedding dimension 32"),
    (32, 48, r"Dense weights .* do not match its config.json"),
], ids=["config-vs-encoder", "weights-vs-config"])
def test_dense_dimensions_are_checked(tmp_path, tiny_encoder_dirs, in_features, weight_in, message):
    path = st_dir(tmp_path / "st", tiny_encoder_dirs["bert"], [*BASIC, ("2_Dense", V5 + "Dense")],
                  v5_pooling("mean_tokens", dim=32))
    write_dense(path / "2_Dense", in_features, 16, True, "torch.nn.modules.activation.Tanh", weight_in=weight_in)
    with pytest.raises(STCompatError, match=message):
        load_sentence_transformers(path)


@pytest.mark.parametrize("modules, activation, message", [
    ([("2_Dense", "Dense")], "torch.nn.modules.activation.Sigmoid", "activation 'torch.nn.modules.activation.Sigmoid'"),
    ([("2_Dense", "Dense")], "my_package.MyActivation", "activation 'my_package.MyActivation' is not supported"),
    ([("2_Normalize", "Normalize"), ("3_Dense", "Dense")], "torch.nn.modules.activation.Tanh",
     r"module sequence \['Transformer', 'Pooling', 'Normalize', 'Dense'\] is not supported"),
], ids=["sigmoid", "custom-activation", "normalize-before-dense"])
def test_unsupported_pipelines_are_refused(tmp_path, tiny_encoder_dirs, modules, activation, message):
    path = st_dir(tmp_path / "st", tiny_encoder_dirs["bert"], [*BASIC, *[(p, V5 + k) for p, k in modules]],
                  v5_pooling("mean_tokens", dim=32))
    dense_folder = next(p for p, k in modules if k == "Dense")
    write_dense(path / dense_folder, 32, 16, True, activation)
    with pytest.raises(STCompatError, match=message):
        load_sentence_transformers(path)


def test_module_paths_must_stay_inside_the_directory(tmp_path, minilm_dir):
    path = st_dir(tmp_path / "st", minilm_dir, [*BASIC, ("../elsewhere", V5 + "Normalize")],
                  v5_pooling("mean_tokens"))
    with pytest.raises(STCompatError, match="module path '../elsewhere' leaves the model directory"):
        load_sentence_transformers(path)


def test_dense_override_on_an_st_dense_is_refused(tmp_path, tiny_encoder_dirs):
    path = st_dir(tmp_path / "st", tiny_encoder_dirs["bert"], [*BASIC, ("2_Dense", V5 + "Dense")],
                  v5_pooling("mean_tokens", dim=32))
    write_dense(path / "2_Dense", 32, 16, True, "torch.nn.modules.activation.Tanh")
    with pytest.raises(ValueError, match=r"has a trained Dense module \(16, tanh\); cannot override"):
        load_sentence_transformers(path, dense_dim=8)


# --- export -------------------------------------------------------------------------------------------------------

def test_export_minilm_loads_in_sentence_transformers(tmp_path, sentences):
    model, collator = load_model("sentence-transformers/all-MiniLM-L6-v2")
    out = export_sentence_transformers(model, collator, tmp_path / "export")
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling == {**v5_pooling("mean_tokens"), "include_prompt": True}   # the v5 key style, for v5 and v6
    assert [m["type"] for m in json.loads((out / "modules.json").read_text())] == [
        V5 + "Transformer", V5 + "Pooling", V5 + "Normalize"]
    assert_matches_st(model, collator, out, sentences)
    again, again_collator = load_model(out)
    assert again.config.replace(encoder="") == model.config.replace(encoder="")
    assert again_collator.max_length == collator.max_length == 256


@pytest.mark.parametrize("pooler, activation, normalize", [("cls", "gelu", True), ("weighted_mean", "relu", False)])
def test_export_artifact_with_dense_projection(tmp_path, tiny_encoder_dirs, sentences, pooler, activation, normalize):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=str(tiny_encoder_dirs["bert"]), pooler=pooler, dense_dim=16,
                      dense_activation=activation, normalize=normalize, max_length=64)
    built = build_model(cfg)
    save_artifact(built, TextCollator.for_model(built, AutoTokenizer.from_pretrained(cfg.encoder)), tmp_path / "a")
    model, collator = load_artifact(tmp_path / "a")
    out = export_sentence_transformers(model, collator, tmp_path / "export")
    assert json.loads((out / "2_Dense" / "config.json").read_text())["out_features"] == 16
    assert_matches_st(model, collator, out, sentences)


def tiny_model(encoder_dir: Path, **cfg):
    model = build_model(ModelConfig(encoder=str(encoder_dir), **{"max_length": 64, **cfg}))
    return model, TextCollator.for_model(model, AutoTokenizer.from_pretrained(encoder_dir))


@pytest.mark.parametrize("arch, cfg, message", [
    ("bert", dict(pooler="sum"), "pooler 'sum' has no sentence-transformers Pooling mode"),
    ("longformer", dict(pooler="local_mean", global_attention="first"), "pooler 'local_mean' has no"),
    ("longformer", dict(global_attention="first"), "global_attention='first' has no sentence-transformers"),
    ("big_bird", dict(max_length=128), "padded to 64 tokens"),
    ("bert", dict(head="classification", num_labels=3), "task head .* pass drop_head=True"),
])
def test_export_refuses_what_st_cannot_reproduce(tmp_path, tiny_encoder_dirs, arch, cfg, message):
    model, collator = tiny_model(tiny_encoder_dirs[arch], **cfg)
    with pytest.raises(STCompatError, match=message):
        export_sentence_transformers(model, collator, tmp_path / "export")
    assert not (tmp_path / "export").exists(), "nothing is written when export refuses"


def test_export_with_drop_head_keeps_the_embedding(tmp_path, tiny_encoder_dirs, sentences):
    model, collator = tiny_model(tiny_encoder_dirs["bert"], head="classification", num_labels=3, pooler="max")
    out = export_sentence_transformers(model, collator, tmp_path / "export", drop_head=True)
    assert_matches_st(model, collator, out, sentences)


def test_export_refuses_a_non_empty_directory(tmp_path, tiny_encoder_dirs):
    model, collator = tiny_model(tiny_encoder_dirs["bert"])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_text("stale")
    with pytest.raises(STCompatError, match="is not empty"):
        export_sentence_transformers(model, collator, tmp_path / "export")
