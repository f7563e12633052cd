"""jobs.embed end to end through the real Ray Data pipeline on the shared test cluster.

What the runs prove: every input row is in the output exactly once (empty, 1M-character and binary rows included),
also when tokenising runs in separate tasks as on GPUs, and DuckDB reads it without Ray; embeddings equal
model_core's and sentence-transformers' for the real MiniLM; chunked long documents equal the token-weighted mean of
their windows; a run failed halfway resumes computing only the rest; an actor killed mid-run is replaced and nothing
is lost or duplicated; `ray job submit` runs the job.

    python -m pytest tests/jobs/test_embed.py -v
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.embed import EmbedConfig, EmbedRunError, run
from jobs.embed_input import texts_of
from jobs.embed_output import META_KEY, EmbedOutputError, Piece
from jobs.embed_worker import FAULT_ENV
from model_core import load_model
from tests.conftest import DATA, MINILM_ID, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
EMPTY_TEXTS = {3: None, 4: "", 5: "   \n\t "}
HUGE, GARBAGE, BAD_UTF8 = 6, 7, 8


def embed(source: Path, output: Path, model: str, **changes) -> dict:
    changes.setdefault("max_actors", 1)
    return run(EmbedConfig(input=str(source), output=str(output), model=model, **changes))


def hostile_corpus(folder: Path) -> Path:
    """120 AG News rows over two files, with empty, 1M-character, binary and invalid-UTF-8 texts."""
    table = pq.read_table(DATA / "ag_news_1k.parquet").slice(0, 120).select(["doc_id", "text", "label"])
    texts = table["text"].to_pylist()
    for row, text in EMPTY_TEXTS.items():
        texts[row] = text
    texts[HUGE] = "lorem ipsum dolor " * 55_556                               # 1,000,008 characters
    texts[GARBAGE] = np.random.default_rng(0).bytes(20_000).decode("latin-1")  # NULs, control bytes...
    raw = [t.encode() if t is not None else None for t in texts]
    raw[BAD_UTF8] = b"caf\xe9 \xff\xfe broken utf-8 " * 50
    column = pa.array(raw, pa.binary()).view(pa.string())                    # what a sloppy writer leaves
    table = table.set_column(1, "text", column)
    folder.mkdir(parents=True)
    pq.write_table(table.slice(0, 70), folder / "a.parquet", row_group_size=25)
    pq.write_table(table.slice(70), folder / "b.parquet")
    return folder


@pytest.fixture(scope="module")
def hostile_run(ray_cluster, tiny_encoder_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_hostile")
    source = hostile_corpus(root / "corpus")
    summary = embed(source, root / "out", str(tiny_encoder_dirs["bert"]), rows_per_file=30,
                    carry_columns=["label"], on_existing="error")
    return source, root / "out", summary


def test_every_row_exactly_once_with_empty_and_hostile_rows(hostile_run, tiny_encoder_dirs):
    source, out, summary = hostile_run
    inputs = pq.read_table(source)
    result = pq.read_table(out)
    assert result.schema.field("embedding").type == pa.list_(pa.field("element", pa.float32()), 32)
    assert [result.schema.field(c).type for c in ("doc_id", "n_tokens", "truncated", "label")] == \
        [pa.string(), pa.int32(), pa.bool_(), pa.int64()]
    assert sorted(result["doc_id"].to_pylist()) == sorted(inputs["doc_id"].to_pylist())   # once each
    by_id = {row["doc_id"]: row for row in result.to_pylist()}
    ids = inputs["doc_id"].to_pylist()
    _, collator = load_model(str(tiny_encoder_dirs["bert"]))
    expected = collator.tokenize(texts_of(inputs["text"]), allow_empty=True)
    for row in range(len(ids)):
        out_row = by_id[ids[row]]
        assert (out_row["embedding"] is None) == (row in EMPTY_TEXTS)
        assert out_row["n_tokens"] == expected.n_tokens[row] and (row in EMPTY_TEXTS) == (expected.n_tokens[row] == 0)
        assert out_row["truncated"] == expected.truncated[row]
        assert out_row["label"] == inputs["label"][row].as_py()
    assert by_id[ids[HUGE]]["n_tokens"] == 160 and by_id[ids[HUGE]]["truncated"]
    assert all(np.isfinite(by_id[ids[r]]["embedding"]).all() for r in (HUGE, GARBAGE, BAD_UTF8))
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_computed"] == 120
    assert summary["rows_empty"] == len(EMPTY_TEXTS) and summary["dim"] == 32
    assert summary["real_tokens"] == sum(r["n_tokens"] for r in by_id.values())
    assert 0.5 < summary["padding_efficiency"] <= 1.0
    assert json.loads((out / "_SUMMARY.json").read_text())["rows_out"] == 120


def test_pieces_are_named_by_the_input_rows_they_hold(hostile_run):
    _, out, _ = hostile_run
    pieces = sorted(Piece.parse(p.name) for p in out.glob("part-*.parquet"))
    assert [(p.file_index, p.start, p.stop) for p in pieces] == \
        [(0, 0, 23), (0, 23, 46), (0, 46, 70), (1, 0, 25), (1, 25, 50)]
    second = pq.read_table(out / pieces[1].name)
    expected = pq.read_table(hostile_run[0] / "a.parquet").slice(23, 23)["doc_id"]
    assert second["doc_id"].to_pylist() == expected.to_pylist()                 # input order within a piece


def test_tokenising_in_separate_tasks_gives_the_same_output(hostile_run, tiny_encoder_dirs, tmp_path):
    """The GPU layout (tokenise in CPU tasks, token ids cross processes, int batch_size) run on CPU."""
    source, out, _ = hostile_run
    summary = embed(source, tmp_path / "out", str(tiny_encoder_dirs["bert"]), rows_per_file=30,
                    carry_columns=["label"], tokenize_tasks=True)
    fused, separate = pq.read_table(out), pq.read_table(tmp_path / "out")
    assert separate["doc_id"].to_pylist() == fused["doc_id"].to_pylist() and summary["rows_out"] == 120
    for column in ("n_tokens", "truncated", "label"):
        assert separate[column].equals(fused[column])
    a, b = (np.stack([e if e is not None else np.zeros(32) for e in t["embedding"].to_pylist()])
            for t in (fused, separate))
    assert np.abs(a - b).max() < 1e-5 and separate["embedding"].null_count == len(EMPTY_TEXTS)


def test_duckdb_reads_the_output_without_ray(hostile_run):
    _, out, _ = hostile_run
    script = f"""
