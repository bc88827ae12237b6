"""Shared plumbing of the Ray entry points: argument parsing into typed configs, Ray start-up, a quiet console.

Run without a cluster, a job starts a local Ray bound to 127.0.0.1; under `ray job submit` (or with
RAY_ADDRESS set) it joins that cluster. Credentials reach Ray's workers through their own environment
or instance profile, never through a runtime_env (visible in the dashboard and the state API).

The console shows what a person wants: each stage's own progress line or bar and the results. Ray's
logs (Ray Data's operator progress and execution plans, workers' output) go to the Ray session's log
directory, which each job links into its output as `ray-logs`; `--verbose` shows them on the console.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path
from typing import TypeVar

# Ray reads this when it is imported: off (no cluster address) keeps every Ray process of a local
# run on 127.0.0.1 instead of the machine's external interface. A cluster job (RAY_ADDRESS) keeps it.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

T = TypeVar("T")
VERBOSE = False
"""Ray's own logs on the console too (set by --verbose)."""


def parse(cls: type[T], argv: list[str] | None, description: str) -> T:
    global VERBOSE
    from tah.config import load_config

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML recipe (fields of %s)" % cls.__name__)
    ap.add_argument("--verbose", action="store_true", help="also show Ray's logs on the console")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_actors=2 output=s3://bucket/labels")
    args = ap.parse_args(argv)
    VERBOSE = VERBOSE or args.verbose
    return load_config(cls, args.config, args.overrides)


def quiet_console() -> None:
    """Keep Ray's and the libraries' chatter off the console (it stays in Ray's log files): Ray Data
    logs its execution plans and per-operator progress at INFO every few seconds."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):  # its session file handlers keep everything
            handler.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every checkpoint load
    # transformers' deprecation notices about its own internals (tah/hf_adapter.py tracks them)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed would detect, without its warning about it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def link_ray_logs(output: str | None) -> None:
    """Link the Ray session's log directory into a local job output as `ray-logs` and say where it is."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path(), "logs") if ray.is_initialized() and \
        getattr(ray._private.worker, "_global_node", None) is not None else None
    if logs is None:
        return
    where = str(logs)
    if output and not output.startswith("s3://"):
        link = Path(output, "ray-logs")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(logs, target_is_directory=True)
            where = f"{link} -> {logs}"
    if not VERBOSE:
        print(f"[ray] Ray's logs: {where} (--verbose shows them here)", flush=True)


def absolute_local(path: str | None) -> str | None:
    """A local path that exists, made absolute (Ray workers and actors may run in another working
    directory); hub ids, s3:// URIs and None unchanged."""
    from pathlib import Path

    if not path or str(path).startswith("s3://") or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def init_ray(num_cpus: int | None = None, dashboard: bool = False, output: str | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray on 127.0.0.1.

    dashboard=True also starts the dashboard (on 8265, or a free port when that one is taken): its
    state API is how Ray Train's placement-group cleaner sees a controller die, which is what frees
    the workers of a Train run that Tune stopped (jobs/sweep.py). Other jobs skip its start-up cost.
    `output`: the job's output, where the Ray logs are linked (see `link_ray_logs`).
    """
    import ray

    if not VERBOSE:
        quiet_console()
    if ray.is_initialized():
        return
    # No runtime_env: the dashboard and the state API show it, so credentials never go there. The
    # Ray processes of a local cluster are started by this one and inherit its environment (AWS_*
    # credentials or an instance profile, AWS_ENDPOINT_URL, TAH_CACHE); a cluster's nodes use their own.
    level = logging.INFO if VERBOSE else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=level, log_to_driver=VERBOSE)
    else:
        extra = ({"include_dashboard": True, "dashboard_port": _free_port(8265)} if dashboard
                 else {"include_dashboard": False})
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", log_to_driver=VERBOSE,
                 logging_level=level, **extra)
    link_ray_logs(output)


def _free_port(preferred: int) -> int:
    """preferred when nothing listens on it, else 0 (the OS picks)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred
