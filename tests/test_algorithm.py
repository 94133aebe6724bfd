"""The algorithm layer on hand-made inputs: advantage estimators (group, running, per-depth in trees), filters,
step selectors (fixed and informed), the plan's per-(sample, step) rows, and every transition definition existing
once (the sampler's record, the learner's score and the term count all come from its terms)."""
from __future__ import annotations

import math

import pytest
import torch

from algorithm.advantages import GroupOutcome, normalised
from algorithm.advantages.running import PromptStatTracker
from algorithm.advantages.tree import tree_credit
from algorithm.config import AlgorithmConfig
from algorithm.plan import Planner, top_bottom_mask
from algorithm.tree import TreeSpec
from rewards.base import RewardError


def _std(xs, unbiased=True):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


def _outcomes(rewards, prompts=None, steps=6, ids=None, tree=None, signals=None):
    prompts = prompts or [f"p{i}" for i in range(len(rewards))]
    ids = ids if ids is not None else list(range(len(rewards)))
    return [GroupOutcome(gid, p, torch.as_tensor(r), steps, tree, s)
            for gid, p, r, s in zip(ids, prompts, rewards, signals or [None] * len(rewards))]


def _plan(config, rewards, step=0, **kw):
    outcomes = _outcomes(rewards, **kw)
    return Planner(config).plan(outcomes, [f"t{o.group_id}" for o in outcomes], step)


# ----- estimators -------------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    r = [1.0, 2.0, 3.0, 4.0]
    s = _std(r)
    got = normalised(torch.tensor(r, dtype=torch.float64), eps=1e-4)
    assert got.tolist() == pytest.approx([(x - 2.5) / (s + 1e-4) for x in r], rel=1e-12)
    pop = normalised(torch.tensor(r, dtype=torch.float64), eps=1e-4, unbiased=False)
    assert pop.tolist() == pytest.approx([(x - 2.5) / (_std(r, False) + 1e-4) for x in r], rel=1e-12)
    plan = _plan(AlgorithmConfig(), [r])
    torch.testing.assert_close(plan.groups[0].advantages, got.float())
    assert plan.groups[0].train.all() and plan.groups[0].train.shape == (4, 6)     # every row by default


def test_all_equal_group_and_group_of_one_give_zero_advantages():
    plan = _plan(AlgorithmConfig(), [[5.0, 5.0, 5.0], [2.0]])
    assert plan.groups[0].advantages.tolist() == [0.0, 0.0, 0.0] and plan.groups[1].advantages.tolist() == [0.0]
    assert plan.counts["kept_groups"] == 2 and plan.counts["dropped_groups"] == 0       # no filter by default


def test_std_filter_drops_low_signal_groups_and_counts():
    plan = _plan(AlgorithmConfig(filter_min_std=0.01), [[5.0, 5.0, 5.0], [0.0, 1.0, 0.5], [1.0, 1.001, 1.0]])
    assert [g.group_id for g in plan.groups] == [1]
    assert plan.counts == {"kept_groups": 1, "dropped_groups": 2, "dropped_low_std": 2, "kept_samples": 3,
                           "dropped_samples": 6}
    assert plan.credits[1].std == pytest.approx(0.5)


def test_top_bottom_k():
    r = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    assert top_bottom_mask(r, 1).tolist() == [False, True, False, False, False, True]
    assert top_bottom_mask(r, 2).tolist() == [False, True, False, True, True, True]
    assert top_bottom_mask(r, 3).all() and top_bottom_mask(r, 0).all()
    plan = _plan(AlgorithmConfig(filter_top_bottom=1), [r])
    # advantages come from the whole group, the selection only picks which samples train
    torch.testing.assert_close(plan.groups[0].advantages, normalised(r.double()).float())
    assert plan.groups[0].train.any(1).tolist() == top_bottom_mask(r, 1).tolist()
    assert plan.counts["kept_samples"] == 2 and plan.counts["dropped_samples"] == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_names_reward_and_sample(bad):
    with pytest.raises(RewardError) as e:
        _plan(AlgorithmConfig(reward_name="clip_score"), [[0.1, 0.2], [0.3, 0.4, bad]], ids=[11, 17])
    msg = str(e.value)
    assert "'clip_score'" in msg and "sample 2" in msg and "group 17" in msg


def test_reward_shape_errors():
    with pytest.raises(RewardError, match="1-D"):
        _plan(AlgorithmConfig(), [torch.zeros(2, 2)])


