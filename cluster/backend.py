"""Where a role's actors live: in Ray (`ray`: one process per actor, placement, restarts, the object store) or in
the driver's own process (`local`: plain objects, calls run at once, Ray never imported).

The role groups (`cluster.rollout_group`, `reward_group`, `learner_group`) are written once against this
interface; `cluster.backend` picks the implementation. Futures stand for results: a call returns one (or
`num_returns` of them) at once, `get` waits for values, and a future given as a top-level argument of another
call is resolved before that call runs (so trajectories pass from a rollout worker to a reward actor and a
learner rank without the driver reading them). On the local backend a call runs when it is made, in call order;
that is the order in which each Ray actor runs its own calls, so both backends compute the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence


@dataclass(frozen=True)
class ActorSpec:
    """How to start one actor: its class and arguments, and (Ray only) its resources and scheduling."""
    cls: type
    args: tuple = ()
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 0
    out_of_order: bool = False       # run calls as their arguments become ready, not in submission order
    scheduling: Any = None           # a Ray scheduling strategy (e.g. a placement-group bundle)
    resources: dict[str, float] = field(default_factory=dict)    # custom Ray resources ({name: amount})
    labels: dict[str, str] = field(default_factory=dict)          # node labels it must land on (label_selector)
    runtime_env: Optional[dict[str, Any]] = None                   # a Ray runtime_env for this actor (pip, env_vars…)


class Backend(Protocol):
    name: str
    #: errors that mean "the actor's process is gone" (Ray: RayActorError); the local backend has none
    actor_errors: tuple[type[BaseException], ...]
    #: errors that mean "gone for good" (its restarts used up)
    dead_errors: tuple[type[BaseException], ...]
    #: errors that mean "a result lived only on a node that is gone" (Ray: ObjectLostError)
    lost_errors: tuple[type[BaseException], ...]

    def start(self, spec: ActorSpec) -> Any: ...
    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1) -> Any: ...
    def get(self, futures: Any, timeout: Optional[float] = None) -> Any: ...
    def wait(self, futures: Sequence[Any], timeout: Optional[float] = None) -> tuple[list[Any], list[Any]]: ...
    def kill(self, actor: Any, restart: bool = False) -> None: ...
    def obj(self, actor: Any) -> Any: ...
    def task(self, fn: Any, *args: Any, scheduling: Any = None) -> Any: ...
    def reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float,
                labels: Optional[dict[str, str]] = None) -> "Reservation": ...
    def alive(self, actor: Any) -> bool: ...
    def node(self, actor: Any) -> Optional[str]: ...


class Reservation:
    """Resources held together for a gang of actors (the learner ranks); the local backend holds nothing."""

    def scheduling(self, index: int) -> Any:
        return None

    def release(self) -> None:
        pass


# ----- local ---------------------------------------------------------------------------------------------------
class _NoError(Exception):
    """Never raised: a local actor cannot die apart from the driver."""


@dataclass
class LocalFuture:
    """A finished local call: its value, or the exception it raised (re-raised by `get`, as Ray does)."""
    value: Any = None
    error: Optional[BaseException] = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class LocalBackend:
    """Every actor is an object in this process; a call runs immediately and its future is already done."""
    name = "local"
    actor_errors: tuple[type[BaseException], ...] = (_NoError,)
    dead_errors: tuple[type[BaseException], ...] = (_NoError,)
    lost_errors: tuple[type[BaseException], ...] = (_NoError,)

    def start(self, spec: ActorSpec) -> Any:
        if spec.runtime_env:
            raise ValueError(f"{spec.cls.__name__} asks for a runtime_env, which only Ray can apply (a separate "
                             f"environment per actor): set cluster.backend=ray, or drop runtime_env and install "
                             f"its packages in this environment")
        return spec.cls(*spec.args)

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        try:
            value = getattr(actor, method)(*[a.result() if isinstance(a, LocalFuture) else a for a in args])
        except Exception as e:                     # surfaces at get(), as with Ray
            return LocalFuture(error=e) if num_returns == 1 else [LocalFuture(error=e)] * num_returns
        if num_returns == 1:
            return LocalFuture(value)
        values = tuple(value)
        if len(values) != num_returns:
            raise ValueError(f"{method} returned {len(values)} values, expected {num_returns}")
        return [LocalFuture(v) for v in values]

    def get(self, futures: Any, timeout: Optional[float] = None) -> Any:
        if isinstance(futures, list):
            return [f.result() for f in futures]
        return futures.result()

    def wait(self, futures: Sequence[Any], timeout: Optional[float] = None) -> tuple[list[Any], list[Any]]:
        return list(futures), []

    def kill(self, actor: Any, restart: bool = False) -> None:
        pass

    def obj(self, actor: Any) -> Any:
        """The actor's own object (the in-process weight hand-over uses it)."""
        return actor

    def task(self, fn: Any, *args: Any, scheduling: Any = None) -> LocalFuture:
        return LocalFuture(fn(*args))

    def reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float,
                labels: Optional[dict[str, str]] = None) -> Reservation:
        return Reservation()

    def alive(self, actor: Any) -> bool:
        return True

    def node(self, actor: Any) -> Optional[str]:
        return None


