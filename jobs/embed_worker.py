"""What jobs.embed runs on Ray workers: `tokenize_units` (CPU) and the `Embedder` actor (model loaded once).

Between the two, a unit travels as one Arrow table: the id and carried columns, the row's position in its input file,
and the token ids of each row's windows (one window when truncating, several in chunk mode, one empty window for
an empty text). On a CPU-only cluster Ray Data fuses both into the actor, so nothing crosses processes; with GPUs
the tokenising tasks run on the CPUs while the actors embed.
"""
from __future__ import annotations

import itertools
import os
import signal
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.embed_input import Unit, read_unit, texts_of
from jobs.embed_output import Piece, write_piece

FILE, ROW, WINDOWS, TRUNCATED = "_embed_file", "_embed_row", "_embed_windows", "_embed_truncated"
TOKENIZE_CHUNK = 1024   # texts per tokenizer call: bounds the Python lists of ids that one call builds
FAULT_ENV = "DOCEMBED_FAULT"   # tests only, read by the driver: "raise:N" or "kill:N:MARKER", see _inject_fault


def tokenize_units(batch: pa.Table, spec: dict[str, Any], collator) -> pa.Table:
    """Ray Data fn: each row names a unit; returns the units' rows with their token windows."""
    return pa.concat_tables([tokenize_unit(Unit(**row), spec, collator) for row in batch.to_pylist()])


def tokenize_unit(unit: Unit, spec: dict[str, Any], collator) -> pa.Table:
    keep = list(dict.fromkeys([spec["id_column"], *spec["carry_columns"]]))
    table = read_unit(unit, list(dict.fromkeys([*keep, spec["text_column"]])))
    texts = texts_of(table.column(spec["text_column"]))
    stride = spec["chunk_overlap"] if spec["long_docs"] == "chunk" else None
    windows, truncated = [], []
    for at in range(0, len(texts), TOKENIZE_CHUNK):
        docs = collator.tokenize(texts[at: at + TOKENIZE_CHUNK], stride=stride, allow_empty=True)
        windows.append(_windows_array(docs))
        truncated.append(docs.truncated)
    out = table.select(keep)
    out = out.append_column(FILE, pa.array(np.full(len(out), unit.file_index, dtype=np.int32)))
    out = out.append_column(ROW, pa.array(np.arange(unit.start, unit.stop, dtype=np.int64)))
    out = out.append_column(WINDOWS, pa.chunked_array(windows, type=pa.list_(pa.list_(pa.int32()))))
    return out.append_column(TRUNCATED, pa.array(np.concatenate(truncated) if truncated else [], pa.bool_()))


def _windows_array(docs) -> pa.Array:
    """TokenizedDocs -> list<list<int32>>: per document, its windows' token ids (no Python objects kept)."""
    lengths = docs.n_tokens.astype(np.int64)
    values = np.fromiter(itertools.chain.from_iterable(docs.ids), dtype=np.int32, count=int(lengths.sum()))
    window_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n_docs = len(docs.truncated)
    doc_offsets = np.searchsorted(docs.doc_index, np.arange(n_docs + 1)).astype(np.int32)
    windows = pa.ListArray.from_arrays(pa.array(window_offsets), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(doc_offsets), windows)


