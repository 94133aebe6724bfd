"""The learner role: the DeepSpeed ranks (`actors.learner.LearnerWorker`, one per GPU or CPU process), kept
together (a placement group on Ray), and what the driver asks of them: an update from the driver's plan, the
weight hand-over to the rollout group (`cluster.weight_handover`), checkpoints and resume.

Every call goes to all ranks (they take part in collectives together); rank 0's answer is the group's.
A dead rank raises `LearnerFailure` (its optimizer state is gone), naming the last checkpoint: every wait on the
ranks polls (cluster.poll_s) and checks that each rank is alive, so a rank whose node died is noticed within
seconds even while the others block in a collective. The driver then stops, or with cluster.learner_restarts
builds a new group and resumes it from the last checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig

from actors.learner import LearnerWorker
from actors.weight_sync import DeviceLocation
from algorithm.plan import UpdatePlan
from learner.update import UpdateStats

from .backend import ActorSpec, Backend
from .config import plain, role_device, section
from .errors import LearnerFailure
from .preflight import StartupError, root_cause
from .waiting import Wait, wait_all
from .weight_handover import SyncStats, WeightHandover

if TYPE_CHECKING:
    from .fleet import RolloutFleet


class LearnerGroup:
    def __init__(self, backend: Backend, cfg: DictConfig, placement_timeout_s: float = 600.0):
        self.backend = backend
        self.cfg = cfg
        c = cfg.cluster
        n = c.num_learner_ranks
        bundle = {"CPU": c.cpus_per_actor, **({"GPU": c.learner_gpus} if c.learner_gpus > 0 else {}),
                  **(plain(c.learner_resources) or {})}
        labels = plain(c.learner_labels) or None
        try:        # on GPUs STRICT_PACK: one node (NCCL within it); on the CPU PACK
            self.reservation = backend.reserve([bundle] * n, "STRICT_PACK" if c.learner_gpus > 0 else "PACK",
                                               placement_timeout_s, labels=labels)
        except TimeoutError as e:
            where = f" on nodes labelled {labels}" if labels else ""
            raise StartupError(f"the learner's placement group{where}: {e}: start a node with these resources "
                               f"(`ray start --resources` / `--labels`), or lower cluster.num_learner_ranks / "
                               f"learner_gpus / cpus_per_actor / learner_resources") from None
        master_addr, master_port = backend.get(backend.task(LearnerWorker.rendezvous,
                                                            scheduling=self.reservation.scheduling(0)))
        threads = max(1, int(c.cpus_per_actor)) if c.learner_gpus == 0 else None
        self.ranks = [backend.start(ActorSpec(
            LearnerWorker, (i, n, master_addr, master_port, section(cfg, "policy"), section(cfg, "learner"),
                            section(cfg, "algorithm"), role_device(c.learner_gpus), cfg.seed, threads),
            num_cpus=c.cpus_per_actor, num_gpus=c.learner_gpus, scheduling=self.reservation.scheduling(i)))
            for i in range(n)]
        self.handover = WeightHandover(self, c)
        self.version = 0                   # the weight version of the last update (or resume): its one owner
        self.last_checkpoint: Optional[str] = None

    # ----- calls ---------------------------------------------------------------------------------------------------
    def call(self, method: str, *args: Any) -> list[Any]:
        """`method` on every rank; one future per rank."""
        return [self.backend.call(r, method, *args) for r in self.ranks]

    def call_rank0(self, method: str, *args: Any) -> Any:
        return self.backend.call(self.ranks[0], method, *args)

    def get(self, futures: Any, what: str, timeout: Optional[float] = None) -> Any:
        """Wait for learner calls, checking every cluster.poll_s that every rank is alive; a dead rank raises
        LearnerFailure, and so does a wait past `timeout` seconds."""
        wait = Wait(what, self.cfg.cluster.poll_s, timeout, lambda: self.check_alive(what),
                    lambda s: LearnerFailure(f"the learner ranks did not finish {what} within {s:.0f} s (a rank "
                                             f"stuck loading or in a collective): see the ranks' logs"))
        try:
            wait_all(self.backend, futures if isinstance(futures, list) else [futures], wait)
            return self.backend.get(futures)
        except self.backend.actor_errors as e:
            raise self._failure(what, root_cause(e)) from e

    def _failure(self, what: str, cause: str) -> LearnerFailure:
        return LearnerFailure(f"a learner rank died during {what} at weight version {self.version} ({cause}); "
                              f"nothing after the last checkpoint was saved: resume with resume=auto "
                              f"({self.last_checkpoint or 'no checkpoint yet'}), or set cluster.learner_restarts "
                              f"to rebuild the learner in the run")

    def check_alive(self, what: str = "a wait") -> None:
        """Raise LearnerFailure if Ray has marked a rank dead (its process or node is gone)."""
        dead = [r for r, rank in enumerate(self.ranks) if not self.backend.alive(rank)]
        if dead:
            raise self._failure(what, f"rank {dead[0]} is dead: its process or node is gone")

    def ready(self) -> list[Any]:
        return self.call("version")

    # ----- the update ----------------------------------------------------------------------------------------------
    def train(self, plan: UpdatePlan) -> tuple[UpdateStats, list[UpdateStats]]:
        """One update from the driver's plan, each rank its share (trajectories travel as top-level arguments,
        fetched by the backend); returns the merged figures and each rank's own."""
        n = len(self.ranks)
        futures = []
        for r, rank in enumerate(self.ranks):
            share = plan.for_rank(r, n)
            futures.append(self.backend.call(rank, "train_step", [g.without_trajectory() for g in share],
                                             *[g.trajectory for g in share]))
        per_rank = self.get(futures, "the update")
        merged = UpdateStats.merge(per_rank)
        self.version = merged.version
        return merged, per_rank

    # ----- weights ---------------------------------------------------------------------------------------------------
    def export(self, bucket_bytes: int, dtype: Optional[str]) -> Any:
        """A future of rank 0's weight buckets in host memory (every rank takes part: ZeRO-3 gathers)."""
        return self.call("export_weights", bucket_bytes, dtype)[0]

    def location(self) -> DeviceLocation:
        return self.get(self.call_rank0("location"), "the weight sync")

    def sync_to(self, rollouts: "RolloutFleet") -> SyncStats:
        """Hand the current weights to every rollout worker (path chosen, retried and logged by the hand-over)."""
        return self.handover.sync(rollouts)

    def digest(self) -> tuple[int, str]:
        return self.get(self.call_rank0("digest"), "a digest")

    # ----- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self, root: str, driver_state: dict[str, Any]) -> str:
        paths = self.get(self.call("save_checkpoint", root, driver_state), "a checkpoint save")
        self.last_checkpoint = paths[0]
        return paths[0]

    def resume(self, path: str) -> dict[str, Any]:
        """Every rank loads `path`; returns rank 0's {"path", "version", "driver_state"}."""
        info = self.get(self.call("resume", path), "the resume")[0]
        self.version = int(info["version"])
        self.last_checkpoint = info["path"]
        return info

    def shutdown(self) -> None:
        for r in self.ranks:
            self.backend.kill(r)
        self.reservation.release()
