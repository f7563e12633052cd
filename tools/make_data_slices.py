"""Cut the small real-data slices committed under data/ from ../shared/data (see data/NOTICE.md).

Run once from the repo root: `python tools/make_data_slices.py`. Deterministic (fixed seeds), so the slices can be
rebuilt and checked. Tests and the demo read only these slices; benchmarks read ../shared/data directly.
"""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "data"


def sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(idx))


def per_class(table: pa.Table, n_per_class: int, seed: int) -> pa.Table:
    labels = table.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n_per_class, replace=False)
                          for c in np.unique(labels)])
    return table.take(pa.array(np.sort(idx)))


def longest_and_random(table: pa.Table, n_long: int, n_random: int, seed: int) -> pa.Table:
    lengths = pc.utf8_length(table.column("text")).to_numpy()
    longest = np.argsort(-lengths)[:n_long]
    rest = np.setdiff1d(np.arange(table.num_rows), longest)
    random = np.random.default_rng(seed).choice(rest, n_random, replace=False)
    return table.take(pa.array(np.sort(np.concatenate([longest, random]))))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    read = lambda name: pq.read_table(SHARED / name)
    slices = {
        "sts_dev_300.parquet": sample(read("sts_dev.parquet"), 300, seed=0),
        "sts_train_800.parquet": sample(read("sts_train.parquet"), 800, seed=0),
        "ag_news_1k.parquet": per_class(read("ag_news_test.parquet"), 250, seed=0),
        "bbc_news_150.parquet": per_class(read("bbc_news.parquet"), 30, seed=0),
        "imdb_200.parquet": per_class(read("imdb_sample2500.parquet"), 100, seed=0),
        "20ng_long_24.parquet": longest_and_random(read("20ng_test.parquet"), 4, 20, seed=0),
    }
    for name, table in slices.items():
        pq.write_table(table, OUT / name, compression="zstd")
        print(f"{name}: {table.num_rows} rows, {(OUT / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
