"""Two data-parallel learner ranks (separate processes, gloo, DS_ACCELERATOR=cpu) make the same update as one
rank holding the whole batch: gradients are averaged through the DeepSpeed engine (the release's defect 5) and
the loss normaliser is global. Rank 0 holds one group whose rewards are all equal and are filtered out, so it
trains on nothing and only runs zero-weight passes to keep the collectives in step; rank 1 holds two groups.
In the last step rank 0 receives no group at all.

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
    from learner.testing import random_showo, sample_groups
    model = random_showo(seed=5)
    trajs, prompts = sample_groups(model, num_groups=3, group_size=3, steps=4, seed=2)
    rewards = [torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])]
    return model, trajs, rewards, prompts


def _config(stage: int):
    from learner import LearnerConfig
    return LearnerConfig(transition="candidate1", lr=1e-3, adam_eps=1e-3, warmup_steps=2, total_steps=10,
                         micro_batch_rows=5, reduction="random_k", reduction_k=3, advantage="running",
                         filter_min_std=1e-3, seed=11, zero_stage=stage,
                         extra_deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})


# Which groups each step trains, per rank. The last step leaves rank 0 without any group: it pads with passes
# over a synthetic trajectory.
SCHEDULE = {0: [[0], [0], []], 1: [[1, 2], [1, 2], [1, 2]]}


def _train(learner, groups: list[list[int]], trajs, rewards, prompts) -> list[dict]:
    return [learner.train_step([trajs[i] for i in g], [rewards[i] for i in g], [prompts[i] for i in g])
            for g in groups]


def _worker(out: Path, stage: int) -> None:
    from learner import Learner
    model, trajs, rewards, prompts = _job_data()
    rank = int(os.environ["RANK"])
    learner = Learner(model, _config(stage))
    metrics = _train(learner, SCHEDULE[rank], trajs, rewards, prompts)
    state = learner.gathered_state_dict()          # collective: every rank takes part
    ckpt = learner.save_checkpoint(out / "checkpoints")
    if rank == 0:
        torch.save(state, out / "state.pt")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "checkpoint": str(ckpt),
                                                      "tracker": learner.tracker.state_dict()}))


def _launch(out: Path, stage: int) -> None:
    from learner.dist import free_port
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
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
    from learner import Learner
    _launch(tmp_path, stage)
    two = torch.load(tmp_path / "state.pt")
    info = json.loads((tmp_path / "metrics.json").read_text())

    model, trajs, rewards, prompts = _job_data()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    one = Learner(model, _config(stage))
    metrics = _train(one, [a + b for a, b in zip(SCHEDULE[0], SCHEDULE[1])], trajs, rewards, prompts)
    ref = one.gathered_state_dict()

    assert max((ref[k] - initial[k]).abs().max().item() for k in ref) > 1e-4        # it trained
    for k, v in ref.items():
        err = (two[k] - v).abs().max().item()
        assert err <= 1e-5 * max(v.abs().max().item(), 1e-3), f"{k}: {err:.3e}"
    assert len(info["metrics"]) == len(metrics) == 3
    for i, (m2, m1) in enumerate(zip(info["metrics"], metrics)):
        assert m2["kept_groups"] == m1["kept_groups"] == 2 and m2["dropped_groups"] == (1 if i < 2 else 0)
        assert m2["rows"] == m1["rows"] == 2 * 3 * 3
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        assert m2["lr"] == m1["lr"] and m2["step"] == m1["step"]
        assert m2["micro_batches"] == m1["micro_batches"] == 6   # rank 0 ran 6 zero-weight passes
    assert info["tracker"] == json.loads(json.dumps(one.tracker.state_dict()))
    ckpt = Path(info["checkpoint"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rng_rank000.pt", "rng_rank001.pt"} <= set(manifest["files"])
    from policy.weights import read_state_dict
    saved = read_state_dict(ckpt)
    assert all(torch.equal(saved[k], two[k]) for k in two)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
