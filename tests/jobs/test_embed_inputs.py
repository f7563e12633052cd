"""jobs.embed's checks: every bad input fails with an error naming the problem, before any heavy work.

"Before heavy work" is checked by the output directory: it is created only after the input and the model have
passed (a failing case that got as far as the Ray run would have created it). Input errors come before Ray starts;
the model loads on the driver while Ray starts, so the model tests use the shared cluster (nothing to start).

    python -m pytest tests/jobs/test_embed_inputs.py -v
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common import RunConfigError
from jobs.embed import EmbedConfig, EmbedModelError, load_config, main, run
from jobs.embed_input import EmbedInputError, check_ids, inspect_input, list_input_files
from jobs.embed_output import EmbedOutputError
from tests.conftest import DATA, REPO

AG_NEWS = DATA / "ag_news_1k.parquet"


def small_table(rows: int = 20) -> pa.Table:
    return pq.read_table(AG_NEWS).slice(0, rows).select(["doc_id", "text", "label"])


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def config(tmp_path: Path, source: Path | str, model: str = "unused", **changes) -> EmbedConfig:
    return EmbedConfig(input=str(source), output=str(tmp_path / "out"), model=model, **changes)


def fails(cfg: EmbedConfig, error: type[Exception], *fragments: str) -> str:
    with pytest.raises(error) as caught:
        run(cfg)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not Path(cfg.output).exists(), "the error came after the output directory was prepared"
    return message


def test_missing_input(tmp_path):
    fails(config(tmp_path, tmp_path / "nope.parquet"), EmbedInputError, "nope.parquet", "does not exist")


def test_directory_without_parquet_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.csv").write_text("doc_id,text\n1,hello\n")
    fails(config(tmp_path, tmp_path / "corpus"), EmbedInputError, "no Parquet files", "notes.csv")


def test_glob_without_matches(tmp_path):
    fails(config(tmp_path, tmp_path / "*.parquet"), EmbedInputError, "no files match")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_named(tmp_path, damage):
    good = write(small_table(), tmp_path / "corpus" / "a.parquet")
    bad = tmp_path / "corpus" / "b.parquet"
    bad.write_bytes(b"not parquet at all" * 10 if damage == "garbage" else good.read_bytes()[:-300])
    fails(config(tmp_path, tmp_path / "corpus"), EmbedInputError, str(bad), "not a readable Parquet file")


def test_missing_text_column_lists_the_columns_present(tmp_path):
    source = write(small_table().drop_columns(["text"]), tmp_path / "in.parquet")
    fails(config(tmp_path, source), EmbedInputError, "['text']", "'doc_id'", "'label'")


def test_missing_id_column(tmp_path):
    source = write(small_table(), tmp_path / "in.parquet")
    fails(config(tmp_path, source, id_column="uid"), EmbedInputError, "['uid']", "--id-column")


def test_non_string_text_column(tmp_path):
    source = write(small_table(), tmp_path / "in.parquet")
    fails(config(tmp_path, source, text_column="label"), EmbedInputError, "'label'", "int64", "not string")


def test_column_types_must_agree_across_files(tmp_path):
    write(small_table(), tmp_path / "corpus" / "a.parquet")
    other = small_table().set_column(0, "doc_id", pa.array(range(20), pa.int64()))
    write(other, tmp_path / "corpus" / "b.parquet")
    fails(config(tmp_path, tmp_path / "corpus"), EmbedInputError, "'doc_id'", "int64", "string")


def test_duplicate_ids_are_an_error_unless_warned(tmp_path):
    table = small_table()
    write(table, tmp_path / "corpus" / "a.parquet")
    write(table.slice(0, 3), tmp_path / "corpus" / "b.parquet")
    fails(config(tmp_path, tmp_path / "corpus"), EmbedInputError, "3 duplicated value(s)", "--duplicate-ids warn")
    plan = inspect_input(str(tmp_path / "corpus"), "text", "doc_id", [])
    assert check_ids(plan, "doc_id", allow_duplicates=True) == 3


def test_null_ids(tmp_path):
    table = small_table()
    ids = pa.array([None] + table["doc_id"].to_pylist()[1:], pa.string())
    source = write(table.set_column(0, "doc_id", ids), tmp_path / "in.parquet")
    fails(config(tmp_path, source), EmbedInputError, "1 null value(s)")


def test_unloadable_model(ray_cluster, tmp_path):
    source = write(small_table(), tmp_path / "in.parquet")
    fails(config(tmp_path, source, model=str(tmp_path / "no_model")), EmbedModelError, "cannot load model")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    fails(config(tmp_path, source, model=str(broken)), EmbedModelError, str(broken))


def test_chunk_overlap_must_fit_the_window(ray_cluster, tmp_path, tiny_encoder_dirs):
    source = write(small_table(), tmp_path / "in.parquet")
    cfg = config(tmp_path, source, model=str(tiny_encoder_dirs["bert"]), long_docs="chunk", chunk_overlap=500)
    fails(cfg, RunConfigError, "chunk_overlap=500", "max_length 160")


def test_output_holding_other_files_is_refused(tmp_path, tiny_encoder_dirs):
    source = write(small_table(), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(EmbedOutputError, match="precious.txt"):
        run(config(tmp_path, source, model=str(tiny_encoder_dirs["bert"])))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_output_inside_input_directory_is_refused(tmp_path):
    write(small_table(), tmp_path / "corpus" / "a.parquet")
    cfg = EmbedConfig(input=str(tmp_path / "corpus"), output=str(tmp_path / "corpus" / "emb"), model="x")
    with pytest.raises(RunConfigError, match="inside the input directory"):
        run(cfg)


def test_hidden_files_are_skipped_files_sorted_and_uris_kept(tmp_path):
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "_tmp/x.parquet", ".hidden.parquet"):
        write(small_table(2), tmp_path / "corpus" / name)
    found = [Path(p).relative_to(tmp_path / "corpus").as_posix() for p in list_input_files(str(tmp_path / "corpus"))]
    assert found == ["a.parquet", "b.parquet", "sub/c.parquet"]
    uri = f"file://{tmp_path}/corpus"                      # URIs (s3://, gs://) go through the same code
    assert list_input_files(uri) == [f"{uri}/{name}" for name in found]
    assert list_input_files(f"{uri}/[ab].parquet") == [f"{uri}/a.parquet", f"{uri}/b.parquet"]
    plan = inspect_input(f"{uri}/sub/", "text", "doc_id", [])
    assert [(f.uri, f.name, f.num_rows) for f in plan.files] == [(f"{uri}/sub/c.parquet", "c.parquet", 2)]


def test_config_file_then_overrides_then_flags(tmp_path):
    yaml_file = tmp_path / "embed.yaml"
    yaml_file.write_text("input: a.parquet\noutput: out\nmodel: m\nbatch_tokens: 1000\nrows_per_file: 7\n")
    cfg = load_config(["--config", str(yaml_file), "--batch-tokens", "2000", "--no-normalize",
                       "--carry-columns", "label,title", "rows_per_file=9", "long_docs=chunk"])
    assert (cfg.batch_tokens, cfg.rows_per_file, cfg.long_docs) == (2000, 9, "chunk")
    assert cfg.normalize is False and cfg.carry_columns == ["label", "title"]
    cfg.validate()


def test_example_config_is_valid():
    cfg = load_config(["--config", str(REPO / "configs" / "embed.yaml")])
    cfg.validate()


@pytest.mark.parametrize("argv, fragment", [
    (["--input", "a", "--output", "b"], "model is required"),
    (["--input", "a", "--output", "b", "--model", "m", "--long-docs", "summarise"], "long_docs='summarise'"),
    (["--input", "a", "--output", "b", "--model", "m", "rows_per_file=many"], "rows_per_file='many'"),
    (["--input", "a", "--output", "b", "--model", "m", "colour=blue"], "unknown key(s) ['colour']"),
])
def test_cli_reports_config_errors_without_a_traceback(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
