"""Advantages and filtering on hand-made reward tables."""
from __future__ import annotations

import math

import pytest
import torch

from cluster.advantages import PromptStatTracker, compute_advantages, group_advantages, top_bottom_mask
from learner import LearnerConfig
from rewards.base import RewardError


def _std(xs, unbiased=True):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


def test_group_advantages_hand_computed():
    r = [1.0, 2.0, 3.0, 4.0]
    s = _std(r)
    got = group_advantages(torch.tensor(r, dtype=torch.float64), eps=1e-4)
    assert got.tolist() == pytest.approx([(x - 2.5) / (s + 1e-4) for x in r], rel=1e-12)
    pop = group_advantages(torch.tensor(r, dtype=torch.float64), eps=1e-4, unbiased=False)
    assert pop.tolist() == pytest.approx([(x - 2.5) / (_std(r, False) + 1e-4) for x in r], rel=1e-12)


def test_all_equal_group_and_group_of_one_give_zero_advantages():
    res = compute_advantages([torch.tensor([5.0, 5.0, 5.0]), torch.tensor([2.0])], ["a", "b"], LearnerConfig())
    assert res.advantages[0].tolist() == [0.0, 0.0, 0.0]
    assert res.advantages[1].tolist() == [0.0]
    assert res.kept_groups == 2 and res.dropped_groups == 0       # no filter by default


def test_std_filter_drops_low_signal_groups_and_counts():
    rewards = [torch.tensor([5.0, 5.0, 5.0]), torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 1.001, 1.0])]
    res = compute_advantages(rewards, ["a", "b", "c"], LearnerConfig(filter_min_std=0.01))
    assert [bool(k.any()) for k in res.keep] == [False, True, False]
    assert res.counts() == {"kept_groups": 1, "dropped_groups": 2, "dropped_low_std": 2, "kept_samples": 3,
                            "dropped_samples": 6}
    assert res.group_std[1] == pytest.approx(0.5)


def test_top_bottom_k():
    r = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    assert top_bottom_mask(r, 1).tolist() == [False, True, False, False, False, True]
    assert top_bottom_mask(r, 2).tolist() == [False, True, False, True, True, True]
    assert top_bottom_mask(r, 3).all() and top_bottom_mask(r, 0).all()
    res = compute_advantages([r], ["p"], LearnerConfig(filter_top_bottom=1))
    # advantages come from the whole group, the selection only picks which samples train
    torch.testing.assert_close(res.advantages[0], group_advantages(r.double()).float())
    assert res.kept_samples == 2 and res.dropped_samples == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_names_reward_and_sample(bad):
    rewards = [torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, bad])]
    cfg = LearnerConfig(reward_name="clip_score")
    with pytest.raises(RewardError) as e:
        compute_advantages(rewards, ["a", "b"], cfg, group_ids=["g-11", "g-17"])
    msg = str(e.value)
    assert "'clip_score'" in msg and "sample 2" in msg and "group g-17" in msg


def test_reward_shape_errors():
    with pytest.raises(RewardError, match="1-D"):
        compute_advantages([torch.zeros(2, 2)], ["a"], LearnerConfig())
    with pytest.raises(ValueError, match="prompts"):
        compute_advantages([torch.zeros(2)], ["a", "b"], LearnerConfig())


def test_running_tracker_per_prompt_statistics_and_state_dict():
    cfg = LearnerConfig(advantage="running", running_buffer=5, running_min_count=2, adv_std_unbiased=False)
    tracker = PromptStatTracker(cfg.running_buffer, cfg.running_min_count, cfg.adv_eps, cfg.adv_std_unbiased)
    compute_advantages([torch.tensor([1.0, 3.0])], ["cat"], cfg, tracker)
    res = compute_advantages([torch.tensor([2.0, 6.0]), torch.tensor([7.0, 7.0])], ["cat", "dog"], cfg, tracker)
    hist = [1.0, 3.0, 2.0, 6.0]
    m, s = sum(hist) / 4, _std(hist, unbiased=False)
    assert res.advantages[0].tolist() == pytest.approx([(2 - m) / (s + 1e-4), (6 - m) / (s + 1e-4)], rel=1e-6)
    assert res.advantages[1].tolist() == [0.0, 0.0]
    # bounded history: the oldest rewards fall out
    compute_advantages([torch.tensor([10.0, 11.0])], ["cat"], cfg, tracker)
    assert list(tracker.history["cat"]) == [3.0, 2.0, 6.0, 10.0, 11.0]
    state = tracker.state_dict()
    other = PromptStatTracker()
    other.load_state_dict(state)
    assert other.state_dict() == state
    r = torch.tensor([4.0, 5.0], dtype=torch.float64)
    assert torch.equal(other.advantages("cat", r), tracker.advantages("cat", r))


def test_running_tracker_sees_the_whole_step_and_plan_update_sends_kept_groups():
    """The driver holds the one tracker: a step's groups all update it, then each is normalised by its prompt's
    history (a prompt twice in a step sees both groups). Filtered groups are not sent to the learner, and each
    group's trained steps come from (seed, step, group id) alone."""
    from cluster.advantages import plan_update
    cfg = LearnerConfig(advantage="running", filter_min_std=0.5, reduction="random_k", reduction_k=2, seed=3)
    tracker = PromptStatTracker()
    rewards = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([4.0, 6.0])]
    plan = plan_update(["t0", "t1", "t2"], rewards, ["cat", "dog", "cat"], cfg, num_steps=6, tracker=tracker,
                       group_ids=[10, 11, 12], step=4)
    h = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64)
    expected = (torch.tensor([4.0, 6.0], dtype=torch.float64) - h.mean()) / (h.std() + 1e-4)
    assert plan.result.advantages[2].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert len(tracker.history["dog"]) == 2 and len(tracker.history["cat"]) == 4
    assert [g.group_id for g in plan.groups] == [10, 12] and [g.trajectory for g in plan.groups] == ["t0", "t2"]
    assert plan.for_rank(0, 2)[0].group_id == 10 and plan.for_rank(1, 2)[0].group_id == 12
    again = plan_update(["t0", "t1", "t2"], rewards, ["cat", "dog", "cat"], cfg, 6, PromptStatTracker(),
                        [10, 11, 12], step=4)
    assert all(torch.equal(a.steps, b.steps) and a.steps.numel() == 2 for a, b in zip(plan.groups, again.groups))
    assert plan.metrics()["kept_groups"] == 2 and plan.metrics()["dropped_low_std"] == 1
