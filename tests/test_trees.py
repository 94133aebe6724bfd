"""Group trees and sampler state (issue 30): a shared prefix is evaluated once and its branches continue exactly
from its state; a run's samples do not depend on how many rollout workers sample them; the compute counters of a
tiny run equal the count from the config's shapes (configs/tiny.yaml, seed 0, local backend)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from algorithm.tree import TreeSpec
from benchmarks.tiny_models import random_showo
from cluster.config import load_config
from policy.sampler import SamplerConfig, UnmaskingSampler

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
pytestmark = pytest.mark.usefixtures("single_torch_thread")


class CountingModel:
    """Counts the rows of every logits call of a model (a forward over image positions)."""

    def __init__(self, model):
        self.model, self.rows = model, []
        inner = model.logits

        def counted(context, codes, steps, num_steps):
            self.rows.append(codes.shape[0])
            return inner(context, codes, steps, num_steps)
        model.logits = counted


def test_a_shared_prefix_is_evaluated_once_and_branches_continue_from_its_state():
    model = random_showo(seed=2).eval()
    counter = CountingModel(model)
    cfg = SamplerConfig(steps=6)
    sampler = UnmaskingSampler(model, cfg)
    cond = {"ids": model.layout.text_area([[1, 2, 3], [7, 8]])}
    tree = TreeSpec((2, 4), (2, 3))                            # 2 prompts: root, 2 children, 6 leaves each
    seeds = list(range(100, 100 + 2 * tree.num_nodes))
    traj = sampler.sample(cond, seeds, group_size=6, tree=tree)
    # one row per prompt for steps 0-1, 2 rows per prompt for 2-3, 6 for 4-5: the prefix is computed once
    assert counter.rows == [2, 2, 4, 4, 12, 12] and traj.meta["rollout_tokens"] == 16 * sum(counter.rows)
    assert traj.batch_size == 12 and (traj.unmask_step < 6).all()
    # the leaves below a node share its steps exactly; siblings differ after their branch
    for a, b, until in ((0, 1, 4), (0, 3, 2)):
        assert torch.equal(traj.sampled_codes[a, :until], traj.sampled_codes[b, :until])
        assert torch.equal(traj.token_logprob[a, :until], traj.token_logprob[b, :until])
    # state in and out: the root handed back at step 2, branched and continued by hand is the same tree
    counter.rows.clear()
    per = [seeds[:tree.num_nodes], seeds[tree.num_nodes:]]
    state = sampler.run(sampler.start(cond, [s[0] for s in per]), until=2)
    state = sampler.run(state.branch(2, [x for s in per for x in tree.node_seeds(s, 1)]), until=4)
    state = sampler.run(state.branch(3, [x for s in per for x in tree.node_seeds(s, 2)]))
    again = sampler.finish(state)
    for f in ("final_codes", "sampled_codes", "token_logprob", "remask_logprob", "threshold", "unmask_step"):
        assert torch.equal(getattr(again, f), getattr(traj, f)), f
    # a leaf continued alone from the shared state equals its row of the batched tree
    state = sampler.run(sampler.start({"ids": cond["ids"][:1]}, [per[0][0]]), until=2)
    state = sampler.run(state.branch(1, [per[0][2]]), until=4)                  # the root's second child
    alone = sampler.finish(sampler.run(state.branch(1, [per[0][3 + 3]])))       # that child's first leaf
    assert torch.equal(alone.final_codes[0], traj.final_codes[3])


def test_a_one_level_tree_branching_at_step_0_is_the_plain_group():
    model = random_showo(seed=2).eval()
    sampler = UnmaskingSampler(model, SamplerConfig(steps=5))
    cond = {"ids": model.layout.text_area([[4, 5]])}
    plain = sampler.sample(cond, [11, 12, 13], group_size=3)
    tree = sampler.sample(cond, [99, 11, 12, 13], group_size=3, tree=TreeSpec((0,), (3,)))
    assert torch.equal(plain.final_codes, tree.final_codes) and torch.equal(plain.token_logprob, tree.token_logprob)


def _run(out: Path, *overrides: str) -> list[dict]:
    from cluster.train import train
    train(load_config(TINY, [f"output_dir={out}", "cluster.backend=local", "max_steps=2", "eval.at_start=false",
                             "learner.warmup_steps=0", "learner.lr=1e-3", *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TREE = ["algorithm.advantage=tree", "algorithm.tree.branch_steps=[2]", "algorithm.tree.factors=[4]",
        "algorithm.selector=after_branch", "algorithm.select_k=2"]


@pytest.mark.slow
def test_trees_sample_the_same_with_one_and_three_workers_and_count_their_compute(tmp_path):
    """configs/tiny.yaml (2 prompts x 4 samples, 6 steps, 16 image tokens) with a tree branching at step 2 and the
    2 steps after it trained: the same seeds give the same samples, rewards and update on 1 and 3 rollout workers
    (a tree stays on one worker), and the counters are the shapes' arithmetic."""
    one = _run(tmp_path / "one", *TREE)
    three = _run(tmp_path / "three", *TREE, "cluster.num_rollout_workers=3")
    for key in ("reward_mean", "reward_std", "loss", "learner/grad_norm", "rollout_tokens", "learner_tokens"):
        assert [r[key] for r in one] == [r[key] for r in three], key
    p, g, t, n, k = 2, 4, 6, 16, 2
    for r in one:
        assert r["rollout_tokens"] == p * (k * 1 + (t - k) * g) * n          # the prefix once, then 4 branches
        assert r["learner_tokens"] == p * g * 2 * n == r["learner/rows"] * n   # each leaf's 2 steps after the branch
        assert r["compute_tokens"] == r["rollout_tokens"] + 3 * r["learner_tokens"]
    plain = _run(tmp_path / "plain")                                          # the paper's group, every step
    assert all(r["rollout_tokens"] == p * g * t * n and r["learner_tokens"] == p * g * t * n for r in plain)


def test_the_efficient_config_is_the_frontiers_best_recipe_at_under_40_percent_of_the_default_compute():
    """configs/efficient.yaml is the default run plus the frontier's row (configs/efficiency.yaml), and by the configs'
    shapes (image-token positions per step: the tree's rollout P·(k + G·(T − k))·N, the learner's trained rows × N,
    compute = rollout + 3 × learner) it costs 38 % of the default's."""
    from omegaconf import OmegaConf
    default = load_config(str(REPO / "configs" / "default.yaml"), [])
    efficient = load_config(str(REPO / "configs" / "efficient.yaml"), [])
    row = OmegaConf.load(REPO / "configs" / "efficiency.yaml").variants["G 8, tree at 2, every step after, lr 6e-4"]
    assert OmegaConf.to_container(load_config(str(REPO / "configs" / "default.yaml"), list(row)).algorithm) == \
        OmegaConf.to_container(efficient.algorithm)
    assert efficient.learner.lr == 6.0e-4 and efficient.data.group_size == 8

    def compute(cfg):
        P, G, T = cfg.data.prompts_per_step, cfg.data.group_size, cfg.sampler.steps
        N = cfg.world.grid_size ** 2
        k = cfg.algorithm.tree.branch_steps[0] if cfg.algorithm.tree.branch_steps else 0
        trained = {"all": T - k, "after_branch": min(T - k, cfg.algorithm.select_k)}[cfg.algorithm.selector]
        return P * (k + G * (T - k)) * N + 3 * P * G * trained * N
    assert compute(default) == 65536                   # the default run's compute_tokens per step (metrics.jsonl)
    assert compute(efficient) / compute(default) == pytest.approx(24832 / 65536) and 24832 / 65536 < 0.40
