"""Overlapping the roles: rewards that stream (scored as each worker's groups arrive, paired with their
trajectories, each group trained once under staleness 1 and 2), the weight-sync path choice (NCCL, CUDA IPC on a
shared GPU, object store), and the run's timeline (Chrome trace, busy shares)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from actors.weight_sync import DeviceLocation, SyncPath, choose_sync_path
from cluster.config import load_config
from cluster.timeline import Timeline, plot_timelines

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PPS = 2


# ---------------------------------------------------------------------------------------------- sync path choice

def test_sync_path_choice():
    cpu, gpu = DeviceLocation("n1"), DeviceLocation("n1", ("GPU-a",))
    path, backend, why = choose_sync_path("collective", cpu, {0: cpu, 1: cpu})
    assert (path, backend) == (SyncPath.collective, "gloo")
    # a worker on the learner's own GPU (one-GPU placement): CUDA IPC, never NCCL (it cannot pair one GPU)
    path, backend, why = choose_sync_path("collective", gpu, {0: DeviceLocation("n1", ("GPU-a",))})
    assert path == SyncPath.cuda_ipc and "GPU-a" in why
    # every worker on its own GPU: NCCL; the same UUID on another node is another GPU
    path, backend, _ = choose_sync_path("collective", gpu, {0: DeviceLocation("n1", ("GPU-b",)),
                                                            1: DeviceLocation("n2", ("GPU-a",))})
    assert (path, backend) == (SyncPath.collective, "nccl")
    # mixed: one shares the learner's GPU, one does not: the object store for all, and it says why
    path, _, why = choose_sync_path("collective", gpu, {0: DeviceLocation("n1", ("GPU-a",)),
                                                        1: DeviceLocation("n1", ("GPU-b",))})
    assert path == SyncPath.object_store and "[0]" in why
    # a CPU worker with a GPU learner: gloo; the object store when configured
    assert choose_sync_path("collective", gpu, {0: cpu})[:2] == (SyncPath.collective, "gloo")
    assert choose_sync_path("object_store", gpu, {0: DeviceLocation("n1", ("GPU-a",))})[0] == SyncPath.object_store


def test_one_gpu_config_places_every_role_on_one_gpu():
    cfg = load_config(REPO / "configs" / "one_gpu.yaml")
    c = cfg.cluster
    assert cfg.device == "cuda" and c.rollout_gpus > 0 and c.learner_gpus > 0 and c.reward_gpus > 0
    assert c.num_rollout_workers * c.rollout_gpus + c.num_reward_actors * c.reward_gpus + \
        c.num_learner_ranks * c.learner_gpus <= 1.0
    assert cfg.max_steps == load_config(REPO / "configs" / "default.yaml").max_steps   # the default run otherwise


# ---------------------------------------------------------------------------------------------- timeline

def test_timeline_busy_share_and_chrome_trace(tmp_path):
    tl = Timeline(tmp_path / "timeline.json")
    tl.add("rollout", "worker 0", "rollout step 0", 0.0, 4.0)
    tl.add("rollout", "worker 1", "rollout step 0", 2.0, 6.0)       # overlaps worker 0: union 0..6
    tl.add("reward", "actors", "score step 0", 4.0, 5.0)
    tl.add("reward", "actors", "score step 0", 4.0, 5.0)            # the same call reported by two groups
    tl.add("learner", "ranks", "update 0", 6.0, 9.0)
    tl.add("weight_sync", "learner -> workers", "sync v1", 9.0, 10.0)
    share = tl.busy_share()
    assert share["rollout"] == pytest.approx(0.6) and share["reward"] == pytest.approx(0.1)
    assert share["learner"] == pytest.approx(0.3) and share["weight_sync"] == pytest.approx(0.1)
    assert share["driver"] == 0.0
    path = tl.write()
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 5 and {e["cat"] for e in spans} == {"rollout", "reward", "learner", "weight_sync"}
    update = next(e for e in spans if e["name"] == "update 0")
    assert (update["ts"], update["dur"]) == (6_000_000, 3_000_000)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"worker 0", "worker 1", "actors", "ranks", "learner -> workers"}
    png = plot_timelines({"sync": trace, "async": trace}, tmp_path / "t.png")
    assert png.stat().st_size > 5000


# ---------------------------------------------------------------------------------------------- streaming (Ray)

@pytest.mark.integration
def test_reward_calls_run_as_their_trajectories_arrive(local_ray):
    """A reward call submitted first but waiting on a slow rollout does not hold back one submitted later whose
    rollout is done: each worker's groups are scored as they arrive."""
    ray = local_ray
    from cluster.backend import RayBackend
    from cluster.reward_group import RewardGroup

    @ray.remote
    def rollout(delay: float):
        time.sleep(delay)
        from policy.trajectory import Trajectory
        n = 16
        return Trajectory(condition={"ids": torch.zeros(2, 4, dtype=torch.long)}, null_condition={},
                          unmask_step=torch.zeros(2, n, dtype=torch.long), sampled_codes=torch.zeros(2, 1, n, dtype=torch.long),
                          token_logprob=torch.zeros(2, 1, n), remask_logprob=torch.zeros(2, 1, n),
                          threshold=torch.zeros(2, 1), final_codes=torch.zeros(2, n, dtype=torch.long))

    pool = RewardGroup.create(RayBackend(), [{"name": "tests.helpers.rewards:ConstantReward", "value": 1.0}], num_actors=1,
                             decoder={"factory": "worlds.shapes.codebook:make_decoder", "image_size": 16,
                                      "grid_size": 4}, num_cpus=1)
    try:
        items = [{"prompts": ["a", "a"]}]
        slow = pool.submit(items, [rollout.remote(8.0)])
        fast = pool.submit(items, [rollout.remote(0.0)])
        t_fast = pool.result(fast)[0].span
        t_slow = pool.result(slow)[0].span
        assert t_fast[1] <= t_slow[0], (t_fast, t_slow)        # the later call ran first
        assert pool.result(fast)[0].rewards.tolist() == [1.0, 1.0]
    finally:
        pool.shutdown()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("staleness", [1, 2])
