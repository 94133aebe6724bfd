"""Joining or starting Ray for the `ray` backend, and the backend a command runs on.

Local single-node mode (no `cluster.address`, no RAY_ADDRESS): a private Ray instance is started here and shut
down at the end. Under `ray job submit` the driver joins the job's cluster (the job's `--working-dir` ships the
code); with `cluster.address` or RAY_ADDRESS it joins that cluster. If Ray is already initialized in this process,
it is used as it is. `cluster.backend=local` starts no Ray at all (and never imports it).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from .backend import Backend, make_backend
from .config import Backend as BackendName
from .preflight import required_resources


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` (its supervisor passes the job's config in this variable)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_ID"))


def cluster_address(cfg: DictConfig) -> Optional[str]:
    """The Ray cluster to join (`cluster.address`, else RAY_ADDRESS); None: start a private local instance (unless
    this is the driver of a `ray job submit`, which always joins its job's cluster)."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS")


def init_ray(cfg: DictConfig) -> str:
    """Connect to (or start) Ray. Returns "local" when this process started a private instance, "cluster" when it
    joined a running cluster (an address, or the driver of a `ray job submit`), "reused" when Ray was already
    initialized in this process."""
    import ray
    if ray.is_initialized():
        return "reused"
    repo = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        **({"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]} if "DS_ACCELERATOR" in os.environ else {})}}
    if in_ray_job():
        # The driver of a `ray job submit`: join the job's cluster with the job's runtime env (its working_dir
        # carries this repository to every node), whatever cluster.address says.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True)
        return "cluster"
    address = cluster_address(cfg)
    if address:
        # An existing cluster: its nodes must see this repository at the same path (shared disk or image).
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return "cluster"
    # Logical CPUs: enough for every actor (Ray only counts them; each actor limits its own torch threads).
    needed = math.ceil(required_resources(cfg)["CPU"]) + 1
    # address="local": a private instance even when `ray start` left a cluster running on this machine (plain
    # ray.init() would join that one, with whatever resources it has)
    loopback_only(True)
    try:
        ray.init(address="local", num_cpus=max(needed, cfg.cluster.local_num_cpus or os.cpu_count() or 1),
                 include_dashboard=False,
                 runtime_env=env, log_to_driver=True, configure_logging=False)
    except BaseException:
        loopback_only(False)
        raise
    return "local"


_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # Ray's switch for its single-machine (loopback) mode
_saved_switch: list[Any] = []                           # (environment value, Ray's constant) before loopback_only


def loopback_only(on: bool) -> None:
    """A private local instance listens on 127.0.0.1 only (no port of it is reachable from the network): Ray's
    single-machine mode, the one it uses on macOS and Windows, makes the node address the loopback one. Ray reads
    the switch from the environment, in the processes it starts, and once at import in this one; `on=False`
    restores both before this process joins a real cluster."""
    try:
        import ray._private.ray_constants as constants
    except ImportError:  # pragma: no cover
        return
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        return                     # a Ray without the switch: its default binding stays
    if on and not _saved_switch:
        _saved_switch.extend([os.environ.get(_SINGLE_MACHINE), constants.ENABLE_RAY_CLUSTER])
    if on:
        os.environ[_SINGLE_MACHINE] = "0"
        constants.ENABLE_RAY_CLUSTER = False
    elif _saved_switch:
        env, constants.ENABLE_RAY_CLUSTER = _saved_switch
        _saved_switch.clear()
        if env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = env


def shutdown_local_ray() -> None:
    """Stop the Ray instance this process started and remove its session directory (logs of a finished local
    run; without this every run leaves one behind in Ray's temporary directory)."""
    import shutil
    import ray
    session_dir = None
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        pass
    ray.shutdown()
    loopback_only(False)
    if session_dir and Path(session_dir).is_dir():
        shutil.rmtree(session_dir, ignore_errors=True)


@contextmanager
def backend_session(cfg: DictConfig) -> Iterator[tuple[Backend, str]]:
    """The backend `cfg.cluster.backend` names, with Ray joined or started for it (and a private instance shut
    down afterwards). Yields (backend, mode): mode is "local" / "cluster" / "reused" as `init_ray` says, or
    "in_process" for the local backend."""
    if cfg.cluster.backend == BackendName.local:
        yield make_backend("local"), "in_process"
        return
    mode = init_ray(cfg)
    try:
        yield make_backend("ray"), mode
    finally:
        if mode == "local":
            shutdown_local_ray()
