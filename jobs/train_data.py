"""Training data: checks on the Parquet inputs before anything starts, and the Ray Datasets the workers read.

Every check here reads only what it needs with pyarrow (schemas, row counts, the label and id columns), so a bad
input fails in seconds with a message naming the file and column, before a Ray worker starts. The workers see
rows under model_core's canonical column names (text, text_a, text_b, label, teacher); `TaskCollateFn` maps
string or scaled labels and turns rows into the task's tensor batch with the model's own collator.
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data.collate_fn import NumpyBatchCollateFn

from jobs.train_config import TrainConfig
from model_core.tasks import TASKS, Task, check_labels, collate_task_batch
from model_core.tokenization import TextCollator


class TrainDataError(ValueError):
    """An input file is missing a column, holds unusable values, or does not match the task."""


@dataclass
class DataPlan:
    train_rows: int
    val_rows: int


def resolve_path(path: str) -> str:
    """Local paths become absolute (Ray tasks may run elsewhere); URIs (s3://...) stay as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def source_columns(cfg: TrainConfig) -> dict[str, str]:
    """Canonical column -> column in the files, for what the task reads from the training files."""
    task = TASKS[cfg.task]
    wanted = [c for c in task.columns if c != "teacher"]
    return {c: cfg.data.columns.get(c, c) for c in wanted}


def input_columns(cfg: TrainConfig) -> dict[str, str]:
    """source_columns plus, for distillation, the id column that joins each row to its teacher embedding."""
    return source_columns(cfg) | ({"id": cfg.data.id_column} if cfg.data.teacher else {})


def _open(path: str, what: str) -> pads.Dataset:
    if "://" not in path and not Path(path).exists():
        raise TrainDataError(f"{what} {path} does not exist")
    try:
        return pads.dataset(resolve_path(path), format="parquet")
    except (pa.ArrowInvalid, OSError) as err:
        raise TrainDataError(f"{what} {path} is not readable Parquet: {err}") from err


def _check_columns(ds: pads.Dataset, needed: dict[str, str], what: str) -> None:
    for canonical, column in needed.items():
        if column not in ds.schema.names:
            raise TrainDataError(f"{what} has no column {column!r} (the {canonical!r} input; map another column "
                                 f"with data.columns.{canonical}=NAME). Its columns: {ds.schema.names}")


def _check_texts(ds: pads.Dataset, columns: list[str], what: str) -> None:
    """Empty or null texts would fail in the middle of training; find them now."""
    for column in columns:
        values = ds.to_table(columns=[column]).column(column)
        empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values.cast(pa.string())), ""))
        rows = np.flatnonzero(empty.to_numpy(zero_copy_only=False).astype(bool, copy=False))
        if rows.size:
            raise TrainDataError(f"{what} column {column!r} has {rows.size} empty or null texts (rows "
                                 f"{rows[:10].tolist()}); drop them first")


class LabelEncoder:
    """Raw label column -> what model_core expects: class ids, lists of class ids, or scaled floats."""

    def __init__(self, task: Task, label_names: list[str], separator: str, score_scale: float):
        self.task, self.separator, self.scale = task, separator, score_scale
        self.ids = {name: i for i, name in enumerate(label_names)}

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        kind = self.task.label_kind
        if kind == "float":
            return np.asarray(labels, dtype=np.float32) * np.float32(self.scale)
        if not self.ids:
            return labels
        if kind == "class":
            return np.fromiter((self._id(v) for v in labels), dtype=np.int64, count=len(labels))
        split = [[self._id(n) for n in (str(v).split(self.separator) if self.separator else [v]) if n != ""]
                 for v in labels]
        out = np.empty(len(split), dtype=object)
        out[:] = [np.asarray(ids, dtype=np.int64) for ids in split]
        return out

    def _id(self, name) -> int:
        if name not in self.ids:
            raise TrainDataError(f"label {name!r} is not in data.label_names {list(self.ids)}")
        return self.ids[name]


def label_encoder(cfg: TrainConfig) -> LabelEncoder:
    return LabelEncoder(TASKS[cfg.task], cfg.data.label_names, cfg.data.label_separator, cfg.data.score_scale)


def _check_labels(cfg: TrainConfig, ds: pads.Dataset, column: str, num_labels: int, what: str) -> None:
    task = TASKS[cfg.task]
    values = ds.to_table(columns=[column]).column(column)
    if values.null_count:
        raise TrainDataError(f"{what} column {column!r} has {values.null_count} null labels")
    if task.label_kind == "float" and not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        raise TrainDataError(f"{what} column {column!r} must hold numbers for task {cfg.task!r}, got {values.type}")
    if task.label_kind in ("class", "multi_hot"):
        if pa.types.is_string(values.type) and not cfg.data.label_names:
            raise TrainDataError(f"{what} column {column!r} holds strings: list them in data.label_names")
        try:
            check_labels(task, label_encoder(cfg)(values.to_numpy(zero_copy_only=False)), num_labels)
        except ValueError as err:
            raise TrainDataError(f"{what}: {err}") from err