def test_running_tracker_per_prompt_statistics_and_state_dict():
    cfg = AlgorithmConfig(advantage="running", running_buffer=5, running_min_count=2, adv_std_unbiased=False)
    planner = Planner(cfg)
    planner.plan(_outcomes([[1.0, 3.0]], ["cat"]), ["t"])
    plan = planner.plan(_outcomes([[2.0, 6.0], [7.0, 7.0]], ["cat", "dog"]), ["t", "t"])
    hist = [1.0, 3.0, 2.0, 6.0]
    m, s = sum(hist) / 4, _std(hist, unbiased=False)
    assert plan.groups[0].advantages.tolist() == pytest.approx([(2 - m) / (s + 1e-4), (6 - m) / (s + 1e-4)], rel=1e-6)
    assert plan.groups[1].advantages.tolist() == [0.0, 0.0]
    planner.plan(_outcomes([[10.0, 11.0]], ["cat"]), ["t"])                 # bounded history: the oldest fall out
    tracker = planner.estimator.tracker
    assert list(tracker.history["cat"]) == [3.0, 2.0, 6.0, 10.0, 11.0]
    state = planner.state_dict()
    other = Planner(cfg)
    other.load_state_dict(state)
    assert other.state_dict() == state
    r = torch.tensor([4.0, 5.0], dtype=torch.float64)
    assert torch.equal(other.estimator.tracker.advantages("cat", r), tracker.advantages("cat", r))
    assert isinstance(tracker, PromptStatTracker)


def test_running_tracker_sees_the_whole_step_and_the_plan_sends_kept_groups():
    """The driver holds the one tracker: a step's groups all update it, then each is normalised by its prompt's
    history (a prompt twice in a step sees both groups). Filtered groups are not sent to the learner, and each
    group's trained steps come from (seed, step, group id) alone."""
    cfg = AlgorithmConfig(advantage="running", filter_min_std=0.5, selector="random_k", select_k=2, seed=3)
    planner = Planner(cfg)
    rewards = [[0.0, 2.0], [1.0, 1.0], [4.0, 6.0]]
    plan = planner.plan(_outcomes(rewards, ["cat", "dog", "cat"], ids=[10, 11, 12]), ["t0", "t1", "t2"], step=4)
    h = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64)
    expected = (torch.tensor([4.0, 6.0], dtype=torch.float64) - h.mean()) / (h.std() + 1e-4)
    assert plan.groups[1].advantages.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    tracker = planner.estimator.tracker
    assert len(tracker.history["dog"]) == 2 and len(tracker.history["cat"]) == 4
    assert [g.group_id for g in plan.groups] == [10, 12] and [g.trajectory for g in plan.groups] == ["t0", "t2"]
    assert plan.for_rank(0, 2)[0].group_id == 10 and plan.for_rank(1, 2)[0].group_id == 12
    again = Planner(cfg).plan(_outcomes(rewards, ["cat", "dog", "cat"], ids=[10, 11, 12]), ["t0", "t1", "t2"], step=4)
    for a, b in zip(plan.groups, again.groups):
        assert torch.equal(a.train, b.train) and a.train.sum(1).tolist() == [2, 2]
        assert (a.train == a.train[0]).all()                  # the same steps for every sample of the group
    assert plan.metrics()["kept_groups"] == 2 and plan.metrics()["dropped_low_std"] == 1


# ----- selectors ------------------------------------------------------------------------------------------------
def test_fixed_selectors_pick_their_steps():
    r = [[0.0, 1.0]]
    steps = lambda cfg: _plan(cfg, r, steps=8).groups[0].train[0].nonzero().flatten().tolist()   # noqa: E731
    assert steps(AlgorithmConfig(selector="first_k", select_k=3)) == [0, 1, 2]
    assert steps(AlgorithmConfig(selector="every_n", select_n=3)) == [0, 3, 6]
    assert steps(AlgorithmConfig(selector="after_branch", select_k=2)) == [0, 1]      # no tree: branch at step 0
    assert len(steps(AlgorithmConfig(selector="random_k", select_k=5))) == 5
    assert steps(AlgorithmConfig(selector="all")) == list(range(8))


def test_informed_selectors_read_the_samplers_per_step_signal():
    """entropy: each sample's steps of highest entropy (lowest self-certainty); certainty_change: where the
    certainty moved most from the step before. Per sample, from the signal the sampler recorded."""
    certainty = torch.tensor([[-3.0, -1.0, -2.5, -0.1, -0.2, 0.0],
                              [-0.5, -4.0, -0.1, -3.5, -0.1, 0.0]])
    signals = [{"self_certainty": certainty}]
    plan = _plan(AlgorithmConfig(selector="entropy", select_k=2), [[0.0, 1.0]], signals=signals)
    assert [row.nonzero().flatten().tolist() for row in plan.groups[0].train] == [[0, 2], [1, 3]]
    plan = _plan(AlgorithmConfig(selector="certainty_change", select_k=2), [[0.0, 1.0]], signals=signals)
    # row 0 changes: 0, 2, 1.5, 2.4, 0.1, 0.2 -> steps 1 and 3; row 1: 0, 3.5, 3.9, 3.4, 3.4, 0.1 -> 1 and 2
    assert [row.nonzero().flatten().tolist() for row in plan.groups[0].train] == [[1, 3], [1, 2]]
    with pytest.raises(ValueError, match="self-certainty"):
        _plan(AlgorithmConfig(selector="entropy"), [[0.0, 1.0]])


