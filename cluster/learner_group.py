"""The learner role: the DeepSpeed ranks (`actors.learner.LearnerWorker`, one per GPU or CPU process), kept
together (a placement group on Ray), and what the driver asks of them: an update from the driver's plan, the
weight hand-over to the rollout group (`cluster.weight_handover`), checkpoints and resume.

Every call goes to all ranks (they take part in collectives together); rank 0's answer is the group's.
A dead rank stops the run with `LearnerFailure` (its optimizer state is gone), naming the last checkpoint.
"""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from actors.learner import LearnerWorker
from actors.weight_sync import DeviceLocation
from learner.update import UpdateStats

from .advantages import UpdatePlan
from .backend import ActorSpec, Backend
from .config import role_device, section
from .errors import LearnerFailure
from .preflight import root_cause
from .weight_handover import SyncStats, WeightHandover


class LearnerGroup:
    def __init__(self, backend: Backend, cfg: DictConfig, placement_timeout_s: float = 600.0):
        self.backend = backend
        c = cfg.cluster
        n = c.num_learner_ranks
        bundle = {"CPU": c.cpus_per_actor, **({"GPU": c.learner_gpus} if c.learner_gpus > 0 else {})}
        try:        # on GPUs STRICT_PACK: one node (NCCL within it); on the CPU PACK
            self.reservation = backend.reserve([bundle] * n, "STRICT_PACK" if c.learner_gpus > 0 else "PACK",
                                               placement_timeout_s)
        except TimeoutError as e:
            raise RuntimeError(f"the learner's placement group: {e}: lower cluster.num_learner_ranks / learner_gpus "
                               f"/ cpus_per_actor or add nodes") from None
        master_addr, master_port = backend.get(backend.task(LearnerWorker.rendezvous,
                                                            scheduling=self.reservation.scheduling(0)))
        threads = max(1, int(c.cpus_per_actor)) if c.learner_gpus == 0 else None
        self.ranks = [backend.start(ActorSpec(
            LearnerWorker, (i, n, master_addr, master_port, section(cfg, "policy"), section(cfg, "learner"),
                            role_device(c.learner_gpus), cfg.seed, threads),
            num_cpus=c.cpus_per_actor, num_gpus=c.learner_gpus, scheduling=self.reservation.scheduling(i)))
            for i in range(n)]
        self.handover = WeightHandover(self, c)
        self.version = 0                   # the weight version of the last update (or resume)
        self.last_checkpoint: Optional[str] = None

    # ----- calls ---------------------------------------------------------------------------------------------------
    def call(self, method: str, *args: Any) -> list[Any]:
        """`method` on every rank; one future per rank."""
        return [self.backend.call(r, method, *args) for r in self.ranks]

    def call_rank0(self, method: str, *args: Any) -> Any:
        return self.backend.call(self.ranks[0], method, *args)

    def get(self, futures: Any, what: str, timeout: Optional[float] = None) -> Any:
        """Wait for learner calls; a dead rank stops the run with LearnerFailure."""
        try:
            return self.backend.get(futures, timeout=timeout)
        except self.backend.actor_errors as e:
            raise LearnerFailure(f"a learner rank died during {what} at weight version {self.version} "
                                 f"({root_cause(e)}); nothing after the last checkpoint was saved: resume with "
                                 f"resume=auto ({self.last_checkpoint or 'no checkpoint yet'})") from e

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

    def sync_to(self, rollouts) -> SyncStats:
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
