"""The training driver: one process that dispatches rollouts, rewards and learner updates to Ray actors.

Trajectories never pass through the driver: rollout workers return them as object references that the driver
owns, hands to reward actors and learner ranks, and forgets. Per step:

    rollouts (workers, batched)  →  rewards (reward actors; each worker's groups scored as soon as they exist,
    the call submitted with the rollout)  →  advantages, filtering and trained steps (here: the algorithm lives
    in the driver)  →  update (learner ranks only compute)  →  weight sync (NCCL/gloo group, CUDA IPC on a
    shared GPU, or the object store)  →  metrics / samples / eval / checkpoint, and the run's timeline

`cluster.max_staleness = n > 0` launches the rollouts (and their rewards) of the next n steps before the current
update, so sampling overlaps training; a trajectory more than n versions older than the learner is dropped and
re-sampled.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch
from omegaconf import DictConfig
from ray.util.placement_group import remove_placement_group

from actors.types import GroupRequest
from actors.weight_sync import SyncPath, choose_sync_path
from learner.update import UpdateStats
from policy.files import atomic_write_json
from policy.weights import CheckpointError

from .advantages import PromptStatTracker, plan_update
from .config import plain, section
from .data import PromptSchedule, train_prompts
from .fleet import ACTOR_ERRORS, GroupResult, PendingRollout, RolloutFleet, RolloutStats
from .launch import start_learner_ranks, start_reward_pool
from .metrics import MetricsLogger
from .preflight import StartupError, root_cause
from .timeline import Timeline


class LearnerFailure(RuntimeError):
    """A learner rank died: the run cannot go on (its optimizer state is gone); resume from the last checkpoint."""


def _span_seconds(spans: list[tuple[float, float]]) -> float:
    """Wall seconds covered by a step's (start, end) spans of one role (0 when there are none)."""
    spans = sorted(set(spans))
    return max((e for _, e in spans), default=0.0) - min((s for s, _ in spans), default=0.0)


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.learner_cfg = section(cfg, "learner")
        self.tracker = PromptStatTracker(self.learner_cfg.running_buffer, self.learner_cfg.running_min_count,
                                         self.learner_cfg.adv_eps, self.learner_cfg.adv_std_unbiased)
        self.out = Path(cfg.output_dir).resolve()     # absolute: learner ranks write the checkpoints
        self.prompts = train_prompts(cfg)
        self.schedule = PromptSchedule(len(self.prompts), cfg.data.prompts_per_step, cfg.seed)
        self.bucket_bytes = int(cfg.cluster.weight_bucket_mb) << 20
        self.learners, self._learner_pg = start_learner_ranks(cfg)
        self.fleet = RolloutFleet(cfg, weights=self.export_weights)
        self.rewards = start_reward_pool(cfg)
        self._eval_pool = None
        self.worker_pids: dict[int, int] = {}
        self.sync_group_epoch = 0
        self.weight_dtype: Optional[str] = None   # the workers' parameter dtype: weights travel in it
        self.sync_group_ready = False
        self.sync_path: Optional[SyncPath] = None   # chosen at the first sync and whenever the workers change
        self.sync_backend = ""
        self._sync_configured: Optional[str] = None
        self._sync_logged: tuple[Optional[str], str] = (None, "")
        self.step = 0                      # next training step to run
        self.inflight: dict[int, list[PendingRollout]] = {}
        self.accepted_groups: set[int] = set()
        self.counters = {"groups_trained": 0, "groups_reissued": 0, "groups_stale_dropped": 0}
        self.last_checkpoint: Optional[str] = None
        self.last_groups: list[GroupResult] = []
        self.metrics = MetricsLogger(self.out, cfg.logging.tensorboard, cfg.logging.wandb_project, config=plain(cfg))
        self.timeline = Timeline(self.out / "timeline.json")
        self._wait_started()

    @property
    def version(self) -> int:
        return self.fleet.version

    def _wait_started(self) -> None:
        """Wait until every actor has built its model; one that fails while starting (e.g. unreadable weights)
        stops the run with its own error as the message, not as a later 'actor died'."""
        roles = ([("learner rank", i, a.version.remote()) for i, a in enumerate(self.learners)] +
                 [("rollout worker", i, a.ready.remote()) for i, a in self.fleet.workers.items()] +
                 [("reward actor", i, a.ping.remote()) for i, a in enumerate(self.rewards.actors)])
        waiting = {ref: (role, i) for role, i, ref in roles}
        limit, t0 = self.cfg.cluster.actor_start_s, time.monotonic()
        while waiting:
            left = limit - (time.monotonic() - t0)
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=max(0.1, min(30.0, left)))
            for ref in done:
                role, i = waiting.pop(ref)
                try:
                    value = ray.get(ref)
                    if role == "reward actor":
                        self.rewards.note_pid(i, value)
                except ACTOR_ERRORS as e:
                    self.shutdown()
                    raise StartupError(f"{role} {i} could not start: {root_cause(e)}") from None
            if not waiting:
                break
            names = ", ".join(f"{role} {i}" for role, i in waiting.values())
            elapsed = time.monotonic() - t0
            if elapsed >= limit:
                self.shutdown()
                raise StartupError(f"{names} did not start within cluster.actor_start_s={limit:g} s: most often the "
                                   f"cluster has no free CPUs/GPUs left for them (other jobs hold them: see `ray "
                                   f"status`); free them, lower cluster.cpus_per_actor / *_gpus, or raise "
                                   f"cluster.actor_start_s for a slow model load")
            print(f"[maskgrpo] still waiting for {names} to start ({elapsed:.0f} s; pending resources or loading the "
                  f"model; `ray status` shows which)", flush=True)

    def _learner_get(self, refs: Any, what: str, timeout: Optional[float] = None) -> Any:
        """`ray.get` of learner calls; a dead learner rank stops the run with LearnerFailure."""
        try:
            return ray.get(refs, timeout=timeout)
        except ACTOR_ERRORS as e:
            raise LearnerFailure(f"a learner rank died during {what} at step {self.step} ({root_cause(e)}); "
                                 f"nothing after the last checkpoint was saved: resume with resume=auto "
                                 f"({self.last_checkpoint or 'no checkpoint yet'})") from e

    # ----- weights -------------------------------------------------------------------------------------------------
    def _export(self) -> dict[str, Any]:
        """Every learner rank takes part (ZeRO-3 gathers); rank 0 returns its bucket references and bytes."""
        return self._learner_get([l.export_weights.remote(self.bucket_bytes, self.weight_dtype)
                                  for l in self.learners], "the weight export")[0]

    def export_weights(self) -> tuple[int, list[Any]]:
        """The current (version, bucket references), for workers that Ray restarted."""
        return self.version, self._export()["refs"]

    def _choose_sync_path(self, status: dict[int, dict[str, Any]]) -> None:
        """Pick how weights reach the current workers (logged whenever the choice changes)."""
        learner = self._learner_get(self.learners[0].location.remote(), "the weight sync")
        path, backend, why = choose_sync_path(self.cfg.cluster.weight_sync, learner,
                                              {i: s["location"] for i, s in status.items()})
        if (path, backend) != self._sync_logged:
            print(f"[maskgrpo] weight sync: {path}{f' ({backend})' if backend else ''}: {why}", flush=True)
            self._sync_logged = (path, backend)
        self.sync_path, self.sync_backend = path, backend
        self._sync_configured = self.cfg.cluster.weight_sync

    def _form_sync_group(self) -> None:
        backend = self.sync_backend
        self.sync_group_epoch += 1
        ids = sorted(self.fleet.workers)
        spec = ray.get(self.learners[0].open_sync_group.remote(f"wsync{self.sync_group_epoch}", len(ids) + 1,
                                                                backend))
        ray.get([self.learners[0].join_sync_group.remote(spec)] +
                [self.fleet.workers[i].join_sync_group.remote(spec, rank) for rank, i in enumerate(ids, start=1)],
                timeout=300)
        self.sync_group_ready = True

    def sync_weights(self) -> dict[str, float]:
        """Publish the learner's weights to every rollout worker; returns seconds and bytes moved. A failed
        collective broadcast (a member died or timed out) falls back to the object store; a worker that dies
        during the transfer is waited for (Ray restarts it) and served again."""
        t0 = time.perf_counter()
        self.fleet.version = self._learner_get(self.learners[0].version.remote(), "the weight sync")
        nbytes, fallback = 0.0, False
        for attempt in range(3):
            status = self.fleet.wait_ready()
            pids = {i: s["pid"] for i, s in status.items()}
            # Sender and receivers must plan the buckets with one dtype: the workers' (e.g. a bf16 learner
            # sending to fp32 workers converts on the way).
            dtypes = {s.get("dtype") for s in status.values()}
            if len(dtypes) != 1:
                raise RuntimeError(f"rollout workers hold their weights in different dtypes {sorted(map(str, dtypes))}")
            self.weight_dtype = dtypes.pop()
            if pids != self.worker_pids:            # a worker (re)started or left: its group membership is gone
                self.sync_group_ready = False
                self.worker_pids = pids
                self.sync_path = None
            if self.sync_path is None or self.cfg.cluster.weight_sync != self._sync_configured:
                self._choose_sync_path(status)
            mode = SyncPath.object_store if fallback else self.sync_path
            try:
                if mode == SyncPath.cuda_ipc:
                    shared = self._learner_get([l.share_weights_ipc.remote(self.bucket_bytes, self.weight_dtype)
                                                for l in self.learners], "the weight sync")[0]
                    try:
                        ray.get([w.receive_weights_ipc.remote(shared["buckets"])
                                 for w in self.fleet.workers.values()], timeout=900)
                    finally:
                        self._learner_get(self.learners[0].release_ipc.remote(), "the weight sync")
                    nbytes = shared["bytes"]
                elif mode == SyncPath.collective:
                    if not self.sync_group_ready:
                        self._form_sync_group()
                    results = ray.get([l.broadcast_weights.remote(self.bucket_bytes, self.weight_dtype)
                                       for l in self.learners] +
                                      [w.receive_weights.remote(self.version, self.bucket_bytes, self.weight_dtype)
                                       for w in self.fleet.workers.values()], timeout=900)
                    nbytes = results[0]["bytes"]
                else:
                    export = self._export()
                    ray.get([w.load_weights.remote(export["refs"]) for w in self.fleet.workers.values()],
                            timeout=900)
                    nbytes = export["bytes"]
                break
            except LearnerFailure:
                raise
            except Exception as e:
                if mode == SyncPath.object_store and (attempt == 2 or not isinstance(e, ACTOR_ERRORS)):
                    raise
                print(f"[maskgrpo] {mode} weight sync failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      f"retrying through the object store", flush=True)
                self.sync_group_ready = False
                fallback = True                  # for this sync; the next one tries the chosen path again
        seconds = time.perf_counter() - t0
        return {"sync_seconds": seconds, "sync_bytes": nbytes, "sync_collective": float(mode == SyncPath.collective),
                "sync_path": str(mode)}

    # ----- one training step -----------------------------------------------------------------------------------------
    def _requests(self, step: int) -> list[GroupRequest]:
        g = self.cfg.data.group_size
        return [GroupRequest(group_id=step * self.cfg.data.prompts_per_step + slot, step=step, prompt_index=idx,
                             prompt=self.prompts[idx].prompt, metadata=self.prompts[idx].metadata,
                             seeds=self.schedule.seeds(step, slot, g))
                for slot, idx in enumerate(self.schedule.indices(step))]

    def _launch_ahead(self) -> None:
        last = min(self.step + self.cfg.cluster.max_staleness, self.cfg.max_steps - 1)
        if any(s not in self.inflight for s in range(self.step, last + 1)):
            self.fleet.resync_restarted()   # a worker Ray restarted since the last sync gets the weights first
        for s in range(self.step, last + 1):
            if s not in self.inflight:
                self.dispatch(s)

    def dispatch(self, step: int) -> None:
        """Put step `step`'s rollouts, and the reward calls that score them as they arrive, in flight."""
        self.inflight[step] = self.fleet.dispatch(self._requests(step), rewards=self.rewards)

    def train_step(self) -> dict[str, Any]:
        step, t_step = self.step, time.perf_counter()
        stats = RolloutStats()
        self._launch_ahead()
        t0 = time.perf_counter()
        groups = self.fleet.gather(self.inflight.pop(step), stats, max_staleness=self.cfg.cluster.max_staleness,
                                   rewards=self.rewards)
        groups = [g for g in groups if g.meta.group_id not in self.accepted_groups]   # never train twice
        wait_s = time.perf_counter() - t0        # rollouts and their (streamed) rewards, as far as not done yet
        scores = [g.scores for g in groups]
        self._record_spans(groups)
        stats.staleness = [self.version - g.meta.policy_version for g in groups]
        rewards = [s["rewards"] for s in scores]
        plan = plan_update([g.traj_ref for g in groups], rewards, [g.meta.prompt for g in groups], self.learner_cfg,
                           self.cfg.sampler.steps, self.tracker, [g.meta.group_id for g in groups], step)
        n = len(self.learners)
        t0 = time.perf_counter()
        per_rank = self._learner_get([l.train_step.remote(plan.for_rank(r, n)) for r, l in enumerate(self.learners)],
                                     "the update")
        update = UpdateStats.merge(per_rank)
        self.accepted_groups.update(g.meta.group_id for g in groups)
        learner_s = time.perf_counter() - t0
        for r, part in enumerate(per_rank):
            self.timeline.add("learner", f"rank {r}", f"update {step}", part.started, part.finished)
        with self.timeline.measure("weight_sync", "learner -> workers", f"sync v{self.version + 1}"):
            sync = self.sync_weights()
        self.counters["groups_trained"] += len(groups)
        self.counters["groups_reissued"] += stats.reissued
        self.counters["groups_stale_dropped"] += stats.stale_dropped
        all_r = torch.cat(rewards) if rewards else torch.zeros(0)
        components = scores[0]["components"] if scores else {}
        hist = np.unique(np.asarray(stats.staleness, dtype=np.int64), return_counts=True)
        record: dict[str, Any] = {
            "step": step, "version": self.version,
            "reward_mean": float(all_r.mean()) if all_r.numel() else float("nan"),
            "reward_std": float(all_r.std()) if all_r.numel() > 1 else 0.0,
            **{f"reward/{k}_mean": float(torch.cat([s["components"][k] for s in scores]).mean())
               for k in components},
            **{f"reward/{k}_std": float(torch.cat([s["components"][k] for s in scores]).std())
               for k in components},
            "loss": update.loss,
            **{f"learner/{k}": v for k, v in update.metrics().items() if k != "loss"},
            **plan.metrics(),
            "rollout_seconds": _span_seconds([(g.meta.started, g.meta.finished) for g in groups]),
            "reward_seconds": _span_seconds([g.scores["span"] for g in groups]),
            "wait_seconds": wait_s, "learner_seconds": learner_s, **sync,
            "staleness_mean": float(np.mean(stats.staleness)) if stats.staleness else 0.0,
            "staleness_max": int(max(stats.staleness)) if stats.staleness else 0,
            "staleness_hist": {str(int(k)): int(v) for k, v in zip(*hist)},
            "groups": len(groups), "groups_reissued": stats.reissued, "groups_stale_dropped": stats.stale_dropped,
        }
        record["step_seconds"] = time.perf_counter() - t_step
        record["images_per_second"] = len(groups) * self.cfg.data.group_size / max(record["step_seconds"], 1e-9)
        self.step += 1
        self.last_groups = groups
        return record

    def _reward_lane(self, pid: Optional[int]) -> str:
        """The timeline lane of the reward actor whose process scored a group (pids the pool has seen)."""
        by_pid = {p: i for i, p in self.rewards.pids.items()}
        return f"actor {by_pid[pid]}" if pid in by_pid else f"actor pid {pid}"

    def _record_spans(self, groups: list[GroupResult]) -> None:
        for g in groups:
            self.timeline.add("rollout", f"worker {g.meta.worker_id}", f"rollout step {g.meta.step}",
                              g.meta.started, g.meta.finished)
            self.timeline.add("reward", self._reward_lane(g.scores.get("pid")), f"score step {g.meta.step}",
                              *g.scores["span"])

    # ----- state ---------------------------------------------------------------------------------------------------
    def driver_state(self) -> dict[str, Any]:
        """Saved inside each checkpoint; `version` is the learner version the driver has seen, so a checkpoint
        whose learner and driver disagree is recognised at resume."""
        return {"step": self.step, "version": self.version, "counters": dict(self.counters),
                "tracker": self.tracker.state_dict()}

    def save_checkpoint(self) -> str:
        root = str(self.out / "checkpoints")
        with self.timeline.measure("driver", "checkpoints", f"checkpoint step {self.step}"):
            paths = self._learner_get([l.save_checkpoint.remote(root, self.driver_state()) for l in self.learners],
                                      "a checkpoint save")
        self.last_checkpoint = paths[0]
        self.timeline.write()
        return paths[0]

    def evaluate(self, step: int) -> dict[str, Any]:
        """The held-out evaluation at `step` (rollout workers and the evaluation rewards' actors)."""
        from .evaluate import evaluate
        with self.timeline.measure("driver", "evaluation", f"evaluation at step {step}"):
            return evaluate(self.cfg, self.fleet, self.eval_pool(), step, self.decoder())

    def resume(self, path: str) -> None:
        infos = self._learner_get([l.resume.remote(path) for l in self.learners], "the resume")
        state = infos[0].get("driver_state") or {}
        if "version" in state and int(state["version"]) != int(infos[0]["version"]):
            raise CheckpointError(f"checkpoint {path} is inconsistent: its learner holds weight version "
                                  f"{infos[0]['version']} but the driver had seen version {state['version']} (it was "
                                  f"saved during an update); resume from an earlier checkpoint")
        self.step = int(state.get("step", infos[0]["version"]))
        self.counters.update(state.get("counters", {}))
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        self.last_checkpoint = infos[0]["path"]
        self.metrics.truncate_after(self.step - 1)

    # ----- samples and evaluation --------------------------------------------------------------------------------------
    def decoder(self):
        if not hasattr(self, "_decoder"):
            from policy.factory import build_decoder
            self._decoder = build_decoder(section(self.cfg, "policy"), "cpu")
        return self._decoder

    def save_samples(self, step: int, groups: list[GroupResult], max_groups: int = 4) -> Optional[Path]:
        from policy.images import save_captioned_grid
        if not groups:
            return None
        trajs = ray.get([g.traj_ref for g in groups[:max_groups]])
        images = self.decoder()(torch.cat([t.final_codes for t in trajs]))
        path = save_captioned_grid(images, self.out / "samples" / f"step_{step:06d}.png",
                                   [g.meta.prompt for g in groups[:max_groups]], nrow=self.cfg.data.group_size,
                                   scale=max(1, 128 // images.shape[1]))
        atomic_write_json(self.out / "samples" / f"step_{step:06d}.json", [g.meta.prompt for g in groups[:max_groups]])
        return path

    def eval_pool(self):
        if self._eval_pool is None:
            specs = plain(self.cfg.eval.rewards) or plain(self.cfg.rewards)
            self._eval_pool = self.rewards if specs == plain(self.cfg.rewards) else start_reward_pool(self.cfg, specs)
        return self._eval_pool

    def shutdown(self) -> None:
        self.metrics.close()
        self.fleet.shutdown()
        for a in list(self.learners) + list(self.rewards.actors) + \
                (list(self._eval_pool.actors) if self._eval_pool not in (None, self.rewards) else []):
            try:
                ray.kill(a)
            except Exception:
                pass
        try:
            remove_placement_group(self._learner_pg)
        except Exception:
            pass