# ----- Ray -----------------------------------------------------------------------------------------------------
class RayBackend:
    """Actors are Ray actors; futures are object references (owned by the driver)."""
    name = "ray"

    def __init__(self) -> None:
        import ray
        from ray.exceptions import ActorDiedError, RayActorError
        self._ray = ray
        from ray.exceptions import ObjectLostError
        self.actor_errors = (RayActorError,)
        self.lost_errors = (ObjectLostError,)
        self.dead_errors = (ActorDiedError,)

    def start(self, spec: ActorSpec) -> Any:
        options: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                                   "max_restarts": spec.max_restarts, "max_task_retries": 0}
        if spec.out_of_order:
            options["allow_out_of_order_execution"] = True
        if spec.resources:
            options["resources"] = dict(spec.resources)
        if spec.runtime_env:
            options["runtime_env"] = dict(spec.runtime_env)
        if spec.labels and spec.scheduling is None:      # in a placement group the group's bundles carry them
            options["label_selector"] = dict(spec.labels)
        cls = self._ray.remote(**options)(spec.cls)
        if spec.scheduling is not None:
            cls = cls.options(scheduling_strategy=spec.scheduling)
        return cls.remote(*spec.args)

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        fn = getattr(actor, method)
        if num_returns != 1:
            fn = fn.options(num_returns=num_returns)
        return fn.remote(*args)

    def get(self, futures: Any, timeout: Optional[float] = None) -> Any:
        return self._ray.get(futures, timeout=timeout)

    def wait(self, futures: Sequence[Any], timeout: Optional[float] = None) -> tuple[list[Any], list[Any]]:
        return self._ray.wait(list(futures), num_returns=len(futures), timeout=timeout)

    def kill(self, actor: Any, restart: bool = False) -> None:
        try:
            self._ray.kill(actor, no_restart=not restart)
        except Exception:       # already gone
            pass

    def obj(self, actor: Any) -> Any:
        raise TypeError("a Ray actor's object lives in another process")

    def task(self, fn: Any, *args: Any, scheduling: Any = None) -> Any:
        remote = self._ray.remote(num_cpus=0)(fn)
        return (remote.options(scheduling_strategy=scheduling) if scheduling is not None else remote).remote(*args)

    def reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float,
                labels: Optional[dict[str, str]] = None) -> Reservation:
        """A placement group (each bundle on a node with `labels`, if given); raises TimeoutError when the
        cluster cannot place it within `timeout_s`."""
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group
        pg = placement_group(bundles, strategy=strategy,
                             bundle_label_selector=[dict(labels)] * len(bundles) if labels else None)
        reservation = _PlacementGroup(pg)
        try:
            self._ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            reservation.release()
            raise TimeoutError(f"{len(bundles)} x {bundles[0]} ({strategy}) could not be placed within "
                               f"{timeout_s:.0f} s; the cluster has {self._ray.cluster_resources()} (available: "
                               f"{self._ray.available_resources()})") from None
        return reservation

    def _info(self, actor: Any) -> dict[str, Any]:
        from ray._private import state      # the GCS actor table (the public state API needs the dashboard)
        return state.actors(actor_id=actor._actor_id.hex()) or {}

    def alive(self, actor: Any) -> bool:
        """False once Ray has marked the actor dead (its process or its node is gone and no restart is left)."""
        try:
            return self._info(actor).get("State") != "DEAD"
        except Exception:                    # the GCS is unreachable: the cluster watchdog handles that
            return True

    def node(self, actor: Any) -> Optional[str]:
        """The id of the node the actor runs on (None while it is pending)."""
        try:
            return (self._info(actor).get("Address") or {}).get("NodeID") or None
        except Exception:
            return None


class _PlacementGroup(Reservation):
    def __init__(self, pg: Any):
        self.pg = pg

    def scheduling(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group
        try:
            remove_placement_group(self.pg)
        except Exception:       # already removed, or the cluster is gone
            pass


def make_backend(name: str) -> Backend:
    """`cluster.backend`: "ray" (Ray must be initialised by the caller) or "local"."""
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend()
    raise ValueError(f"cluster.backend must be 'ray' or 'local', not {name!r}")
