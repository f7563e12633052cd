"""cluster.yaml passes Ray's own cluster-config validation (the schema `ray up` applies), offline."""
from __future__ import annotations

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


def _config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = prepare_config(_config())
    validate_config(config)  # raises on schema errors, e.g. a node type without `resources`
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_runs_the_installed_ray_version_and_installs_the_project():
    import ray

    config = _config()
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("/home/ray/docembed" in cmd for cmd in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/docembed"] == "."
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
