"""Starting the run's actors on a Ray cluster (or a local Ray instance): rollout workers, reward actors and the
learner ranks (kept together by a placement group). Counts and resources come from the `cluster` section."""
from __future__ import annotations

from typing import Any

import ray
from omegaconf import DictConfig
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerWorker
from actors.rollout import RolloutWorker

from .config import plain, section


def role_device(gpus: float) -> str:
    """Where a role runs: on CUDA iff it is given a GPU share (cluster.rollout_gpus / reward_gpus / learner_gpus;
    `device: cpu|cuda` only checks that these agree, see RunConfig)."""
    return "cuda" if gpus > 0 else "cpu"


def start_rollout_worker(cfg: DictConfig, worker_id: int):
    c = cfg.cluster
    cls = ray.remote(num_gpus=c.rollout_gpus, num_cpus=c.cpus_per_actor, max_restarts=c.max_restarts,
                     max_task_retries=0)(RolloutWorker)
    threads = max(1, int(c.cpus_per_actor)) if c.rollout_gpus == 0 else None
    return cls.options(name=None).remote(worker_id, section(cfg, "policy"), section(cfg, "sampler"),
                                         role_device(c.rollout_gpus), threads, lora=section(cfg, "learner").lora)


def start_learner_ranks(cfg: DictConfig, timeout_s: float = 600.0) -> tuple[list[Any], PlacementGroup]:
    """All learner ranks in one placement group (STRICT_PACK on GPUs: one node; PACK on CPU). Returns the ranks
    and the placement group (the caller removes it when done)."""
    c = cfg.cluster
    n = c.num_learner_ranks
    bundle = {"CPU": c.cpus_per_actor, **({"GPU": c.learner_gpus} if c.learner_gpus > 0 else {})}
    pg = placement_group([bundle] * n, strategy="STRICT_PACK" if c.learner_gpus > 0 else "PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"the learner's placement group ({n} x {bundle}, "
                           f"{'one node' if c.learner_gpus > 0 else 'packed'}) could not be placed within "
                           f"{timeout_s:.0f} s; the cluster has {ray.cluster_resources()} (available: "
                           f"{ray.available_resources()}): lower cluster.num_learner_ranks / learner_gpus / "
                           f"cpus_per_actor or add nodes") from None
    cls = ray.remote(num_gpus=c.learner_gpus, num_cpus=c.cpus_per_actor, max_restarts=0)(LearnerWorker)
    strategy = lambda i: PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
    probe = ray.remote(num_cpus=0)(LearnerWorker.rendezvous).options(scheduling_strategy=strategy(0))
    master_addr, master_port = ray.get(probe.remote())
    threads = max(1, int(c.cpus_per_actor)) if c.learner_gpus == 0 else None
    return [cls.options(scheduling_strategy=strategy(i)).remote(
        i, n, master_addr, master_port, section(cfg, "policy"), section(cfg, "learner"), role_device(c.learner_gpus),
        cfg.seed, threads) for i in range(n)], pg


def reward_decoder_spec(cfg: DictConfig) -> dict[str, Any]:
    """The reward actors decode codes with the policy's image decoder (MAGVIT-v2 or the shapes world)."""
    return {"factory": "policy.factory:build_decoder", "cfg": section(cfg, "policy"),
            "device": role_device(cfg.cluster.reward_gpus)}


def reward_specs(cfg: DictConfig, specs: Any) -> list[dict[str, Any]]:
    """Reward specs with the shapes-world detector bound to the policy's world (grid, colours, shapes)."""
    out = []
    for spec in plain(specs):
        spec = dict(spec)
        det = spec.get("detector")
        if isinstance(det, dict) and det.get("name") == "shapes" and len(det) == 1:
            spec["detector"] = {"name": "shapes", **(plain(cfg.policy.decoder.shapes) or {})}
        out.append(spec)
    return out


def start_reward_pool(cfg: DictConfig, specs: Any = None):
    from rewards.pool import RewardPool
    c = cfg.cluster
    return RewardPool.create(reward_specs(cfg, cfg.rewards if specs is None else specs),
                             num_actors=c.num_reward_actors, decoder=reward_decoder_spec(cfg),
                             num_gpus=c.reward_gpus, num_cpus=c.cpus_per_actor, max_restarts=c.max_restarts,
                             device=role_device(c.reward_gpus))