# ----- trees -----------------------------------------------------------------------------------------------------
def test_tree_spec_nodes_segments_and_seeds():
    tree = TreeSpec((2, 5), (2, 3))
    assert tree.leaves == 6 and tree.num_nodes == 1 + 2 + 6 and tree.depth == 2
    assert [tree.segment(d, 8) for d in range(3)] == [(0, 2), (2, 5), (5, 8)]
    assert [tree.ancestor(g, 1) for g in range(6)] == [0, 0, 0, 1, 1, 1]
    seeds = list(range(100, 109))
    assert tree.node_seeds(seeds, 0) == [100] and tree.node_seeds(seeds, 1) == [101, 102]
    assert tree.node_seeds(seeds, 2) == [103, 104, 105, 106, 107, 108]
    with pytest.raises(ValueError, match="leaves"):
        tree.check(8, 4)
    with pytest.raises(ValueError, match="increase"):
        TreeSpec((3, 3), (2, 2))


def test_per_depth_advantages_on_a_hand_made_tree():
    """Branches (2, then 2) at steps 1 and 3 of 5: leaves 0-1 below node A, 2-3 below node B. A node's credit is its
    leaves' mean against its siblings'; it goes to its own steps, on its first leaf only; the root's steps carry no
    credit."""
    tree = TreeSpec((1, 3), (2, 2))
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, owner = tree_credit(rewards, tree, num_steps=5, eps=1e-12)
    s2 = _std([0.5, 0.0])                                                     # two siblings, unbiased std
    a, b = (0.5 - 0.25) / s2, (0.0 - 0.25) / s2                               # nodes A and B (depth 1)
    leaf = (1.0 - 0.5) / _std([1.0, 0.0])                                     # leaves 0, 1 against each other
    expected = torch.zeros(4, 5)
    expected[0, 1:3], expected[2, 1:3] = a, b                                 # depth 1 owns steps 1, 2
    expected[0, 3:], expected[1, 3:] = leaf, -leaf                           # depth 2 (leaves) own steps 3, 4
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    assert owner[:, 0].sum() == 0                                             # the shared root prefix: not trained
    assert owner.tolist() == [[False, True, True, True, True], [False, False, False, True, True],
                              [False, True, True, True, True], [False, False, False, True, True]]
    # leaves 2 and 3 tie: zero advantage, still their rows (a tie is a signal of nothing, not an absent node)
    cfg = AlgorithmConfig(advantage="tree", adv_eps=1e-12, tree={"branch_steps": [1, 3], "factors": [2, 2]})
    plan = _plan(cfg, [rewards], steps=5, tree=tree)
    assert torch.equal(plan.groups[0].train, owner)
    torch.testing.assert_close(plan.groups[0].advantages, expected, atol=1e-6, rtol=1e-6)


def test_one_branch_tree_is_grpo_on_the_steps_after_the_branch():
    tree = TreeSpec((4,), (4,))
    r = torch.tensor([0.0, 1.0, 0.5, 0.2], dtype=torch.float64)
    adv, owner = tree_credit(r, tree, num_steps=8)
    assert (owner[:, :4] == 0).all() and owner[:, 4:].all()
    torch.testing.assert_close(adv[:, 4:], normalised(r).float().view(-1, 1).expand(4, 4))
    cfg = AlgorithmConfig(advantage="tree", selector="after_branch", select_k=2,
                          tree={"branch_steps": [4], "factors": [4]})
    train = _plan(cfg, [r], steps=8, tree=tree).groups[0].train
    assert train.sum(0).tolist() == [0, 0, 0, 0, 4, 4, 0, 0]                 # Flow-GRPO-Fast: 2 steps after it


def test_config_checks_the_algorithm_names_and_the_tree():
    with pytest.raises(ValueError, match=r"algorithm.selector='entropyy'.*choose one of \[.*'entropy'"):
        AlgorithmConfig(selector="entropyy")
    with pytest.raises(ValueError, match="algorithm.advantage=tree"):
        AlgorithmConfig(tree={"branch_steps": [2], "factors": [4]})
    from cluster.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="learner.reduction -> algorithm.selector"):
        load_config(None, ["learner.reduction=all"])
    with pytest.raises(ConfigError, match="6 leaves, not data.group_size=4"):
        load_config("configs/tiny.yaml", ["algorithm.advantage=tree", "algorithm.tree.branch_steps=[2]",
                                          "algorithm.tree.factors=[6]"])
