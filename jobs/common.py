"""What every job shares: run configs from YAML + `key=value` overrides, and starting or joining Ray.

Nothing here parses arguments at import time: Ray workers import the job modules.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")

# Passed to every Ray worker: HF tokenizers' own thread pool fights Ray's, and no worker may reach the Hub
# unless the driver could.
WORKER_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "RAY_DATA_DISABLE_PROGRESS_BARS")


class RunConfigError(ValueError):
    """A job's configuration file or override is invalid."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=text"] -> {"a": {"b": 1}, "c": "text"}; values are read as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {pair!r} is not key=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return result


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into dataclass-typed fields; unknown keys are an error."""
    if not isinstance(data, dict):
        raise RunConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RunConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise RunConfigError(f"{where or cls.__name__}: {err}") from err


def load_run_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """A run config from an optional YAML file, then `key=value` overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, merge(data, parse_overrides(overrides or [])))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def worker_env() -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in WORKER_ENV_VARS if k in os.environ})
    return env


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`) or start a local Ray in this process.

    Resource counts and `include_dashboard` (None: Ray's default, on when installed; the dashboard's processes
    cost seconds of start-up on a 2-core machine) only apply to a cluster started here; an already-initialised Ray
    is left as it is.
    """
    import ray

    if ray.is_initialized():
        return
    local = not os.environ.get("RAY_ADDRESS")
    ray.init(num_cpus=num_cpus if local else None, num_gpus=num_gpus if local else None,
             runtime_env={"env_vars": worker_env()}, log_to_driver=True,
             **({"include_dashboard": include_dashboard} if local else {}))


def cli_main(prog: str, job: Callable[[], dict[str, Any]], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run a job from the command line: a user error prints one line naming the problem and exits 2 (no traceback,
    nothing for the user to fix in our code); success prints the job's summary as JSON."""
    try:
        summary = job()
    except user_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
