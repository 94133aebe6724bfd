"""Two data-parallel learner ranks (separate processes, gloo, DS_ACCELERATOR=cpu) make the same update as one
rank holding the whole batch: gradients are averaged through the DeepSpeed engine (the release's defect 5) and
the loss normaliser is global. The driver's plan (advantages, filtering, steps) is made once for the global batch
and split over the ranks: the group whose rewards are all equal is filtered out by the driver and never sent;
the others are spread one per rank. In the last step only one group is trained, so rank 1 receives no group at
all and only runs zero-weight passes over a synthetic trajectory to keep the collectives in step.

Run as a script, this file is one rank of that job (see `_worker`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.usefixtures("single_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _job_data():
    from benchmarks.tiny_models import random_showo, sample_groups
    model = random_showo(seed=5)
    trajs, prompts = sample_groups(model, num_groups=3, group_size=3, steps=4, seed=2)
    rewards = [torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])]
    return model, trajs, rewards, prompts


def _config(stage: int):
    from tests.updates import configs
    return configs(transition="candidate1", lr=1e-3, adam_eps=1e-3, warmup_steps=2, total_steps=10,
                         micro_batch_rows=5, selector="random_k", select_k=3, advantage="running",
                         filter_min_std=1e-3, seed=11, zero_stage=stage,
                         extra_deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})


# The global batch of each step (group indices). The last one holds a single group: rank 1 gets none.
STEPS = [[0, 1, 2], [0, 1, 2], [1]]


def _train(learner, rank: int, num_ranks: int, trajs, rewards, prompts) -> tuple[list[dict], list]:
    """Every step's UpdateStats of this rank (as dicts), and the driver-side tracker state at the end."""
    from tests.updates import Planner
    planner, stats = Planner(learner.algorithm), []
    for batch in STEPS:
        plan = planner.plan([trajs[i] for i in batch], [rewards[i] for i in batch], [prompts[i] for i in batch])
        stats.append({**learner.train_step(plan.for_rank(rank, num_ranks)).to_dict(), **plan.metrics()})
    return stats, planner.tracker.state_dict()


def _worker(out: Path, stage: int) -> None:
    from learner import Learner
    model, trajs, rewards, prompts = _job_data()
    rank = int(os.environ["RANK"])
    learner = Learner(model, *_config(stage))
    stats, tracker = _train(learner, rank, 2, trajs, rewards, prompts)
    state = learner.gathered_state_dict()          # collective: every rank takes part
    ckpt = learner.save_checkpoint(out / "checkpoints")
    (out / f"stats{rank}.json").write_text(json.dumps(stats))
    # every rank restores its own engine state (safetensors + JSON), and the next update is the same bit for bit
    fresh = Learner(_job_data()[0], *_config(stage))
    fresh.resume(ckpt)
    assert fresh.step == learner.step
    from tests.updates import Planner
    plan = Planner(learner.algorithm).plan([trajs[i] for i in STEPS[0]], [rewards[i] for i in STEPS[0]],
                                        [prompts[i] for i in STEPS[0]])
    for one in (learner, fresh):
        one.train_step(plan.for_rank(rank, 2))
    after, resumed = learner.gathered_state_dict(), fresh.gathered_state_dict()
    assert all(torch.equal(after[k], resumed[k]) for k in after), "the resumed ranks made another update"
    if rank == 0:
        torch.save(state, out / "state.pt")
        (out / "info.json").write_text(json.dumps({"checkpoint": str(ckpt), "tracker": tracker}))
    from learner.dist import leave_process_group
    leave_process_group()      # not at interpreter exit, where gloo's teardown can abort a rank (CI saw SIGABRT)


def _launch(out: Path, stage: int) -> None:
    from learner.dist import free_port
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out), str(stage)], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-6000:]}"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_match_one_rank(tmp_path, stage):
    from learner import Learner, UpdateStats
    _launch(tmp_path, stage)
    two = torch.load(tmp_path / "state.pt")
    info = json.loads((tmp_path / "info.json").read_text())
    per_rank = [json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(2)]
    fields = set(UpdateStats.__dataclass_fields__)
    merged = [{**per_rank[0][i], **UpdateStats.merge([UpdateStats(**{k: v for k, v in r[i].items() if k in fields})
                                                       for r in per_rank]).metrics()} for i in range(len(STEPS))]

    model, trajs, rewards, prompts = _job_data()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    one = Learner(model, *_config(stage))
    stats, tracker = _train(one, 0, 1, trajs, rewards, prompts)
    metrics = [{**m, **UpdateStats(**{k: v for k, v in m.items() if k in fields}).metrics()} for m in stats]
    ref = one.gathered_state_dict()

    assert max((ref[k] - initial[k]).abs().max().item() for k in ref) > 1e-4        # it trained
    for k, v in ref.items():
        err = (two[k] - v).abs().max().item()
        assert err <= 1e-5 * max(v.abs().max().item(), 1e-3), f"{k}: {err:.3e}"
    assert len(merged) == len(metrics) == 3
    for i, (m2, m1) in enumerate(zip(merged, metrics)):
        kept = 2 if i < 2 else 1
        assert m2["kept_groups"] == m1["kept_groups"] == kept and m2["dropped_groups"] == (1 if i < 2 else 0)
        assert m2["rows"] == m1["rows"] == kept * 3 * 3
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        assert m2["lr"] == m1["lr"] and m2["version"] == m1["version"] == i + 1
    assert per_rank[1][2]["rows"] == 0 and per_rank[1][2]["micro_batches"] == per_rank[0][2]["micro_batches"] > 0
    assert info["tracker"] == json.loads(json.dumps(tracker))
    ckpt = Path(info["checkpoint"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"engine/rank000.json", "engine/rank001.json", "engine/rank000.safetensors",
                                         "engine/rank001.safetensors"} <= set(manifest["files"])
    assert not [f for f in manifest["files"] if not f.endswith((".json", ".safetensors"))]   # data only
    from policy.weights import read_state_dict
    saved = read_state_dict(ckpt)
    assert all(torch.equal(saved[k], two[k]) for k in two)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