def in_validation(texts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The held-out rows for data.val_fraction: a seeded CRC32 of the text below the fraction. Deterministic, free
    of the file's order (sorted files are common) and location, and identical texts never straddle the split."""
    salt = f"{seed}\x00".encode()
    hashes = np.fromiter((zlib.crc32(salt + str(t).encode()) for t in texts), dtype=np.uint64, count=len(texts))
    return hashes < np.uint64(fraction * 2**32)


def split_key(cfg: TrainConfig) -> str:
    """The canonical column whose text decides train vs. validation for data.val_fraction."""
    return TASKS[cfg.task].text_columns[0]


def _count_validation(cfg: TrainConfig, ds: pads.Dataset) -> int:
    column = source_columns(cfg)[split_key(cfg)]
    texts = ds.to_table(columns=[column]).column(column).to_numpy(zero_copy_only=False)
    return int(in_validation(texts, cfg.data.val_fraction, cfg.seed).sum())


def _check_split(cfg: TrainConfig, path: str, what: str, num_labels: int) -> int:
    ds = _open(path, what)
    needed = input_columns(cfg)
    _check_columns(ds, needed, what)
    rows = ds.count_rows()
    if rows == 0:
        raise TrainDataError(f"{what} {path} has no rows")
    task = TASKS[cfg.task]
    _check_texts(ds, [needed[c] for c in task.text_columns], what)
    if "label" in needed:
        _check_labels(cfg, ds, needed["label"], num_labels, what)
    return rows


def check_inputs(cfg: TrainConfig, num_labels: int, embedding_dim: int) -> DataPlan:
    """Every check on the data that can run before training; returns the split sizes."""
    if cfg.data.label_names and len(cfg.data.label_names) != num_labels:
        raise TrainDataError(f"data.label_names lists {len(cfg.data.label_names)} labels but the model has "
                             f"num_labels={num_labels}; make them equal")
    rows = _check_split(cfg, cfg.data.train, "data.train", num_labels)
    if cfg.data.val:
        val_rows = _check_split(cfg, cfg.data.val, "data.val", num_labels)
        train_rows = rows
    else:
        val_rows = _count_validation(cfg, _open(cfg.data.train, "data.train"))
        train_rows = rows - val_rows
        if val_rows == 0:
            raise TrainDataError(f"the validation split is empty: data.val_fraction={cfg.data.val_fraction} of "
                                 f"{rows} rows selects no row; raise it or give data.val")
    workers = cfg.scaling.num_workers
    if val_rows < workers or train_rows < workers:
        raise TrainDataError(f"{train_rows} training / {val_rows} validation rows cannot be split across "
                             f"{workers} workers: every worker needs at least one row of each")
    if cfg.data.teacher:
        check_teacher(cfg, embedding_dim)
    return DataPlan(train_rows, val_rows)


def _teacher_ids(cfg: TrainConfig) -> str:
    return cfg.data.teacher_id_column or cfg.data.id_column


def check_teacher(cfg: TrainConfig, embedding_dim: int) -> None:
    """The teacher file must hold one embedding of the student's width for every training and validation id."""
    teacher = _open(cfg.data.teacher, "data.teacher")
    _check_columns(teacher, {"teacher id": _teacher_ids(cfg), "teacher": cfg.data.teacher_column}, "data.teacher")
    kind = teacher.schema.field(cfg.data.teacher_column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise TrainDataError(f"data.teacher column {cfg.data.teacher_column!r} must be a list of floats (jobs.embed "
                             f"writes fixed_size_list<float>), got {kind}")
    width = kind.list_size if pa.types.is_fixed_size_list(kind) else None
    if width is not None and width != embedding_dim:
        raise TrainDataError(f"teacher embeddings have {width} dimensions but the student embeds into "
                             f"{embedding_dim}; set model.dense_dim={width} to add a projection")
    ids = teacher.to_table(columns=[_teacher_ids(cfg)]).column(_teacher_ids(cfg))
    if pc.count_distinct(ids).as_py() != len(ids):
        raise TrainDataError(f"data.teacher has duplicate ids in column {_teacher_ids(cfg)!r}")
    for path, what in ((cfg.data.train, "data.train"), (cfg.data.val, "data.val")):
        if not path:
            continue
        mine = _open(path, what).to_table(columns=[cfg.data.id_column]).column(cfg.data.id_column)
        missing = pc.filter(mine, pc.invert(pc.is_in(mine, value_set=ids.combine_chunks())))
        if len(missing):
            raise TrainDataError(f"{len(missing)} of {len(mine)} ids in {what} ({cfg.data.id_column!r}) have no "
                                 f"teacher embedding in {cfg.data.teacher}, e.g. {missing[:5].to_pylist()}: the "
                                 f"teacher file must be embedded from the same rows")


def load_teacher(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, (N, D) float32 embeddings in that order), ready for np.searchsorted lookups."""
    table = _open(cfg.data.teacher, "data.teacher").to_table(columns=[_teacher_ids(cfg), cfg.data.teacher_column])
    table = table.filter(pc.is_valid(table.column(1)))   # jobs.embed gives empty texts a null embedding
    ids = np.asarray(table.column(0).to_pylist()).astype(str)
    vectors = table.column(1).combine_chunks()
    width = len(vectors[0]) if len(vectors) else 0
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), width)
    order = np.argsort(ids, kind="stable")
    return ids[order], matrix[order]


def canonical_columns(batch: pa.Table, columns: dict[str, str]) -> pa.Table:
    """The file's columns under canonical names (one file column may feed two inputs)."""
    return pa.table({canonical: batch.column(source) for canonical, source in columns.items()})


def keep_split(batch: pa.Table, column: str, fraction: float, seed: int, validation: bool) -> pa.Table:
    held_out = in_validation(batch.column(column).to_numpy(zero_copy_only=False), fraction, seed)
    return batch.filter(pa.array(held_out if validation else ~held_out))


def teacher_rows(teacher: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The teacher embeddings of `ids`, from (sorted ids, embeddings) as load_teacher returns them (every id is
    known to be there: check_teacher ran before training)."""
    sorted_ids, matrix = teacher
    return matrix[np.searchsorted(sorted_ids, ids.astype(str))]


def attach_teacher(batch: dict[str, np.ndarray], teacher: list) -> dict[str, np.ndarray]:
    """Each row's teacher embedding by id; `teacher` holds object-store refs to (sorted ids, embeddings), read
    zero-copy by every task instead of being pickled into each one."""
    import ray

    return batch | {"teacher": teacher_rows(ray.get(teacher), batch.pop("id"))}


def validation_table(cfg: TrainConfig, columns: dict[str, str], teacher: tuple | None) -> pa.Table:
    """The validation rows with canonical columns, read by the driver with pyarrow (validation sets are small)."""
    path = cfg.data.val or cfg.data.train
    table = _open(path, "validation data").to_table(columns=sorted(set(columns.values())))
    table = canonical_columns(table, columns)
    if not cfg.data.val:
        table = keep_split(table, split_key(cfg), cfg.data.val_fraction, cfg.seed, validation=True)
    if teacher is not None:
        matrix = teacher_rows(teacher, table.column("id").to_numpy(zero_copy_only=False))
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        table = table.drop_columns(["id"]).append_column("teacher", vectors)
    return table


def build_datasets(cfg: TrainConfig) -> dict:
    """{"train", "val"} Ray Datasets with canonical columns.

    The training set streams from Parquet every epoch (read tasks, Ray Train's equal split across workers). The
    validation set is read once by the driver into the object store; every worker iterates it and evaluates its
    own share of each batch (see Trainer.evaluate), so every validation row counts exactly once.
    """
    import ray

    columns = input_columns(cfg)
    teacher = load_teacher(cfg) if cfg.data.teacher else None
    train = ray.data.read_parquet(resolve_path(cfg.data.train)).select_columns(sorted(set(columns.values())))
    train = train.map_batches(canonical_columns, fn_kwargs={"columns": columns}, batch_format="pyarrow")
    if not cfg.data.val:
        train = train.map_batches(keep_split, batch_format="pyarrow", fn_kwargs={
            "column": split_key(cfg), "fraction": cfg.data.val_fraction, "seed": cfg.seed, "validation": False})
    if teacher is not None:
        refs = [ray.put(part) for part in teacher]
        train = train.map_batches(attach_teacher, fn_kwargs={"teacher": refs}, batch_format="numpy")
    return {"train": train, "val": ray.data.from_arrow(validation_table(cfg, columns, teacher))}


class TaskCollateFn(NumpyBatchCollateFn):
    """Ray Data rows -> the task's tensor batch, in Ray's prefetch thread. A lock keeps the (Rust) tokenizer to
    one call at a time: training and validation iterators may both be collating."""

    def __init__(self, cfg: TrainConfig, collator: TextCollator, num_labels: int):
        self.task, self.collator, self.num_labels = TASKS[cfg.task], collator, num_labels
        self.encode_labels = label_encoder(cfg)
        self.lock = threading.Lock()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict:
        if "label" in rows:
            rows = rows | {"label": self.encode_labels(rows["label"])}
        with self.lock:
            return collate_task_batch(self.task, self.collator, rows, self.num_labels)
