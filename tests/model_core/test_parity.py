"""Acceptance: the packaged all-MiniLM-L6-v2, loaded by load_model, embeds exactly like SentenceTransformer.

SentenceTransformer (v6) on the same directory is the oracle: max abs diff <= 1e-5 for mean pooling (with the
model's Normalize), cls and max pooling (the oracle's Pooling module set the same way), at batch sizes 1, 7 and 64
on both sides. Each pooler gets its own 80 real STS-dev sentences (240 in all, both sentence columns); long IMDB
reviews cut at the model's 256-token limit are compared separately (padding 64 rows to 256 tokens would cost more
than the rest of the file).

The module runs torch on one thread: on a shared 2-core machine, two intra-op threads make batch-size-1 calls
10-25x slower (they wait on each other while other processes hold the cores).

Run: python -m pytest tests/model_core/test_parity.py
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from model_core import load_model

from tests.conftest import DATA, MINILM_ID

POOLERS = ("mean", "cls", "max")
BATCH_SIZES = (1, 7, 64)
PER_POOLER = 80
TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    """pooler -> its own slice of real sentences, both columns of its pairs."""
    sts = pd.read_parquet(DATA / "sts_dev_300.parquet")
    pairs = PER_POOLER // 2
    return {pooler: [*sts.sentence1[i * pairs:(i + 1) * pairs], *sts.sentence2[i * pairs:(i + 1) * pairs]]
            for i, pooler in enumerate(POOLERS)}


@pytest.fixture(scope="module")
def long_texts() -> list[str]:
    """The three longest IMDB reviews around one short sentence: truncated rows padded next to a short one."""
    reviews = pd.read_parquet(DATA / "imdb_200.parquet")["text"]
    longest = reviews[reviews.str.len().sort_values(ascending=False).index[:3]].tolist()
    return [longest[0], "A short sentence.", longest[1], longest[2]]


@pytest.fixture(scope="module")
def ours() -> dict[str, tuple]:
    mean_model = load_model(MINILM_ID)   # the hub id resolves to the packaged copy: mean + Normalize
    models = {"mean": mean_model,
              "cls": load_model(MINILM_ID, pooler="cls", normalize=False),
              "max": load_model(MINILM_ID, pooler="max", normalize=False)}
    for model, _ in models.values():
        model.eval()
    return models


@pytest.fixture(scope="module")
def oracle(minilm_dir):
    """pooler -> SentenceTransformer: the directory as saved for mean; its Transformer + a cls/max Pooling else."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    full = SentenceTransformer(str(minilm_dir), device="cpu")
    transformer = full[0]   # loaded by ST itself from the directory, so max_seq_length=256 as saved
    dim = transformer.get_embedding_dimension()
    return {"mean": full,
            "cls": SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="cls")], device="cpu"),
            "max": SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="max")], device="cpu")}


def embed_in_batches(model, collator, texts: list[str], batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.embed(collator(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)])


def test_setup_is_what_the_parity_claims(ours, texts, oracle):
    model, collator = ours["mean"]
    assert (model.config.pooler, model.config.normalize, collator.max_length) == ("mean", True, 256)
    assert [(m.config.pooler, m.config.normalize) for m, _ in (ours["cls"], ours["max"])] == [("cls", False),
                                                                                             ("max", False)]
    assert oracle["mean"].max_seq_length == oracle["cls"].max_seq_length == 256
    assert len({text for batch in texts.values() for text in batch}) >= 3 * PER_POOLER - 5   # distinct slices


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("pooler", POOLERS)
def test_matches_sentence_transformers(pooler, batch_size, ours, oracle, texts):
    model, collator = ours[pooler]
    got = embed_in_batches(model, collator, texts[pooler], batch_size)
    expected = oracle[pooler].encode(texts[pooler], batch_size=batch_size, convert_to_tensor=True,
                                     show_progress_bar=False).cpu()
    assert got.shape == expected.shape == (PER_POOLER, 384)
    diff = (got - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{pooler} pooling at batch size {batch_size}: max abs diff {diff:.2e}"


def test_truncated_texts_match(ours, oracle, long_texts):
    model, collator = ours["mean"]
    assert collator.tokenize(long_texts).truncated.tolist() == [True, False, True, True]
    got = embed_in_batches(model, collator, long_texts, batch_size=len(long_texts))
    expected = oracle["mean"].encode(long_texts, batch_size=len(long_texts), convert_to_tensor=True,
                                     show_progress_bar=False).cpu()
    diff = (got - expected).abs().max().item()
    assert diff <= TOLERANCE, f"texts cut at 256 tokens: max abs diff {diff:.2e}"
