"""TextCollator: the one tokeniser/collator used by training and inference alike.

`tokenize` turns texts into unpadded token ids (recording per row how many tokens it keeps and whether it was
truncated), `pad` turns a list of id sequences into a dynamically padded tensor batch, and `token_budget_batches`
cuts length-sorted batches by a padded-token budget instead of a row count, so that little compute goes to padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizedDocs:
    ids: list[list[int]]        # one id list per sequence (a document, or a window of one in chunk mode)
    n_tokens: np.ndarray        # int32 per sequence, special tokens included; 0 for an empty document
    doc_index: np.ndarray       # int64 per sequence: which input document it came from
    truncated: np.ndarray       # bool per input document: tokens were cut off (truncate mode only)


def is_empty(text: str | None) -> bool:
    return text is None or not text.strip()


class TextCollator:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, *, pad_to_multiple_of: int | None = None,
                 min_length: int = 0, global_attention_first: bool = False):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first")
        if min_length > max_length:
            raise ValueError(f"the architecture needs sequences of at least {min_length} tokens but max_length is "
                             f"{max_length} (for BigBird, set encoder_kwargs attention_type='original_full')")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.min_length = min_length
        self.global_attention_first = global_attention_first
        self.n_special = tokenizer.num_special_tokens_to_add(pair=False)

    @classmethod
    def for_model(cls, model, tokenizer: PreTrainedTokenizerBase) -> "TextCollator":
        """The collator a TextModel needs: its real length limit and its architecture's padding rules."""
        limit = min(model.config.max_length, model.encoder.max_positions())
        if 0 < tokenizer.model_max_length < 10**6:
            limit = min(limit, tokenizer.model_max_length)
        multiple, min_length = model.encoder.padding_rules()
        return cls(tokenizer, limit, pad_to_multiple_of=multiple, min_length=min_length,
                   global_attention_first=model.config.global_attention == "first")

    def tokenize(self, texts: Sequence[str | None], stride: int | None = None,
                 allow_empty: bool = False) -> TokenizedDocs:
        """Token ids per text, cut at max_length.

        With `stride=None` a long text keeps its first max_length tokens and is flagged truncated. With a stride it
        is split into windows of max_length tokens overlapping by `stride` tokens (chunk mode), one sequence each.
        Empty or null texts raise unless `allow_empty`, in which case they get one sequence with no tokens.
        """
        empty = [i for i, t in enumerate(texts) if is_empty(t)]
        if empty and not allow_empty:
            raise ValueError(f"empty or null text in rows {empty[:10]}{'...' if len(empty) > 10 else ''}")
        window_overlap = stride or 0
        if not 0 <= window_overlap < self.max_length - self.n_special:
            raise ValueError(f"stride must be in [0, {self.max_length - self.n_special}), got {stride}")
        empty_set = set(empty)
        keep = [i for i in range(len(texts)) if i not in empty_set]
        enc = self.tokenizer([texts[i] for i in keep], truncation=True, max_length=self.max_length,
                             stride=window_overlap, return_overflowing_tokens=True, return_attention_mask=False,
                             return_token_type_ids=False)
        owner = np.asarray(keep, dtype=np.int64)[np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)]
        return self._assemble(len(texts), enc["input_ids"], owner, empty, chunked=stride is not None)

    @staticmethod
    def _assemble(n_docs: int, ids: list[list[int]], owner: np.ndarray, empty: list[int],
                  chunked: bool) -> TokenizedDocs:
        truncated = np.zeros(n_docs, dtype=bool)
        if not chunked:  # keep each document's first window only; more than one window means it was cut
            truncated = np.bincount(owner, minlength=n_docs) > 1
            first = np.ones(len(owner), dtype=bool)
            first[1:] = owner[1:] != owner[:-1]
            ids = [seq for seq, keep in zip(ids, first) if keep]
            owner = owner[first]
        if empty:  # an empty document still gets one (token-less) sequence, so every row is accounted for
            order = np.argsort(np.concatenate([owner, np.asarray(empty)]), kind="stable")
            ids = [(ids + [[] for _ in empty])[i] for i in order]
            owner = np.concatenate([owner, np.asarray(empty)])[order]
        n_tokens = np.fromiter((len(s) for s in ids), dtype=np.int32, count=len(ids))
        return TokenizedDocs(ids, n_tokens, owner.astype(np.int64), truncated)

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence (rounded up by the architecture's rules): input_ids, attention_mask."""
        longest = max([len(s) for s in ids] + [1, self.min_length])
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.global_attention_first:
            batch["global_attention_mask"] = torch.zeros_like(attention_mask)
            batch["global_attention_mask"][:, 0] = attention_mask[:, 0]
        return batch

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise (truncating) and pad one batch of texts; raises on empty text."""
        return self.pad(self.tokenize(texts).ids)


def token_budget_batches(lengths: Sequence[int] | np.ndarray, max_tokens: int,
                         max_rows: int | None = None) -> list[np.ndarray]:
    """Positions into `lengths`, longest first, grouped so that rows x longest-in-batch <= max_tokens.

    Sorting first means each batch pads only up to similar lengths; a single row longer than the budget still gets
    a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, max_tokens // longest)
        if max_rows:
            rows = min(rows, max_rows)
        batches.append(order[start: start + rows])
        start += rows
    return batches