def test_streamed_rewards_are_paired_and_each_group_trained_once(local_ray, tmp_path, staleness):
    """Under staleness 1 and 2 with two rollout workers: every step trains exactly its own groups, once; each
    group's reward is the reward of its own trajectory (re-scored here from the trajectory); staleness stays
    within the bound; the learner's updates are recorded in the timeline alongside rollouts and rewards."""
    ray = local_ray
    from cluster.driver import Trainer
    from cluster.config import reward_specs
    from cluster.reward_group import decoder_spec
    from rewards.worker import RewardWorker
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "cluster.num_rollout_workers=2", "max_steps=6",
                             f"cluster.max_staleness={staleness}", "learner.lr=1e-3", "logging.progress=false"])
    scorer = RewardWorker(reward_specs(cfg, cfg.rewards), decoder=decoder_spec(cfg), device="cpu")
    tr = Trainer(cfg)
    try:
        tr.sync_weights()
        trained: list[int] = []
        for step in range(cfg.max_steps):
            rec = tr.train_step().to_json()
            ids = [g.meta.group_id for g in tr.last_groups]
            assert ids == [step * PPS + k for k in range(PPS)]
            trained += ids
            assert 0 <= rec["staleness_max"] <= staleness
            for g in tr.last_groups:
                traj = ray.get(g.trajectory)
                assert traj.meta["group_id"] == g.meta.group_id and traj.meta["prompt"] == g.meta.prompt
                again = scorer.score_groups([{"codes": traj.final_codes, "prompts": [g.meta.prompt] * 4,
                                              "metadata": [g.meta.metadata] * 4}])[0].rewards
                assert torch.equal(again, g.scores.rewards), g.meta.group_id
        assert trained == list(range(cfg.max_steps * PPS)) and tr.counters["groups_trained"] == len(trained)
        assert not tr.inflight                          # nothing launched beyond the last step
        roles = {s.role for s in tr.timeline.spans}
        assert {"rollout", "reward", "learner", "weight_sync"} <= roles
        lanes = {s.lane for s in tr.timeline.spans if s.role == "rollout"}
        assert lanes == {"worker 0", "worker 1"}
        # one lane per actor in every role: reward actors by index (their process ids), learner ranks by rank
        assert {s.lane for s in tr.timeline.spans if s.role == "reward"} <= {f"actor {i}" for i in range(len(tr.rewards.actors))}
        assert {s.lane for s in tr.timeline.spans if s.role == "learner"} == {"rank 0"}
        # the next step's rollouts do not wait for this step's update: they start before it ends
        for k in range(cfg.max_steps - 1):
            update = next(s for s in tr.timeline.spans if s.name == f"update {k}")
            nxt = min(s.start for s in tr.timeline.spans if s.name == f"rollout step {k + 1}")
            assert nxt < update.end, k
    finally:
        tr.shutdown()
