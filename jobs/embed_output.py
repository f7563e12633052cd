"""Output side of jobs.embed: the output directory's layout, atomic piece files, resume bookkeeping.

    OUT/part-FFFFFF-SSSSSSSSSSSS-EEEEEEEEEEEE.parquet   rows [S, E) of input file number F, in input order
    OUT/_RUN.json        what produced the pieces: model, settings that change embeddings, input files
    OUT/_SUMMARY.json    written once every input row is in exactly one piece
    OUT/_tmp/            pieces being written; each is renamed into place only when complete

A piece's name is its input row range, so a retried task rewrites the same name with the same rows, and which rows
are done is a directory listing. Names starting with '_' are skipped by Parquet readers (pyarrow, Spark, Ray, and
DuckDB's `OUT/*.parquet`).
"""
from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.embed_input import IO_THREADS, InputFile, resolve

PIECE = re.compile(r"^part-(\d{6})-(\d{12})-(\d{12})\.parquet$")
MANIFEST, SUMMARY, TMP = "_RUN.json", "_SUMMARY.json", "_tmp"
META_KEY = b"docembed"   # footer key-value metadata of every piece: its row and token counts, who wrote it


class EmbedOutputError(ValueError):
    """The output directory cannot be used as asked (it holds other data, or another run's output)."""


@dataclass(frozen=True, order=True)
class Piece:
    file_index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.file_index:06d}-{self.start:012d}-{self.stop:012d}.parquet"

    @classmethod
    def parse(cls, name: str) -> "Piece | None":
        match = PIECE.match(name)
        return cls(*map(int, match.groups())) if match else None


def write_piece(out_uri: str, piece: Piece, table: pa.Table, stats: dict[str, Any]) -> None:
    """Write to OUT/_tmp, then rename into place: a piece file is either absent or complete."""
    fs, root = resolve(out_uri)
    tmp = f"{root}/{TMP}/{piece.name}.{uuid.uuid4().hex}"
    fs.create_dir(f"{root}/{TMP}", recursive=True)
    metadata = {**(table.schema.metadata or {}), META_KEY: json.dumps(stats).encode()}
    with fs.open_output_stream(tmp) as sink:
        pq.write_table(table.replace_schema_metadata(metadata), sink)
    fs.move(tmp, f"{root}/{piece.name}")


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = resolve(uri)

    def _join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def scan(self) -> tuple[dict | None, list[Piece], list[str]]:
        """(manifest or None, committed pieces, names that this job did not write)."""
        entries = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        pieces, foreign, manifest = [], [], None
        for entry in entries:
            name = entry.base_name
            if (piece := Piece.parse(name)) is not None:
                pieces.append(piece)
            elif name == MANIFEST:
                manifest = json.loads(self._read_text(name))
            elif name not in (SUMMARY, TMP):
                foreign.append(name)
        return manifest, sorted(pieces), sorted(foreign)

    def _read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._join(name)) as handle:
            return handle.read().decode()

    def _write_text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(self._join(name)) as handle:
            handle.write(text.encode())

    def _delete(self, names: list[str]) -> None:
        for name in names:
            info = self.fs.get_file_info(self._join(name))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def check(self, on_existing: str) -> list[Piece]:
        """What --on-existing allows, decided from a listing alone (nothing changes): raises when OUT is a file,
        holds other data, or holds an earlier run that `error` refuses; returns the pieces a resume would keep."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            raise EmbedOutputError(f"output {self.uri!r} is a file; it must be a directory (new or from this job)")
        old, pieces, foreign = self.scan()
        if foreign:
            raise EmbedOutputError(f"output {self.uri!r} holds files this job did not write ({foreign[:5]}); "
                                   f"choose a new or empty directory")
        if (old is not None or pieces) and on_existing == "error":
            state = "complete" if self.fs.get_file_info(self._join(SUMMARY)).type == pafs.FileType.File \
                else "incomplete"
            raise EmbedOutputError(
                f"output {self.uri!r} already holds an earlier run's output ({len(pieces)} piece files, {state}); "
                f"pass --on-existing resume to compute only the missing rows, or --on-existing overwrite to "
                f"start again")
        return pieces if on_existing == "resume" else []

    def prepare(self, on_existing: str, manifest: dict) -> list[Piece]:
        """Apply --on-existing and record `manifest`; returns the pieces a resume keeps (empty otherwise)."""
        keep = self.check(on_existing)
        old, pieces, _ = self.scan()
        if keep:
            if old is None:
                raise EmbedOutputError(f"cannot resume into {self.uri!r}: it has piece files but no {MANIFEST}")
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if changed:
                raise EmbedOutputError(f"cannot resume into {self.uri!r}: it was produced with different {changed} "
                                       f"(see {MANIFEST}); use --on-existing overwrite or another output directory")
            check_tiling(manifest_files(old), keep, complete=False)
        self._delete([TMP, SUMMARY] + ([p.name for p in pieces] if not keep else []))
        self.fs.create_dir(self.path, recursive=True)
        self._write_text(MANIFEST, json.dumps(manifest, indent=2))
        return keep

    def finish(self, summary: dict) -> None:
        self._delete([TMP])
        self._write_text(SUMMARY, json.dumps(summary, indent=2))

    def piece_stats(self, pieces: list[Piece]) -> list[dict]:
        """Each piece's footer: its row count and the token counts its writer recorded."""
        def read(piece: Piece) -> dict:
            with self.fs.open_input_file(self._join(piece.name)) as handle:
                meta = pq.read_metadata(handle)
            return {**json.loads((meta.metadata or {}).get(META_KEY, b"{}")), "rows": meta.num_rows}
        with ThreadPoolExecutor(IO_THREADS) as pool:
            return list(pool.map(read, pieces))


def manifest_files(manifest: dict) -> list[InputFile]:
    return [InputFile(uri="", **f) for f in manifest["inputs"]]


def check_tiling(files: list[InputFile], pieces: list[Piece], complete: bool) -> None:
    """Pieces must not overlap (and, when `complete`, must cover every row of every input file exactly once)."""
    by_file: dict[int, list[Piece]] = {}
    for piece in sorted(pieces):
        by_file.setdefault(piece.file_index, []).append(piece)
    for index, group in by_file.items():
        if index >= len(files) or group[-1].stop > files[index].num_rows:
            raise EmbedOutputError(f"piece {group[-1].name} lies outside the input (file {index} has "
                                   f"{files[index].num_rows if index < len(files) else 0} rows)")
        for a, b in zip(group, group[1:]):
            if b.start < a.stop:
                raise EmbedOutputError(f"pieces {a.name} and {b.name} overlap: rows would be duplicated")
    if complete:
        gaps = missing_ranges(files, pieces)
        if gaps:
            raise EmbedOutputError(f"rows missing from the output after the run: {dict(list(gaps.items())[:3])}")


def missing_ranges(files: list[InputFile], pieces: list[Piece]) -> dict[int, list[tuple[int, int]]]:
    """Per input file, the row ranges that no piece covers."""
    covered: dict[int, list[Piece]] = {}
    for piece in sorted(pieces):
        covered.setdefault(piece.file_index, []).append(piece)
    missing: dict[int, list[tuple[int, int]]] = {}
    for index, file in enumerate(files):
        cursor = 0
        for piece in covered.get(index, []):
            if piece.start > cursor:
                missing.setdefault(index, []).append((cursor, piece.start))
            cursor = max(cursor, piece.stop)
        if cursor < file.num_rows:
            missing.setdefault(index, []).append((cursor, file.num_rows))
    return missing
