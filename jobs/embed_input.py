"""Input side of jobs.embed: find the Parquet files, check them before any heavy work, cut them into work units.

Everything here runs on the driver from Parquet footers and the id column alone, except `read_unit`, which a Ray
worker calls to read the rows of one unit. Paths are local paths or URIs that pyarrow understands (s3://, gs://...).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
GLOB_CHARS = "*?["
IO_THREADS = 16


class EmbedInputError(ValueError):
    """The input corpus cannot be embedded as asked: missing, unreadable, or without the expected columns."""


@dataclass(frozen=True)
class InputFile:
    uri: str          # absolute local path or a URI; what workers reopen
    num_rows: int
    size: int         # bytes, recorded so that a resume notices a changed input
    name: str = ""    # path below the input's common folder: what a resume compares, so the corpus may move

    def identity(self) -> dict:
        return {"name": self.name, "num_rows": self.num_rows, "size": self.size}


@dataclass(frozen=True)
class InputPlan:
    files: list[InputFile]
    types: dict[str, pa.DataType]   # column -> Arrow type, for the id, text and carried columns

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of input file number `file_index`: one task's work and one output file's content."""
    file_index: int
    uri: str
    start: int
    stop: int


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; a glob's wildcards stay in the path."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    wild = min([uri.find(ch) for ch in GLOB_CHARS if ch in uri], default=len(uri))
    folder = uri[:wild].rsplit("/", 1)[0] if wild < len(uri) else uri   # pyarrow cannot parse wildcards
    try:
        fs, path = pafs.FileSystem.from_uri(folder)
    except (pa.ArrowException, ValueError) as err:
        raise EmbedInputError(f"cannot open {uri!r}: {err}") from err
    return fs, path.rstrip("/") + uri[len(folder):] if wild < len(uri) else path


def _as_uri(source: str, root: str, path: str) -> str:
    """`path` (listed below `root`, the filesystem path of `source`) as a URI like `source` (s3://, hdfs://host)."""
    if "://" not in source:
        return path
    source, root = source.rstrip("/"), root.rstrip("/")
    prefix = source[: -len(root)] if root and source.endswith(root) else source.split("://", 1)[0] + "://"
    return prefix + path


def _hidden(relative: str) -> bool:
    """Spark/Ray convention: files or folders starting with '_' or '.' (_SUCCESS, _tmp, .crc) are not data."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_input_files(source: str) -> list[str]:
    """The Parquet files named by `source` (a file, a directory searched recursively, or a glob), sorted."""
    fs, path = resolve(source)
    if any(ch in path for ch in GLOB_CHARS):
        return _glob(source, fs, path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise EmbedInputError(f"input {source!r} does not exist")
    if info.type == pafs.FileType.File:
        return [_as_uri(source, path, path)]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [f.path for f in found if f.type == pafs.FileType.File and not _hidden(f.path[len(path):])]
    parquet = sorted(f for f in files if f.lower().endswith(PARQUET_SUFFIXES))
    if not parquet:
        others = f"; it holds {len(files)} other file(s), e.g. {files[0]!r}" if files else " (it is empty)"
        raise EmbedInputError(f"no Parquet files ({'/'.join(PARQUET_SUFFIXES)}) under {source!r}{others}")
    return [_as_uri(source, path, p) for p in parquet]


def _glob(source: str, fs: pafs.FileSystem, pattern: str) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    else:  # remote: list below the pattern's fixed prefix, then match whole paths shell-style
        base = pattern[: min(pattern.find(ch) for ch in GLOB_CHARS if ch in pattern)].rsplit("/", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        matches = [f.path for f in found if f.type == pafs.FileType.File and fnmatch.fnmatch(f.path, pattern)]
    if not matches:
        raise EmbedInputError(f"no files match the input pattern {source!r}")
    return sorted(_as_uri(source, pattern, p) for p in matches)


@contextmanager
def open_parquet(uri: str, failure: str) -> Iterator[tuple[pq.ParquetFile, int]]:
    """(ParquetFile, size in bytes) of `uri`; any I/O or Arrow error becomes EmbedInputError("<failure>: <cause>")."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            yield pq.ParquetFile(handle), handle.size()
    except (OSError, pa.ArrowException) as err:
        raise EmbedInputError(f"{failure}: {err}") from err


