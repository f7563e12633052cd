"""Bad input to jobs.train fails before training starts, with a message naming the problem (no Ray needed).

    python -m pytest tests/jobs/test_train_inputs.py -v
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import RunConfigError
from jobs.train import main, preflight
from jobs.train_config import load_train_config
from tests.conftest import DATA, REPO

AG_NEWS = DATA / "ag_news_1k.parquet"


@pytest.fixture
def tiny_bert(tiny_encoder_dirs) -> str:
    return str(tiny_encoder_dirs["bert"])


def write(path, table: pa.Table):
    pq.write_table(table, path)
    return str(path)


def ag_slice(tmp_path, name: str, rows: slice, **changes):
    table = pq.read_table(AG_NEWS).slice(rows.start, rows.stop - rows.start)
    for column, values in changes.items():
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    return write(tmp_path / f"{name}.parquet", table)


def classification(encoder: str, train: str, val: str, *extra: str):
    return load_train_config(None, [f"model.encoder={encoder}", "model.head=classification", "model.num_labels=4",
                                    f"data.train={train}", f"data.val={val}", *extra])


@pytest.fixture
def splits(tmp_path):
    return ag_slice(tmp_path, "train", slice(0, 40)), ag_slice(tmp_path, "val", slice(40, 60))


def test_good_input_passes_and_counts_rows(tiny_bert, splits):
    plan = preflight(classification(tiny_bert, *splits))
    assert (plan.train_rows, plan.val_rows) == (40, 20)


@pytest.mark.parametrize("override, message", [
    ("task=summarize", "unknown task 'summarize'; choose one of"),
    ("loss=hinge", "unknown loss 'hinge'; choose one of"),
    ("loss=mnrl", "loss 'mnrl' does not fit task 'classification'"),
    ("gradcache=8", "gradcache only applies to the contrastive task"),
    ("precision=fp8", "unknown precision 'fp8'"),
    ("grad_accum=0", "grad_accum must be at least 1"),
    ("learning_rate=0.1", "unknown key(s) ['learning_rate']"),
])
def test_config_errors_name_the_setting(tiny_bert, splits, override, message):
    with pytest.raises(RunConfigError) as err:
        classification(tiny_bert, *splits, override)
    assert message in str(err.value)


def test_model_head_must_fit_the_task(tiny_bert, splits):
    cfg = load_train_config(None, [f"model.encoder={tiny_bert}", "task=classification",
                                   f"data.train={splits[0]}", f"data.val={splits[1]}"])
    with pytest.raises(ValueError, match=r"task 'classification' needs model.head in \['classification'\]"):
        preflight(cfg)


def test_unknown_metric_is_refused(tiny_bert, splits):
    with pytest.raises(RunConfigError, match=r"metric 'val/recall@1' is not reported by task 'classification'"):
        preflight(classification(tiny_bert, *splits, "metric=recall@1"))


def test_label_outside_num_labels(tiny_bert, tmp_path, splits):
    labels = [0, 1, 2, 3, 4] * 8
    train = ag_slice(tmp_path, "bad_labels", slice(0, 40), label=labels)
    with pytest.raises(ValueError, match=r"data.train: task 'classification': label values \[4\] are outside \[0, 4\)"):
        preflight(classification(tiny_bert, train, splits[1]))


def test_missing_column(tiny_bert, splits):
    with pytest.raises(ValueError, match=r"data.train has no column 'body' \(the 'text' input; map another column"):
        preflight(classification(tiny_bert, *splits, "data.columns.text=body"))


def test_empty_validation_file(tiny_bert, tmp_path, splits):
    empty = write(tmp_path / "empty.parquet", pq.read_table(AG_NEWS).slice(0, 0))
    with pytest.raises(ValueError, match=r"data.val .*empty.parquet has no rows"):
        preflight(classification(tiny_bert, splits[0], empty))


def test_empty_validation_fraction(tiny_bert, splits):
    cfg = load_train_config(None, [f"model.encoder={tiny_bert}", "model.head=classification", "model.num_labels=4",
                                   f"data.train={splits[0]}", "data.val_fraction=0.000001"])
    with pytest.raises(ValueError, match="the validation split is empty: data.val_fraction=1e-06 of 40 rows"):
        preflight(cfg)


def test_empty_text(tiny_bert, tmp_path, splits):
    texts = pq.read_table(AG_NEWS).column("text").to_pylist()[:40]
    texts[7], texts[9] = "  ", None
    train = ag_slice(tmp_path, "blank", slice(0, 40), text=texts)
    with pytest.raises(ValueError, match=r"column 'text' has 2 empty or null texts \(rows \[7, 9\]\)"):
        preflight(classification(tiny_bert, train, splits[1]))


def test_string_labels_need_label_names(tiny_bert, splits):
    with pytest.raises(ValueError, match="holds strings: list them in data.label_names"):
        preflight(classification(tiny_bert, *splits, "data.columns.label=label_name"))
    names = "data.label_names=[World, Sports, Business, Sci/Tech]"
    assert preflight(classification(tiny_bert, *splits, "data.columns.label=label_name", names)).train_rows == 40
    with pytest.raises(ValueError, match="data.label_names lists 2 labels but the model has num_labels=4"):
        preflight(classification(tiny_bert, *splits, "data.columns.label=label_name", "data.label_names=[a, b]"))


def teacher_file(tmp_path, ids, dim: int) -> str:
    vectors = np.random.default_rng(0).normal(size=(len(ids), dim)).astype(np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    return write(tmp_path / "teacher.parquet", pa.table({"doc_id": ids, "embedding": embedding}))


def distillation(encoder: str, train: str, val: str, teacher: str):
    return load_train_config(None, [f"model.encoder={encoder}", "task=distillation", f"data.train={train}",
                                    f"data.val={val}", f"data.teacher={teacher}"])


def test_teacher_ids_must_cover_the_training_rows(tiny_bert, tmp_path, splits):
    ids = pq.read_table(AG_NEWS).column("doc_id").to_pylist()
    teacher = teacher_file(tmp_path, ids[:30] + ids[40:60], dim=32)   # training rows 30..39 have no teacher row
    with pytest.raises(ValueError, match=r"10 of 40 ids in data.train \('doc_id'\) have no teacher embedding"):
        preflight(distillation(tiny_bert, *splits, teacher))


def test_teacher_width_must_match_the_student(tiny_bert, tmp_path, splits):
    teacher = teacher_file(tmp_path, pq.read_table(AG_NEWS).column("doc_id").to_pylist()[:60], dim=8)
    with pytest.raises(ValueError, match="teacher embeddings have 8 dimensions but the student embeds into 32"):
        preflight(distillation(tiny_bert, *splits, teacher))


def test_cli_prints_the_error_and_exits_2(tiny_bert, splits, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"task: classification\nloss: hinge\nmodel: {{encoder: {tiny_bert}}}\n"
                      f"data: {{train: {splits[0]}, val: {splits[1]}}}\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "jobs.train: error: unknown loss 'hinge'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("train_*.yaml")))
def test_every_shipped_config_passes_the_checks_on_committed_data(config, tiny_bert, tmp_path):
    overrides = [f"model.encoder={tiny_bert}"]
    if config == "train_distill.yaml":   # its teacher file comes from jobs.embed; stand in a 32-wide one
        overrides += ["data.teacher=" + teacher_file(tmp_path, pq.read_table(AG_NEWS).column("doc_id").to_pylist(), 32)]
    plan = preflight(load_train_config(REPO / "configs" / config, overrides))
    assert plan.train_rows > plan.val_rows > 0
