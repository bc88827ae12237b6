"""Shared plumbing of the Ray entry points: argument parsing into typed configs and Ray start-up.

Run without a cluster, a job starts a local Ray bound to 127.0.0.1; under `ray job submit` (or with
RAY_ADDRESS set) it joins that cluster. Credentials reach Ray's workers through their own environment
or instance profile, never through a runtime_env (visible in the dashboard and the state API).
"""

from __future__ import annotations

import argparse
import os
from typing import TypeVar

# Ray reads this when it is imported: off (no cluster address) keeps every Ray process of a local
# run on 127.0.0.1 instead of the machine's external interface. A cluster job (RAY_ADDRESS) keeps it.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

T = TypeVar("T")


def parse(cls: type[T], argv: list[str] | None, description: str) -> T:
    from tah.config import load_config

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML recipe (fields of %s)" % cls.__name__)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_actors=2 output=s3://bucket/labels")
    args = ap.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def absolute_local(path: str | None) -> str | None:
    """A local path that exists, made absolute (Ray workers and actors may run in another working
    directory); hub ids, s3:// URIs and None unchanged."""
    from pathlib import Path

    if not path or str(path).startswith("s3://") or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray on 127.0.0.1.

    dashboard=True also starts the dashboard (on 8265, or a free port when that one is taken): its
    state API is how Ray Train's placement-group cleaner sees a controller die, which is what frees
    the workers of a Train run that Tune stopped (jobs/sweep.py). Other jobs skip its start-up cost.
    """
    import ray

    if ray.is_initialized():
        return
    # No runtime_env: the dashboard and the state API show it, so credentials never go there. The
    # Ray processes of a local cluster are started by this one and inherit its environment (AWS_*
    # credentials or an instance profile, AWS_ENDPOINT_URL, TAH_CACHE); a cluster's nodes use their own.
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    extra = ({"include_dashboard": True, "dashboard_port": _free_port(8265)} if dashboard
             else {"include_dashboard": False})
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=False, **extra)


def _free_port(preferred: int) -> int:
    """preferred when nothing listens on it, else 0 (the OS picks)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred
