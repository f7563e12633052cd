"""One test body for every architecture: build, every pooler and head, bit-exact artifact round trip, one
training step with every loss. Tiny random configs (tests/conftest.py::TINY_ARCHS) share the MiniLM tokenizer.

    python -m pytest tests/model_core/test_architectures.py -v
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from model_core import (POOL_FUNCTIONS, TASKS, Encoder, ModelConfig, TextCollator, build_model, collate_task_batch,
                        compute_loss, load_artifact, save_artifact)
from tests.conftest import TINY_ARCHS

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "Hi",
         "A much longer sentence about football, elections and the weather in the north of England."]
SDPA_ARCHS = {"bert", "roberta", "modernbert", "distilbert"}  # the others have no SDPA path in transformers 5.25


@functools.cache
def _loaded(encoder_dir) -> tuple:
    return Encoder.from_pretrained(encoder_dir), AutoTokenizer.from_pretrained(encoder_dir)


def _model(encoder_dir, **cfg) -> tuple:
    """A fresh model (its own copy of the encoder weights) and its collator."""
    cfg.setdefault("global_attention", "first" if cfg.get("pooler") == "local_mean" else "none")
    encoder, tokenizer = _loaded(encoder_dir)
    model = build_model(ModelConfig(encoder=str(encoder_dir), max_length=96, dropout=0.0, **cfg),
                        encoder=copy.deepcopy(encoder))
    return model, TextCollator.for_model(model, tokenizer)


def _rows(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    texts = np.array((TEXTS * 2)[:n], dtype=object)
    return {"text": texts, "text_a": texts, "text_b": texts[::-1].copy(), "label": np.arange(n) % 2,
            "teacher": rng.normal(size=(n, 32)).astype(np.float32)}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_encoder_picks_supported_attention_and_drops_hf_pooler(arch, tiny_encoder_dirs):
    encoder = Encoder.from_pretrained(tiny_encoder_dirs[arch])
    expected = "sdpa" if arch in SDPA_ARCHS else "eager"
    assert encoder.hf.config._attn_implementation == expected
    assert getattr(encoder.hf, "pooler", None) is None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_pooler_and_head_runs(arch, tiny_encoder_dirs):
    for pooler in POOL_FUNCTIONS:
        model, collator = _model(tiny_encoder_dirs[arch], pooler=pooler, normalize=True)
        with torch.inference_mode():
            emb = model.eval().embed(collator(TEXTS))
        assert emb.shape == (len(TEXTS), 32) and emb.dtype == torch.float32
        assert torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))
    heads = {"dense": dict(dense_dim=16), "classification": dict(num_labels=3), "multilabel": dict(num_labels=3),
             "regression": {}, "pair_classification": dict(num_labels=2)}
    for head, extra in heads.items():
        model, collator = _model(tiny_encoder_dirs[arch], head=head, **extra)
        batch = collator(TEXTS)
        with torch.inference_mode():
            out = model.eval()(batch, batch) if head == "pair_classification" else model.eval()(batch)
        expected = {"dense": (4, 16), "regression": (4,), "pair_classification": (4, 2)}.get(head, (4, 3))
        assert out.shape == expected and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_artifact_round_trip_is_bit_exact(arch, tiny_encoder_dirs, tmp_path):
    model, collator = _model(tiny_encoder_dirs[arch], pooler="max", dense_dim=8, head="classification",
                             num_labels=3)
    save_artifact(model, collator, tmp_path / "art")
    loaded, loaded_collator = load_artifact(tmp_path / "art")
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded_collator.max_length == collator.max_length
    with torch.inference_mode():
        assert torch.equal(model.eval()(collator(TEXTS)), loaded.eval()(loaded_collator(TEXTS)))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_training_step_with_every_loss(arch, tiny_encoder_dirs):
    for task in TASKS.values():
        extra = {"num_labels": 2} if task.heads[0] in ("classification", "multilabel", "pair_classification") else {}
        for loss in task.losses:
            torch.manual_seed(0)
            model, collator = _model(tiny_encoder_dirs[arch], head=task.heads[0], **extra)
            batch = collate_task_batch(task, collator, _rows(), num_labels=2)
            before = {k: v.detach().clone() for k, v in model.named_parameters()}
            value, outputs = compute_loss(model.train(), batch, task, loss)
            value.backward()
            trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
            # Every trainable parameter takes part in the graph: DDP fails on unused ones.
            unused = [k for k, p in trainable.items() if p.grad is None]
            assert not unused, f"{arch}/{task.name}/{loss}: parameters without gradient: {unused[:5]}"
            torch.optim.SGD(trainable.values(), lr=0.1).step()
            assert torch.isfinite(value), f"{arch}/{task.name}/{loss}"
            changed = [k for k, p in trainable.items() if not torch.equal(p.detach(), before[k])]
            assert changed, f"{arch}/{task.name}/{loss}: the step changed no parameter"
