"""jobs.embed: embed a Parquet corpus with a model_core model on Ray Data; write the embeddings as Parquet.

    python -m jobs.embed --input IN --output OUT --model MODEL [--config configs/embed.yaml] [flags] [key=value ...]

IN is a Parquet file, a directory of them, a glob or a URI (s3://...). The driver checks everything cheap first (file
footers, columns, ids, that the model loads, what OUT holds), then splits the input into units (row ranges of one
file) and runs `from_items(units) -> map_batches(tokenize_units) -> map_batches(Embedder, ActorPoolStrategy)`.
Each actor loads the model once, sorts a unit's texts by token length, embeds them in token-budget batches and
writes the unit's rows as one Parquet piece (jobs/embed_worker.py, jobs/embed_output.py). Ray starts in-process
unless RAY_ADDRESS names a cluster (as under `ray job submit`) or Ray is already initialised.

Exactly once, and resume. A piece is named by the input rows it holds (file number, first row, end row), is written
under OUT/_tmp and renamed into place, and is a pure function of those rows and the settings recorded in
OUT/_RUN.json. So a task that Ray retries (an actor killed or out of memory is restarted by Ray Data and its task
re-run) rewrites the same name with the same rows; a rerun lists OUT and computes only the ranges no piece covers
(`--on-existing resume`), refuses (`error`, the default) or starts again (`overwrite`); and before writing
_SUMMARY.json the driver checks that the pieces tile every input file exactly, which makes "every row once" a checked
fact rather than a hope. Ray Data's own CheckpointConfig was not used: its resume hangs on 2 logical CPUs (a filter
actor pool starving the job, ray-2.60 notes 1.6), it needs unique ids and a shared checkpoint path, and it holds every
finished id in memory; a directory listing needs none of that and behaves the same on a laptop and on a cluster.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from jobs.common import RunConfigError, cli_main, from_dict, init_ray, load_run_config, merge, parse_overrides, to_dict
from jobs.embed_config import EmbedConfig, effective_precision
from jobs.embed_input import EmbedInputError, InputPlan, check_ids, inspect_input, plan_units, resolve
from jobs.embed_output import EmbedOutputError, OutputDir, check_tiling, missing_ranges
from jobs.embed_worker import FAULT_ENV, Embedder, tokenize_units

log = logging.getLogger("jobs.embed")
UNITS_PER_ACTOR = 4      # work units per actor: enough to balance the load, few enough to sort well
MIN_UNIT_ROWS = 1000     # below this, length sorting leaves too much padding (see fill_aware_batches)
SEPARATE_UNIT_ROWS = 20_000   # units tokenised in parallel CPU tasks (GPU actors): small ones start the GPUs sooner
TOKENIZE_MEMORY = 512 * 2**20   # logical memory a separate tokenising task reserves (one unit's text and ids)
# Default padded tokens per forward pass. On CPU small batches stay in cache: MiniLM on 2 EPYC cores ran ~8% more
# tokens/s at 1536 than at 4096 (alternating A/B runs over 1,900 AG News docs, in the embed issue's note). GPUs want
# big batches.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 1536, 65536


class EmbedModelError(ValueError):
    """The model cannot be loaded, or does not fit the requested settings."""


class EmbedRunError(RuntimeError):
    """The Ray run failed part-way; what was committed stays in OUT for a resume."""


USER_ERRORS = (RunConfigError, EmbedInputError, EmbedOutputError, EmbedModelError, EmbedRunError)


@dataclass
class ModelProbe:
    collator: Any          # TextCollator, pickled to the tokenising tasks
    dim: int
    normalize: bool        # what the output gets: the model's own choice unless the config says otherwise
    model_config: dict
    fingerprint: str


def probe_model(config: EmbedConfig) -> ModelProbe:
    """Load the model once on the driver: an unloadable model or a bad chunk setting fails here."""
    from model_core import load_model

    try:
        model, collator = load_model(config.model, **config.model_overrides())
    except Exception as err:  # resolver, safetensors, HF and config errors all mean the same thing to the user
        raise EmbedModelError(f"cannot load model {config.model!r}: {err}") from err
    room = collator.max_length - collator.n_special
    if config.long_docs == "chunk" and config.chunk_overlap >= room:
        raise RunConfigError(f"chunk_overlap={config.chunk_overlap} must be below the {room} text tokens a window "
                             f"of this model holds (max_length {collator.max_length})")
    normalize = model.config.normalize if config.normalize is None else config.normalize
    return ModelProbe(collator, model.embedding_dim, normalize, model.config.to_dict(), _fingerprint(model))


def _fingerprint(model) -> str:
    """A checksum of the weights, so that a resume notices a model directory whose weights changed."""
    import torch

    with torch.no_grad():
        return f"{sum(float(p.double().sum()) for p in model.state_dict().values()):.12e}"


def manifest(config: EmbedConfig, plan: InputPlan, probe: ModelProbe) -> dict[str, Any]:
    """Everything that decides the content of the pieces; a resume must match it exactly."""
    return {"model": config.model, "model_config": probe.model_config, "weights": probe.fingerprint,
            "dim": probe.dim, "max_length": probe.collator.max_length,
            "long_docs": config.long_docs, "chunk_overlap": config.chunk_overlap if config.long_docs == "chunk" else 0,
            "precision": effective_precision(config), "normalize": probe.normalize,
            "output_dtype": config.output_dtype, "text_column": config.text_column, "id_column": config.id_column,
            "carry_columns": config.carry_columns, "inputs": [f.identity() for f in plan.files]}


def worker_spec(config: EmbedConfig, probe: ModelProbe, run_id: str) -> dict[str, Any]:
    """The plain dict every Ray worker gets (the config crosses the Ray boundary as a dict)."""
    gpu = config.gpus_per_actor > 0
    return {**to_dict(config), "output": config.output, "overrides": config.model_overrides(),
            "precision": effective_precision(config), "normalize": probe.normalize, "run_id": run_id,
            "batch_tokens": config.batch_tokens or (GPU_BATCH_TOKENS if gpu else CPU_BATCH_TOKENS),
            "fault": os.environ.get(FAULT_ENV, "")}


def _actor_shape(config: EmbedConfig, separate: bool) -> tuple[float, int]:
    """(CPUs per actor, most actors): as many actors as the cluster holds, leaving a CPU for the tokenising tasks
    when they run apart. A CPU actor defaults to the CPUs of a node up to 4: one actor of 2 threads on a 2-core
    machine loads the model once and matches two 1-thread actors; past 4, more actors beat more threads."""
    import ray

    cpus = config.cpus_per_actor
    if not cpus:
        biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        cpus = 1 if separate or config.gpus_per_actor > 0 else max(1, min(4, int(biggest)))
    if config.max_actors:
        return cpus, config.max_actors
    resources = ray.cluster_resources()
    fits = int((resources.get("CPU", 0) - (1 if separate else 0)) // cpus)
    if config.gpus_per_actor > 0:
        fits = min(fits, int(resources.get("GPU", 0) // config.gpus_per_actor))
    if fits < 1:
        raise EmbedRunError(f"the Ray cluster ({resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs) "
                            f"cannot hold one actor with {cpus} CPUs and {config.gpus_per_actor} "
                            f"GPUs{' besides a tokenising task' if separate else ''}")
    return cpus, fits


def execute(config: EmbedConfig, plan: InputPlan, missing: dict, probe: ModelProbe, run_id: str) -> dict[str, Any]:
    """Run the Ray Data pipeline over the missing row ranges; returns per-piece stats and timings."""
    import ray

    started = time.perf_counter()
    gpu = config.gpus_per_actor > 0
    separate = gpu if config.tokenize_tasks is None else config.tokenize_tasks
    cpus, most = _actor_shape(config, separate)
    todo = sum(stop - start for ranges in missing.values() for start, stop in ranges)
    unit_rows = min(config.rows_per_file, SEPARATE_UNIT_ROWS if separate else config.rows_per_file,
                    max(MIN_UNIT_ROWS, math.ceil(todo / (UNITS_PER_ACTOR * most))))
    units = plan_units(plan.files, missing, unit_rows)
    most = min(most, len(units))
    least = min(config.min_actors or most, most)
    spec = worker_spec(config, probe, run_id)
    # Equal remote args let Ray Data fuse tokenising into the actor (no token ids cross processes); a memory
    # reservation for the tokenising tasks keeps them apart when asked to, even on CPU.
    tokenize_args = {"num_cpus": 1, "memory": TOKENIZE_MEMORY} if separate else {"num_cpus": cpus}
    ds = ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(tokenize_units, batch_format="pyarrow", fn_kwargs={"spec": spec, "collator": probe.collator},
                        **tokenize_args)
    ds = ds.map_batches(Embedder, batch_format="pyarrow", batch_size=unit_rows if separate else None,
                        fn_constructor_kwargs={"spec": spec}, num_cpus=cpus,
                        **({"num_gpus": config.gpus_per_actor} if gpu else {}),
                        compute=ray.data.ActorPoolStrategy(min_size=least, max_size=most,
                                                           max_tasks_in_flight_per_actor=2 if separate else 1))
    try:
        pieces = list(ds.iter_rows())
    except Exception as err:
        done = sum(p.stop - p.start for p in OutputDir(config.output).scan()[1])
        raise EmbedRunError(f"the embedding run failed ({type(err).__name__}: {str(err).strip()[:2000]}). "
                            f"{done} of {plan.num_rows} rows are committed in {config.output}; fix the cause and "
                            f"rerun with --on-existing resume to compute only the rest") from err
    return {"pieces": pieces, "embed_s": time.perf_counter() - started, "actors": [least, most],
            "cpus_per_actor": cpus, "unit_rows": unit_rows}


def _versions() -> dict[str, str]:
    names = ("docembed", "torch", "transformers", "ray", "pyarrow", "numpy")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def summarize(config: EmbedConfig, plan: InputPlan, probe: ModelProbe, out: OutputDir, run: dict,
              started: float) -> dict[str, Any]:
    """Totals over every piece in OUT (footers), rates over what this run computed."""
    _, pieces, _ = out.scan()
    check_tiling(plan.files, pieces, complete=True)
    footers = out.piece_stats(pieces)
    total = {k: sum(f.get(k, 0) for f in footers) for k in ("rows", "rows_empty", "rows_truncated",
                                                            "real_tokens", "padded_tokens")}
    computed = run.get("pieces", [])
    rows_computed = sum(p["stop"] - p["start"] for p in computed)
    wall = time.perf_counter() - started
    return {
        "input": config.input, "output": config.output, "model": config.model, "dim": probe.dim,
        "rows_in": plan.num_rows, "rows_out": total["rows"], "rows_computed": rows_computed,
        "rows_resumed": total["rows"] - rows_computed, "rows_empty": total["rows_empty"],
        "rows_truncated": total["rows_truncated"], "real_tokens": total["real_tokens"],
        "padded_tokens": total["padded_tokens"],
        "padding_efficiency": round(total["real_tokens"] / max(total["padded_tokens"], 1), 4),
        "docs_per_s": round(rows_computed / wall, 2),
        "tokens_per_s": round(sum(p["real_tokens"] for p in computed) / wall, 1), "wall_s": round(wall, 2),
        "ray_start_s": round(run.get("ray_start_s", 0.0), 2), "embed_s": round(run.get("embed_s", 0.0), 2),
        "files_out": len(pieces), "actors": run.get("actors"), "cpus_per_actor": run.get("cpus_per_actor"),
        "long_docs": config.long_docs,
        "max_length": probe.collator.max_length, "precision": effective_precision(config),
        "normalize": probe.normalize, "output_dtype": config.output_dtype, "versions": _versions(),
    }


def _check_not_nested(config: EmbedConfig) -> None:
    if "://" in config.input or "://" in config.output:
        return
    source, target = resolve(config.input)[1], resolve(config.output)[1]
    if os.path.isdir(source) and (target + os.sep).startswith(source.rstrip(os.sep) + os.sep):
        raise RunConfigError(f"output {config.output!r} is inside the input directory {config.input!r}: a later run "
                             f"would read its own output")


def probe_while_ray_starts(config: EmbedConfig, need_ray: bool) -> tuple[ModelProbe, float, bool]:
    """Load the model on the driver (an unloadable one fails here) while Ray starts: on a small machine each takes
    seconds. Returns (probe, Ray start-up seconds, whether Ray was started here)."""
    import ray

    started_here = need_ray and not ray.is_initialized()
    with ThreadPoolExecutor(1) as pool:
        probing = pool.submit(probe_model, config)
        clock = time.perf_counter()
        if need_ray:
            init_ray(num_cpus=config.num_cpus or None, include_dashboard=config.dashboard)
        ray_start_s = time.perf_counter() - clock
        try:
            return probing.result(), ray_start_s, started_here
        except BaseException:
            if started_here:
                ray.shutdown()
            raise


def run(config: EmbedConfig) -> dict[str, Any]:
    """Embed config.input into config.output; returns the summary (also written to OUT/_SUMMARY.json)."""
    import ray

    started = time.perf_counter()
    config.validate()
    _check_not_nested(config)
    plan = inspect_input(config.input, config.text_column, config.id_column, config.carry_columns)
    duplicated = check_ids(plan, config.id_column, allow_duplicates=config.duplicate_ids == "warn")
    if duplicated:
        log.warning("%d rows repeat an id already seen in %r; each row is embedded anyway", duplicated,
                    config.id_column)
    out = OutputDir(config.output)
    need_ray = bool(missing_ranges(plan.files, out.check(config.on_existing)))
    probe, ray_start_s, started_here = probe_while_ray_starts(config, need_ray)
    try:
        kept = out.prepare(config.on_existing, manifest(config, plan, probe))
        missing = missing_ranges(plan.files, kept)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        result = execute(config, plan, missing, probe, run_id) if missing else {}
    except BaseException:
        if started_here:   # leave no Ray behind in the caller's process after a failure
            ray.shutdown()
        raise
    summary = summarize(config, plan, probe, out, {**result, "ray_start_s": ray_start_s}, started)
    out.finish(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)   # only flags given override the YAML
    parser.add_argument("--config", help="YAML file of EmbedConfig fields (configs/embed.yaml)")
    for name, kind, help_text in EmbedConfig.cli_flags():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, help=help_text)
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of config fields")
    return parser


def load_config(argv: list[str] | None = None) -> EmbedConfig:
    """EmbedConfig from an optional YAML file, then key=value overrides, then flags."""
    args = vars(build_parser().parse_args(argv))
    path, overrides = args.pop("config", None), args.pop("overrides", [])
    base = to_dict(load_run_config(EmbedConfig, path)) if path else {}
    flags = {k: v.split(",") if k == "carry_columns" else v for k, v in args.items()}
    return from_dict(EmbedConfig, merge(merge(base, parse_overrides(overrides)), flags))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli_main("jobs.embed", lambda: run(load_config(argv)), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
