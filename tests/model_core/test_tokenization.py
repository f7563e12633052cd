"""TextCollator: truncation flags, token counts, chunk windows, empty rows, architecture padding rules, and
token-budget batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from model_core import Encoder, ModelConfig, TextCollator, build_model, token_budget_batches


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


def test_truncation_is_reported_and_counts_are_exact(tokenizer):
    collator = TextCollator(tokenizer, max_length=16)
    texts = ["short text", "word " * 40, "exactly fourteen tokens " * 1]
    docs = collator.tokenize(texts)
    full = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert docs.n_tokens.tolist() == [min(n, 16) for n in full]
    assert docs.truncated.tolist() == [n > 16 for n in full]
    assert docs.ids[1][0] == tokenizer.cls_token_id and docs.ids[1][-1] == tokenizer.sep_token_id
    assert docs.doc_index.tolist() == [0, 1, 2]


def test_chunk_mode_covers_every_token_with_overlapping_windows(tokenizer):
    collator = TextCollator(tokenizer, max_length=16)
    text = " ".join(f"w{i}" for i in range(60))
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    docs = collator.tokenize(["tiny", text], stride=4)
    windows = [docs.ids[i][1:-1] for i in np.flatnonzero(docs.doc_index == 1)]
    assert len(windows) > 1 and all(len(w) <= 14 for w in windows)
    assert windows[0] == content[:14]
    for prev, nxt in zip(windows, windows[1:]):
        assert prev[-4:] == nxt[:4]                    # consecutive windows overlap by the stride
    rebuilt = windows[0] + [t for w in windows[1:] for t in w[4:]]
    assert rebuilt == content                          # and together cover the document exactly
    assert not docs.truncated.any()


def test_empty_text_raises_unless_allowed_then_counts_zero_tokens(tokenizer):
    collator = TextCollator(tokenizer, max_length=16)
    with pytest.raises(ValueError, match=r"empty or null text in rows \[1, 2\]"):
        collator.tokenize(["fine", "", None, "also fine"])
    docs = collator.tokenize(["fine", "   ", None, "also fine"], allow_empty=True)
    assert docs.n_tokens.tolist()[1:3] == [0, 0] and docs.doc_index.tolist() == [0, 1, 2, 3]
    batch = collator.pad(docs.ids)
    assert batch["attention_mask"][1].sum() == 0 and batch["attention_mask"][0].sum() == docs.n_tokens[0]


def test_pad_is_dynamic_and_masks_padding(tokenizer):
    collator = TextCollator(tokenizer, max_length=64)
    batch = collator(["one", "one two three four five"])
    lengths = collator.tokenize(["one", "one two three four five"]).n_tokens
    assert batch["input_ids"].shape == (2, lengths.max())
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_collator_caps_at_the_models_real_position_limit(tiny_encoder_dirs, tokenizer):
    # RoBERTa-style positions start after the padding index: 160 position rows hold 159 tokens when pad_token_id=0.
    encoder = Encoder.from_pretrained(tiny_encoder_dirs["roberta"])
    model = build_model(ModelConfig(encoder="tiny-roberta", max_length=4096), encoder=encoder)
    assert TextCollator.for_model(model, tokenizer).max_length == 159
    model(TextCollator.for_model(model, tokenizer)(["word " * 500]))  # the longest allowed input runs


def test_bigbird_batches_are_padded_to_stay_block_sparse(tiny_encoder_dirs, tokenizer):
    model = build_model(ModelConfig(encoder="tiny-bigbird", max_length=128),
                        encoder=Encoder.from_pretrained(tiny_encoder_dirs["big_bird"]))
    collator = TextCollator.for_model(model, tokenizer)
    assert (collator.pad_to_multiple_of, collator.min_length) == (8, 64)   # (6 + 2 * 1 random block) * 8
    batch = collator(["a short one"])
    assert batch["input_ids"].shape[1] == 64
    with torch.inference_mode():
        model.eval().embed(batch)
    assert model.encoder.config.attention_type == "block_sparse"       # did not silently fall back to full


def test_bigbird_refuses_a_max_length_below_its_block_sparse_minimum(tiny_encoder_dirs, tokenizer):
    model = build_model(ModelConfig(encoder="tiny-bigbird", max_length=32),
                        encoder=Encoder.from_pretrained(tiny_encoder_dirs["big_bird"]))
    with pytest.raises(ValueError, match="at least 64 tokens.*attention_type='original_full'"):
        TextCollator.for_model(model, tokenizer)


def test_longformer_gets_window_padding_and_a_global_first_token(tiny_encoder_dirs, tokenizer):
    model = build_model(ModelConfig(encoder="tiny-longformer", global_attention="first", pooler="local_mean"),
                        encoder=Encoder.from_pretrained(tiny_encoder_dirs["longformer"]))
    batch = TextCollator.for_model(model, tokenizer)(["a b c", "a b c d e f g h i j"])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["global_attention_mask"][:, 0].tolist() == [1, 1]
    assert batch["global_attention_mask"][:, 1:].sum() == 0


def test_token_budget_batches_sort_by_length_and_respect_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = token_budget_batches(lengths, max_tokens=2048, max_rows=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))                      # every row exactly once
    for batch in batches:
        assert len(batch) <= 64 and len(batch) * lengths[batch].max() <= 2048
    longest_first = [lengths[b].max() for b in batches]
    assert longest_first == sorted(longest_first, reverse=True)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.95                                   # sorted batches waste little


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    batches = token_budget_batches([10, 5000, 20], max_tokens=1000)
    assert [b.tolist() for b in batches] == [[1], [2, 0]]
