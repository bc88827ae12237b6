"""cluster.yaml against Ray's own cluster-launcher schema (no cloud calls), plus what TaH needs of it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_rays_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert all(cmd in prepared["worker_setup_commands"] for cmd in config["setup_commands"])


def test_schema_check_can_fail(config):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu-1xl4"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**copy.deepcopy(config), "max_wokers": 3}))


def test_what_tah_needs(config):
    nodes = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert "GPU" not in nodes["head"]["resources"]
    gpus = {name: n["resources"].get("GPU", 0) for name, n in nodes.items() if name != "head"}
    assert sorted(gpus.values()) == [1, 8]
    assert all(n["min_workers"] == 0 and n["max_workers"] > 0 for name, n in nodes.items() if name != "head")
    for name, n in nodes.items():  # every node reaches S3 through an instance profile, not keys
        assert "instance-profile" in n["node_config"]["IamInstanceProfile"]["Arn"], name
    ports = {p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]}
    assert {8265, 8000} <= ports  # dashboard / job API, Serve
    mount = config["file_mounts"]
    (remote, local), = mount.items()
    assert (ROOT / local / "pyproject.toml").exists()
    assert any("pip install" in c and remote in c for c in config["setup_commands"])
    assert any("--head" in c and "--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])