import json, sys, duckdb
con = duckdb.connect()
rows = con.execute(\"\"\"
    SELECT typeof(embedding), len(embedding),
           array_cosine_similarity(embedding::FLOAT[32], embedding::FLOAT[32]), n_tokens, truncated
    FROM read_parquet('{out}/*.parquet') WHERE embedding IS NOT NULL\"\"\").fetchall()
nulls = con.execute("SELECT count(*) FROM read_parquet('{out}/*.parquet') WHERE embedding IS NULL").fetchone()[0]
print(json.dumps({{"rows": rows[:3], "n": len(rows), "nulls": nulls, "ray": "ray" in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["ray"] is False and result["n"] == 120 - len(EMPTY_TEXTS) and result["nulls"] == len(EMPTY_TEXTS)
    assert all(r[0] == "FLOAT[]" and r[1] == 32 and abs(r[2] - 1) < 1e-5 for r in result["rows"])


def test_embeddings_equal_model_core_and_sentence_transformers(ray_cluster, minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    ag_news = pq.read_table(DATA / "ag_news_1k.parquet").slice(0, 270).select(["doc_id", "text"])
    imdb = pq.read_table(DATA / "imdb_200.parquet").slice(0, 30).select(["doc_id", "text"])
    corpus = pa.concat_tables([ag_news, imdb])                       # 300 real documents, some past 256 tokens
    pq.write_table(corpus, tmp_path / "corpus.parquet")
    summary = embed(tmp_path / "corpus.parquet", tmp_path / "out", MINILM_ID, rows_per_file=100)
    result = pq.read_table(tmp_path / "out")
    assert result["doc_id"].to_pylist() == corpus["doc_id"].to_pylist()     # pieces in name order = input order
    got = np.stack(result["embedding"].to_numpy(zero_copy_only=False))
    texts = corpus["text"].to_pylist()
    model, collator = load_model(MINILM_ID)
    order = np.argsort([len(t) for t in texts])           # similar lengths per batch: less padding, same result
    expected = np.zeros_like(got)
    with torch.inference_mode():
        for batch in np.array_split(order, 20):
            expected[batch] = model.eval().embed(collator([texts[i] for i in batch])).numpy()
    st = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, batch_size=16)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got - st).max() < 1e-5
    assert result["truncated"].to_pylist() == collator.tokenize(texts).truncated.tolist()
    assert summary["rows_truncated"] == sum(result["truncated"].to_pylist()) > 0


def test_chunked_long_documents_pool_their_windows_by_tokens(ray_cluster, tiny_encoder_dirs, tmp_path):
    model_dir = str(tiny_encoder_dirs["bert"])
    corpus = pq.read_table(DATA / "20ng_long_24.parquet")
    summary = run(EmbedConfig(input=f"file://{DATA}/20ng_*.parquet", output=f"file://{tmp_path}/chunk",   # URIs
                              model=model_dir, long_docs="chunk", chunk_overlap=16, normalize=True, max_actors=1))
    result = pq.read_table(tmp_path / "chunk")
    model, collator = load_model(model_dir)
    docs = collator.tokenize(corpus["text"].to_pylist(), stride=16)
    with torch.inference_mode():
        windows = torch.cat([model.eval().embed(collator.pad(docs.ids[i: i + 8])) for i in range(0, len(docs.ids), 8)])
    weights = torch.as_tensor(docs.n_tokens, dtype=torch.float32)[:, None]
    pooled = torch.zeros(len(corpus), windows.shape[1]).index_add_(0, torch.as_tensor(docs.doc_index), windows * weights)
    tokens = np.bincount(docs.doc_index, weights=docs.n_tokens)
    expected = torch.nn.functional.normalize(pooled / torch.as_tensor(tokens, dtype=torch.float32)[:, None], dim=-1)
    got = np.stack(result["embedding"].to_numpy(zero_copy_only=False))
    assert np.abs(got - expected.numpy()).max() < 1e-5
    assert result["n_tokens"].to_pylist() == tokens.astype(int).tolist()
    assert max(np.bincount(docs.doc_index)) > 50 and not any(result["truncated"].to_pylist())
    assert summary["rows_truncated"] == 0 and collator.tokenize(corpus["text"].to_pylist()).truncated.sum() > 4


def piece_run_ids(out: Path) -> dict[str, str]:
    return {p.name: json.loads(pq.read_metadata(p).metadata[META_KEY])["run_id"] for p in out.glob("part-*")}


def test_rerun_after_a_failure_halfway_computes_only_the_rest(ray_cluster, tiny_encoder_dirs, tmp_path,
                                                              monkeypatch):
    source, out, model = DATA / "imdb_200.parquet", tmp_path / "out", str(tiny_encoder_dirs["bert"])
    monkeypatch.setenv(FAULT_ENV, "raise:3")
    with pytest.raises(EmbedRunError, match="--on-existing resume"):
        embed(source, out, model, rows_per_file=25)
    monkeypatch.delenv(FAULT_ENV)
    before = piece_run_ids(out)
    done = sum(Piece.parse(name).stop - Piece.parse(name).start for name in before)
    assert 3 * 25 <= done < 200 and not (out / "_SUMMARY.json").exists()
    with pytest.raises(EmbedOutputError, match="incomplete.*--on-existing resume"):
        embed(source, out, model, rows_per_file=25)
    summary = embed(source, out, model, rows_per_file=25, on_existing="resume")
    after = piece_run_ids(out)
    assert summary["rows_computed"] == 200 - done and summary["rows_resumed"] == done
    assert {name: after[name] for name in before} == before                  # finished pieces were not redone
    result = pq.read_table(out)
    assert sorted(result["doc_id"].to_pylist()) == sorted(pq.read_table(source)["doc_id"].to_pylist())
    again = embed(source, out, model, rows_per_file=25, on_existing="resume")
    assert again["rows_computed"] == 0 and again["rows_out"] == 200
    with pytest.raises(EmbedOutputError, match=r"different \['max_length', 'model_config'\]"):
        embed(source, out, model, rows_per_file=25, on_existing="resume", max_length=64)


def test_actor_killed_mid_run_is_replaced_and_rows_stay_exactly_once(ray_cluster, tiny_encoder_dirs, tmp_path,
                                                                       monkeypatch):
    source, out, marker = DATA / "imdb_200.parquet", tmp_path / "out", tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:2:{marker}")        # SIGKILL the actor after its 2nd piece, once
    summary = embed(source, out, str(tiny_encoder_dirs["bert"]), rows_per_file=25, output_dtype="float16")
    assert marker.exists()
    pids = {json.loads(pq.read_metadata(p).metadata[META_KEY])["pid"] for p in out.glob("part-*")}
    assert len(pids) == 2                                    # the killed actor and its replacement
    result = pq.read_table(out)
    assert sorted(result["doc_id"].to_pylist()) == sorted(pq.read_table(source)["doc_id"].to_pylist())
    assert summary["rows_out"] == summary["rows_computed"] == 200 and summary["files_out"] == 8
    assert result.schema.field("embedding").type == pa.list_(pa.field("element", pa.float16()), 32)


def test_ray_job_submit_runs_the_job_on_the_cluster(ray_cluster, tiny_encoder_dirs, tmp_path):
    # The job supervisor resolves the driver's RAY_ADDRESS from /tmp/ray/ray_current_cluster, the cluster started
    # last on this machine: pin it, so that a parallel test session's cluster cannot take the job.
    gcs = ray_cluster.address_info["gcs_address"]
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
               f"http://{ray_cluster.dashboard_url}", "--working-dir", str(REPO), "--", "env", f"RAY_ADDRESS={gcs}",
               sys.executable, "-m", "jobs.embed", "--input", "data/bbc_news_150.parquet", "--output", str(tmp_path / "out"),
               "--model", str(tiny_encoder_dirs["bert"]), "--max-actors", "1", "--carry-columns", "title,label"]
    for _ in range(20):   # the dashboard's job agent registers a few seconds after the cluster starts
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"rows_out": 150' in done.stdout                        # the summary, streamed back from the driver
    result = pq.read_table(tmp_path / "out")
    assert result.num_rows == 150 and result.column_names[-2:] == ["title", "label"]
