"""The training driver: the single controller. It holds the algorithm (prompts, advantages, which steps train) and
drives three role groups — rollout, reward, learner — that run on Ray or in this process (`cluster.backend`).

Trajectories never pass through the driver: rollout workers return them as futures that the driver hands to
reward actors and learner ranks and forgets. `Trainer.train_step` (every caller's one step) reads as its stages:

    fleet       workers that became ready since the last step join, with the current weights (`cluster.fleet`)
    dispatch    this step's groups, one batched rollout call per worker (`RolloutGroup.dispatch`)
    rewards     each rollout call's groups are scored the moment they exist (`RewardGroup.score_rollouts`)
    gather      wait for each worker's groups and their rewards; a lost worker's groups and stale ones are
                dispatched and scored again (`RolloutGroup.gather`)
    plan        advantages, filtering, trained steps: the algorithm (`algorithm.plan.Planner`)
    update      the learner ranks compute (`LearnerGroup.train`)
    hand-over   the new weights to the rollout workers (`LearnerGroup.sync_to`)

`cluster.max_staleness = n > 0` dispatches the rollouts (and their rewards) of the next n steps before the current
update, so sampling overlaps training; a trajectory more than n versions older than the learner is dropped and
re-sampled. The weight version has one owner, the learner (`LearnerGroup.version`); the driver, the fleet and the
hand-over read it. Every wait goes through `cluster.waiting.Wait` (deadline, liveness watch, message).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from actors.types import GroupRequest
from algorithm.advantages import GroupOutcome
from algorithm.plan import Planner
from policy.factory import build_decoder
from policy.files import atomic_write_json
from policy.images import save_captioned_grid
from policy.weights import CheckpointError

from .backend import Backend, make_backend
from .config import plain, section, world_kwargs
from .data import prompt_schedule, train_prompts
from .evaluate import evaluate
from .learner_group import LearnerGroup
from .metrics import MetricsLogger
from .preflight import StartupError, root_cause
from .reward_group import RewardGroup
from .errors import FleetError, LearnerFailure
from .fleet import RolloutFleet
from .rollout_group import GroupResult, PendingRollout, RolloutGroup, RolloutStats
from .step_metrics import StepMetrics
from .timeline import Timeline
from .waiting import Wait


class _LearnerWeights:
    """The fleet's view of the current learner's weights (the learner group is rebuilt after a rank's loss)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    @property
    def version(self) -> int:
        return self.trainer.learner.version

    def export(self) -> Any:
        return self.trainer.learner.handover.export()


class Trainer:
    def __init__(self, cfg: DictConfig, backend: Optional[Backend] = None):
        self.cfg = cfg
        self.backend = backend or make_backend(cfg.cluster.backend)
        self.algorithm = section(cfg, "algorithm")
        self.planner = Planner(self.algorithm)
        self.tree = self.algorithm.tree_spec
        self.out = Path(cfg.output_dir).resolve()     # absolute: learner ranks write the checkpoints
        self.prompts = train_prompts(cfg)
        self.schedule = prompt_schedule(cfg, self.prompts)
        self.learner = LearnerGroup(self.backend, cfg)
        self.fleet = RolloutFleet(self.backend, cfg, weights=_LearnerWeights(self),
                                  watch=lambda: self.learner.check_alive("the wait for rollouts and rewards"))
        self.rollouts = RolloutGroup(self.backend, cfg, self.fleet)
        self.learner_restarts = 0
        self.rewards = RewardGroup.from_config(self.backend, cfg)
        self._eval_rewards: Optional[RewardGroup] = None
        self._decoder = None
        self.step = 0                      # next training step to run
        self.inflight: dict[int, list[PendingRollout]] = {}
        self.accepted_groups: set[int] = set()
        self.counters = {"groups_trained": 0, "groups_reissued": 0, "groups_stale_dropped": 0}
        self.last_groups: list[GroupResult] = []
        self.metrics = MetricsLogger(self.out, cfg.logging.tensorboard, cfg.logging.wandb_project, config=plain(cfg))
        self.timeline = Timeline(self.out / "timeline.json")
        self._wait_started()

    @property
    def version(self) -> int:
        """The weight version: the learner's, read (its one owner; the workers hold it after each hand-over)."""
        return self.learner.version

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self.learner.last_checkpoint

    def _wait_started(self) -> None:
        """Wait until every actor has built its model; one that fails while starting (e.g. unreadable weights)
        stops the run with its own error as the message, not as a later 'actor died'."""
        roles = ([("learner rank", i, f) for i, f in enumerate(self.learner.ready())] +
                 [("rollout worker", i, f) for i, f in self.fleet.ready().items()] +
                 [("reward actor", i, f) for i, f in enumerate(self.rewards.ready())])
        waiting = {id(f): (role, i, f) for role, i, f in roles}
        limit = self.cfg.cluster.actor_start_s

        def missing() -> bool:      # rollout workers beyond num_rollout_workers may join later
            return any(role != "rollout worker" for role, _, _ in waiting.values()) or \
                len(self.fleet.workers) < self.fleet.start_workers

        def too_slow(elapsed: float) -> StartupError:
            self.shutdown()
            names = ", ".join(f"{role} {i}" for role, i, _ in waiting.values())
            return StartupError(f"{names} did not start within cluster.actor_start_s={limit:g} s: most often the "
                                f"cluster has no free CPUs/GPUs left for them (other jobs hold them: see `ray "
                                f"status`); free them, lower cluster.cpus_per_actor / *_gpus, or raise "
                                f"cluster.actor_start_s for a slow model load")
        wait = Wait("the actors to start (pending resources or loading the model; `ray status` shows which)",
                    self.cfg.cluster.poll_s, limit, expired=too_slow, say_every_s=30.0)
        for timeout in (wait.polls() if waiting and missing() else ()):
            done, _ = self.backend.wait([f for _, _, f in waiting.values()], timeout=timeout)
            for f in done:
                role, i, _ = waiting.pop(id(f))
                try:
                    value = self.backend.get(f)
                except Exception as e:       # the actor's constructor raised, or its process died
                    self.shutdown()
                    raise StartupError(f"{role} {i} could not start: {root_cause(e)}") from None
                if role == "reward actor":
                    self.rewards.note_pid(i, value)
                elif role == "rollout worker":
                    self.fleet.admit(i, value)
            if not (waiting and missing()):
                break
        self.fleet.started()
        if self.fleet.joining:
            print(f"[maskgrpo] {len(self.fleet.workers)} rollout workers in service; "
                  f"{len(self.fleet.joining)} more join when resources allow (cluster.max_rollout_workers="
                  f"{self.fleet.max_workers})", flush=True)

    # ----- one training step ---------------------------------------------------------------------------------------
    def train_step(self) -> StepMetrics:
        """Rollouts and rewards of this step (and, with staleness, the next ones' launched), the plan, the update
        and the hand-over. The one training step: `maskgrpo train`, the benchmarks and the GPU check call it."""
        try:
            return self._train_step()
        except FleetError as e:
            raise FleetError(f"{e}; the run stopped at step {self.step}: resume=auto continues from "
                             f"{self.last_checkpoint or 'the start (no checkpoint yet)'}") from None

    def _train_step(self) -> StepMetrics:
        step, t_step, stats = self.step, time.perf_counter(), RolloutStats()
        self.fleet.admit_joined()               # fleet: workers ready since the last step join, weights first
        for s in self._steps_to_launch():       # this step's rollouts; with staleness n also the next n steps'
            launched = self.rollouts.dispatch(self._requests(s))              # dispatch
            self.rewards.score_rollouts(launched)    # rewards: a call's groups are scored the moment they exist
            self.inflight[s] = launched
        t0 = time.perf_counter()
        groups = self.rollouts.gather(self.inflight.pop(step), self.rewards, stats, self.version,   # gather
                                      self.cfg.cluster.max_staleness)
        groups = [g for g in groups if g.meta.group_id not in self.accepted_groups]   # never train twice
        wait_s = time.perf_counter() - t0        # rollouts and their (streamed) rewards, as far as not done yet
        self._record_spans(groups)
        staleness = [self.version - g.meta.policy_version for g in groups]
        plan = self.planner.plan([self._outcome(g) for g in groups], [g.trajectory for g in groups], step)  # plan
        t0 = time.perf_counter()
        update, per_rank = self.learner.train(plan)                                                      # update
        learner_s = time.perf_counter() - t0
        self.accepted_groups.update(g.meta.group_id for g in groups)
        for r, part in enumerate(per_rank):
            self.timeline.add("learner", f"rank {r}", f"update {step}", part.started, part.finished)
        with self.timeline.measure("weight_sync", "learner -> workers", f"sync v{self.version}"):
            sync = self.learner.sync_to(self.fleet)                                                   # hand-over
        self.counters["groups_trained"] += len(groups)
        self.counters["groups_reissued"] += stats.reissued
        self.counters["groups_stale_dropped"] += stats.stale_dropped
        self.step += 1
        self.last_groups = groups
        labels = list(groups[0].scores.components) if groups else []
        return StepMetrics(
            step=step, version=self.version, group_size=self.cfg.data.group_size,
            rewards=[g.scores.rewards for g in groups],
            components={k: [g.scores.components[k] for g in groups] for k in labels}, update=update,
            plan=plan.metrics(), staleness=staleness,
            rollout_spans=[(g.meta.started, g.meta.finished) for g in groups],
            reward_spans=[g.scores.span for g in groups], wait_seconds=wait_s, learner_seconds=learner_s,
            sync=sync, reissued=stats.reissued, stale_dropped=stats.stale_dropped,
            step_seconds=time.perf_counter() - t_step, rollout_workers=len(self.fleet.workers),
            rollout_tokens=stats.rollout_tokens)

    # ----- learner loss --------------------------------------------------------------------------------------------
    def restart_learner(self, failure: BaseException) -> None:
        """Rebuild the learner group after a rank died (cluster.learner_restarts): new ranks (placed once their
        resources are back, waiting up to cluster.learner_wait_s), resumed from the last checkpoint (or from the
        start without one), the steps since then run again and their metric lines are dropped first."""
        self.learner_restarts += 1
        checkpoint = self.learner.last_checkpoint
        print(f"[maskgrpo] {failure}\n[maskgrpo] rebuilding the learner (restart {self.learner_restarts} of "
              f"cluster.learner_restarts={self.cfg.cluster.learner_restarts}) from "
              f"{checkpoint or 'the initial weights (no checkpoint yet)'}", flush=True)
        self.learner.shutdown()
        self.inflight.clear()              # sampled for a version the new learner may never reach: sampled again
        t0 = time.monotonic()
        try:
            self.learner = LearnerGroup(self.backend, self.cfg, placement_timeout_s=self.cfg.cluster.learner_wait_s)
        except StartupError as e:          # no node came back within cluster.learner_wait_s
            raise LearnerFailure(f"{failure}; rebuilding it failed: {e}") from None
        self.learner.get(self.learner.ready(), "the restart", timeout=self.cfg.cluster.actor_start_s)
        if checkpoint is not None:
            self.resume(checkpoint)
        else:
            self.step = 0
            self.counters = {k: 0 for k in self.counters}
            self.planner = Planner(self.algorithm)
            self.metrics.truncate_after(-1)
        first = self.step * self.cfg.data.prompts_per_step
        self.accepted_groups = {g for g in self.accepted_groups if g < first}
        self.sync_weights()
        print(f"[maskgrpo] learner rebuilt in {time.monotonic() - t0:.1f} s; continuing at step {self.step}",
              flush=True)

    def _requests(self, step: int) -> list[GroupRequest]:
        """This step's groups: one prompt each, with a seed per sample (a group tree: per node)."""
        n = self.tree.num_nodes if self.tree is not None else self.cfg.data.group_size
        tree = self.tree.to_dict() if self.tree is not None else None
        return [GroupRequest(group_id=step * self.cfg.data.prompts_per_step + slot, step=step, prompt_index=idx,
                             prompt=self.prompts[idx].prompt, metadata=self.prompts[idx].metadata,
                             seeds=self.schedule.seeds(step, slot, n), tree=tree)
                for slot, idx in enumerate(self.schedule.indices(step))]

    def _outcome(self, g: GroupResult) -> GroupOutcome:
        """What the algorithm's plan reads of a group: its rewards, and the sampler's per-step signals."""
        return GroupOutcome(g.meta.group_id, g.meta.prompt, g.scores.rewards, self.cfg.sampler.steps, self.tree,
                            {k: torch.tensor(v) for k, v in g.meta.signals.items()})

    def _steps_to_launch(self) -> list[int]:
        """The steps whose rollouts are not in flight yet: this one, and with staleness n the next n."""
        last = min(self.step + self.cfg.cluster.max_staleness, self.cfg.max_steps - 1)
        return [s for s in range(self.step, last + 1) if s not in self.inflight]

    def _record_spans(self, groups: list[GroupResult]) -> None:
        for g in groups:
            self.timeline.add("rollout", f"worker {g.meta.worker_id}", f"rollout step {g.meta.step}",
                              g.meta.started, g.meta.finished)
            self.timeline.add("reward", self.rewards.lane(g.scores.pid), f"score step {g.meta.step}", *g.scores.span)

    def sync_weights(self) -> dict[str, Any]:
        """Hand the learner's weights to the rollout group (at start and after a resume)."""
        return self.learner.sync_to(self.fleet).metrics()

    # ----- state ---------------------------------------------------------------------------------------------------
    def driver_state(self) -> dict[str, Any]:
        """Saved inside each checkpoint; `version` is the learner version the driver has seen, so a checkpoint
        whose learner and driver disagree is recognised at resume."""
        return {"step": self.step, "version": self.version, "counters": dict(self.counters),
                "tracker": self.planner.state_dict()}

    def save_checkpoint(self) -> str:
        with self.timeline.measure("driver", "checkpoints", f"checkpoint step {self.step}"):
            path = self.learner.save_checkpoint(str(self.out / "checkpoints"), self.driver_state())
        self.timeline.write()
        return path

    def resume(self, path: str) -> None:
        info = self.learner.resume(path)
        state = info.get("driver_state") or {}
        if "version" in state and int(state["version"]) != int(info["version"]):
            raise CheckpointError(f"checkpoint {path} is inconsistent: its learner holds weight version "
                                  f"{info['version']} but the driver had seen version {state['version']} (it was "
                                  f"saved during an update); resume from an earlier checkpoint")
        self.step = int(state.get("step", info["version"]))
        self.counters.update(state.get("counters", {}))
        self.planner.load_state_dict(state.get("tracker"))
        self.metrics.truncate_after(self.step - 1)

    # ----- samples and evaluation --------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, Any]:
        """The held-out evaluation at `step` (rollout workers and the evaluation rewards' actors)."""
        with self.timeline.measure("driver", "evaluation", f"evaluation at step {step}"):
            return evaluate(self.cfg, self.rollouts, self.eval_rewards(), step, self.decoder())

    def decoder(self):
        if self._decoder is None:
            self._decoder = build_decoder(section(self.cfg, "policy"), "cpu", world_kwargs(self.cfg))
        return self._decoder

    def save_samples(self, step: int, groups: list[GroupResult], max_groups: int = 4) -> Optional[Path]:
        if not groups:
            return None
        trajs = self.backend.get([g.trajectory for g in groups[:max_groups]])
        images = self.decoder()(torch.cat([t.final_codes for t in trajs]))
        prompts = [g.meta.prompt for g in groups[:max_groups]]
        path = save_captioned_grid(images, self.out / "samples" / f"step_{step:06d}.png", prompts,
                                   nrow=self.cfg.data.group_size, scale=max(1, 128 // images.shape[1]))
        atomic_write_json(self.out / "samples" / f"step_{step:06d}.json", prompts)
        return path

    def eval_rewards(self) -> RewardGroup:
        if self._eval_rewards is None:
            specs = plain(self.cfg.eval.rewards) or plain(self.cfg.rewards)
            self._eval_rewards = (self.rewards if specs == plain(self.cfg.rewards)
                                  else RewardGroup.from_config(self.backend, self.cfg, specs))
        return self._eval_rewards

    def shutdown(self) -> None:
        self.metrics.close()
        self.fleet.shutdown()
        self.rewards.shutdown()
        if self._eval_rewards not in (None, self.rewards):
            self._eval_rewards.shutdown()
        self.learner.shutdown()