def _read_footer(uri: str) -> tuple[InputFile, pa.Schema]:
    with open_parquet(uri, f"{uri} is not a readable Parquet file") as (parquet, size):
        return InputFile(uri, parquet.metadata.num_rows, size), parquet.schema_arrow


def _check_columns(uri: str, schema: pa.Schema, text_column: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise EmbedInputError(f"{uri} has no column(s) {missing}; its columns are {schema.names} "
                              f"(choose others with --text-column / --id-column / --carry-columns)")
    text_type = schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
            or pa.types.is_string_view(text_type)):
        raise EmbedInputError(f"text column {text_column!r} in {uri} has type {text_type}, not string")


def inspect_input(source: str, text_column: str, id_column: str, carry_columns: list[str]) -> InputPlan:
    """Read every footer (in parallel) and check the columns; raises EmbedInputError naming the problem."""
    uris = list_input_files(source)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        footers = list(pool.map(_read_footer, uris))
    columns = list(dict.fromkeys([id_column, text_column, *carry_columns]))
    first_uri, first_schema = footers[0][0].uri, footers[0][1]
    for file, schema in footers:
        _check_columns(file.uri, schema, text_column, columns)
        for name in columns:
            if schema.field(name).type != first_schema.field(name).type:
                raise EmbedInputError(f"column {name!r} is {schema.field(name).type} in {file.uri} but "
                                      f"{first_schema.field(name).type} in {first_uri}")
    paths = [f.uri.split("://", 1)[-1] for f, _ in footers]
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    files = [dataclasses.replace(f, name=posixpath.relpath(p, root)) for (f, _), p in zip(footers, paths)]
    return InputPlan(files, {name: first_schema.field(name).type for name in columns})


def _read_ids(uri: str, id_column: str) -> pa.ChunkedArray:
    with open_parquet(uri, f"cannot read column {id_column!r} of {uri}") as (parquet, _):
        return parquet.read(columns=[id_column]).column(0)


def check_ids(plan: InputPlan, id_column: str, allow_duplicates: bool) -> int:
    """Raise on null ids, and on duplicate ids unless allowed; returns the number of duplicated rows."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        chunks = [c for ids in pool.map(lambda f: _read_ids(f.uri, id_column), plan.files) for c in ids.chunks]
    ids = pa.chunked_array(chunks, type=plan.types[id_column])
    if ids.null_count:
        raise EmbedInputError(f"id column {id_column!r} has {ids.null_count} null value(s); every row needs an id")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    duplicated_rows = int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
    if duplicated_rows and not allow_duplicates:
        examples = repeated.field("values")[:5].to_pylist()
        raise EmbedInputError(f"id column {id_column!r} has {len(repeated)} duplicated value(s) over "
                              f"{duplicated_rows + len(repeated)} rows, e.g. {examples}; fix the input or pass "
                              f"--duplicate-ids warn to embed every row anyway")
    return duplicated_rows


def plan_units(files: list[InputFile], missing: dict[int, list[tuple[int, int]]], unit_rows: int) -> list[Unit]:
    """Cut each missing row range of each file into near-equal units of at most `unit_rows` rows."""
    units = []
    for index, ranges in sorted(missing.items()):
        for start, stop in ranges:
            pieces = math.ceil((stop - start) / unit_rows)
            bounds = [start + (stop - start) * i // pieces for i in range(pieces + 1)]
            units += [Unit(index, files[index].uri, a, b) for a, b in zip(bounds, bounds[1:])]
    return units


def read_unit(unit: Unit, columns: list[str]) -> pa.Table:
    """The unit's rows, reading only the row groups that hold them."""
    with open_parquet(unit.uri, f"cannot read rows {unit.start}-{unit.stop} of {unit.uri}") as (parquet, _):
        groups, first_row, offset = [], None, 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if offset < unit.stop and offset + rows > unit.start:
                groups.append(group)
                first_row = offset if first_row is None else first_row
            offset += rows
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(unit.start - (first_row or 0), unit.stop - unit.start)


def texts_of(column: pa.ChunkedArray) -> list[str | None]:
    """Python strings; bytes that are not valid UTF-8 (a binary blob stored as text) become U+FFFD, not a crash."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raw = column.cast(pa.large_binary()).to_pylist()
        return [None if b is None else b.decode("utf-8", errors="replace") for b in raw]