class Embedder:
    """Ray Data actor: embeds tokenised units, pools windows into documents, writes one piece per row range."""

    def __init__(self, spec: dict[str, Any]):
        import ray
        import torch
        from transformers.utils import logging as hf_logging

        from model_core import load_model

        hf_logging.disable_progress_bar()
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)   # logical CPUs
        torch.set_num_threads(spec["torch_threads"] or max(1, min(int(assigned), os.cpu_count() or 1)))
        self.spec = spec
        self.device = torch.device("cuda" if spec["gpus_per_actor"] > 0 else "cpu")
        self.model, self.collator = load_model(spec["model"], **spec["overrides"])
        self.model.config.normalize = False   # normalise after pooling a document's windows, see _pool
        self.model.eval().to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.pieces_written = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = []
        for piece, rows in contiguous_pieces(batch):
            started = time.perf_counter()
            table, piece_stats = self.embed_rows(rows)
            piece_stats.update(seconds=round(time.perf_counter() - started, 3), pid=os.getpid(),
                               run_id=self.spec["run_id"])
            write_piece(self.spec["output"], piece, table, piece_stats)
            stats.append({"file_index": piece.file_index, "start": piece.start, "stop": piece.stop, **piece_stats})
            self.pieces_written += 1
            _inject_fault(self.spec["fault"], self.pieces_written)
        return pa.Table.from_pylist(stats)

    def embed_rows(self, rows: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        docs = rows.column(WINDOWS).combine_chunks()
        windows_per_doc = pc.list_value_length(docs).to_numpy(zero_copy_only=False)
        windows = docs.flatten()
        lengths = pc.list_value_length(windows).to_numpy(zero_copy_only=False).astype(np.int64)
        values = windows.flatten().to_numpy(zero_copy_only=False).copy()   # writable: torch warns otherwise
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        window_emb, padded = self._embed_windows(values, offsets, lengths)
        doc_of_window = np.repeat(np.arange(len(rows)), windows_per_doc)
        tokens = np.bincount(doc_of_window, weights=lengths, minlength=len(rows)).astype(np.int32)
        embedding = self._pool(window_emb, lengths, doc_of_window, windows_per_doc, tokens)
        table = self._output_table(rows, embedding, tokens)
        return table, {"rows_empty": int((tokens == 0).sum()), "rows_truncated": int(pc.sum(rows[TRUNCATED]).as_py()
                       or 0), "real_tokens": int(lengths.sum()), "padded_tokens": padded}

    def _embed_windows(self, values, offsets, lengths) -> tuple[np.ndarray, int]:
        """(n_windows, D) float32 embeddings (zeros for empty windows) and the padded token count."""
        import torch

        from model_core import token_budget_batches

        out = np.zeros((len(lengths), self.model.embedding_dim), dtype=np.float32)
        nonempty = np.flatnonzero(lengths > 0)
        padded = 0
        with torch.inference_mode(), self.autocast():
            for idx in fill_aware_batches(lengths[nonempty], self.spec["batch_tokens"], token_budget_batches):
                rows = nonempty[idx]
                padded += self._embed_batch(rows, [values[offsets[i]: offsets[i + 1]] for i in rows], out)
        return out, padded

    def _embed_batch(self, rows: np.ndarray, ids: list[np.ndarray], out: np.ndarray) -> int:
        """Embed one batch into out[rows]; on a GPU out-of-memory error, embed it in two halves instead."""
        import torch

        batch = self.collator.pad(ids)
        try:
            on_device = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out[rows] = self.model.embed(on_device).float().cpu().numpy()
            return batch["attention_mask"].numel()
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        on_device = None  # noqa: F841  (outside the except block, so the failed attempt's tensors can be freed)
        torch.cuda.empty_cache()
        half = len(rows) // 2
        return self._embed_batch(rows[:half], ids[:half], out) + self._embed_batch(rows[half:], ids[half:], out)

    def _pool(self, window_emb, lengths, doc_of_window, windows_per_doc, tokens) -> np.ndarray:
        """One embedding per document: its window if it has one, else the token-weighted mean of its windows."""
        import torch
        import torch.nn.functional as F

        first = np.concatenate([[0], np.cumsum(windows_per_doc)[:-1]]).astype(np.int64)
        doc_emb = window_emb[first]   # every document has at least one (possibly empty) window
        multi = np.flatnonzero(windows_per_doc > 1)
        if len(multi):
            weighted = np.zeros_like(doc_emb)
            np.add.at(weighted, doc_of_window, window_emb * lengths[:, None].astype(np.float32))
            doc_emb[multi] = weighted[multi] / np.maximum(tokens[multi, None], 1).astype(np.float32)
        if self.spec["normalize"]:
            doc_emb = F.normalize(torch.from_numpy(doc_emb), p=2, dim=-1).numpy()
        return doc_emb

    def _output_table(self, rows: pa.Table, embedding: np.ndarray, tokens: np.ndarray) -> pa.Table:
        dtype = np.float16 if self.spec["output_dtype"] == "float16" else np.float32
        values = pa.array(embedding.astype(dtype, copy=False).ravel())
        column = pa.FixedSizeListArray.from_arrays(values, embedding.shape[1], mask=pa.array(tokens == 0))
        out = rows.select([self.spec["id_column"]])
        out = out.append_column("embedding", column)
        out = out.append_column("n_tokens", pa.array(tokens, pa.int32()))
        out = out.append_column("truncated", rows.column(TRUNCATED))
        for name in self.spec["carry_columns"]:
            if name not in out.column_names:
                out = out.append_column(name, rows.column(name))
        return out


def fill_aware_batches(lengths: np.ndarray, max_tokens: int, budget_batches) -> list[np.ndarray]:
    """model_core.token_budget_batches, then cut where a row is shorter than 90% of its batch's longest.

    Sorting within a unit of a few thousand short documents still leaves budget batches spanning a wide length range
    (AG News: 87% real tokens at 8K tokens per batch); the extra cut keeps >= 95% at any budget.
    """
    batches = []
    for idx in budget_batches(lengths, max_tokens):
        cut = np.flatnonzero(lengths[idx] < 0.9 * lengths[idx[0]])
        while len(cut):
            batches.append(idx[: cut[0]])
            idx = idx[cut[0]:]
            cut = np.flatnonzero(lengths[idx] < 0.9 * lengths[idx[0]])
        batches.append(idx)
    return batches


def contiguous_pieces(batch: pa.Table) -> list[tuple[Piece, pa.Table]]:
    """Split a batch into runs of consecutive rows of one input file (normally the batch is exactly one unit)."""
    files = batch.column(FILE).to_numpy()
    rows = batch.column(ROW).to_numpy()
    breaks = np.flatnonzero((files[1:] != files[:-1]) | (rows[1:] != rows[:-1] + 1)) + 1
    bounds = [0, *breaks.tolist(), len(batch)]
    return [(Piece(int(files[a]), int(rows[a]), int(rows[b - 1]) + 1), batch.slice(a, b - a))
            for a, b in zip(bounds, bounds[1:]) if b > a]


def _inject_fault(spec: str, pieces_written: int) -> None:
    """Test hook: fail the job (raise) or kill this actor's process once (kill), after N pieces are written."""
    if not spec:
        return
    kind, count, *marker = spec.split(":", 2)
    if pieces_written != int(count):
        return
    if kind == "raise":
        raise RuntimeError(f"{FAULT_ENV}: injected failure after {count} piece(s)")
    if kind == "kill":
        try:
            os.close(os.open(marker[0], os.O_CREAT | os.O_EXCL))   # only the first actor to get here dies
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
