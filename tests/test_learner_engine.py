"""The DeepSpeed learner on one rank: ZeRO stages agree, checkpoints resume bit for bit and survive crashes,
weights export in buckets, the NaN guard, and a few steps move log-probs the right way."""
from __future__ import annotations

import json
import math

import pytest
import torch

from algorithm.transitions import behaviour_logprob, policy_step_logprobs
from learner import Learner, NonFiniteUpdateError, apply_weight_bucket, latest_checkpoint
from benchmarks.tiny_models import random_showo, sample_groups
from tests.helpers.learner import fixed_batch, model_with
from policy.showo import Showo
from policy.weights import CheckpointError
from rewards.base import RewardError
from tests.updates import Planner, configs


pytestmark = pytest.mark.usefixtures("single_torch_thread")

Z3_SMALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}   # really partition the tiny model


@pytest.fixture(scope="module")
def data():
    """A fixed batch: 2 groups × 3 rollouts × 4 steps from a tiny random Show-o, with fixed rewards."""
    return fixed_batch()


def _model(data) -> Showo:
    return model_with(data[0])


def _config(**kw):
    base = dict(transition="candidate1", lr=1e-3, warmup_steps=2, total_steps=10, micro_batch_rows=5,
                selector="random_k", select_k=3, advantage="running", seed=11)
    base.update(kw)
    return configs(**base)


def _state(learner: Learner) -> dict[str, torch.Tensor]:
    return learner.gathered_state_dict()


def _assert_close(got: dict, expected: dict, rel: float = 1e-5) -> None:
    for k, v in expected.items():
        err = (got[k].float() - v.float()).abs().max().item()
        assert err <= rel * max(v.abs().max().item(), 1e-3), f"{k}: {err:.3e}"


# ----- ZeRO stages ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_stages_0_2_3_give_the_same_update(data):
    _, trajs, rewards, prompts = data
    results = {}
    for stage in (0, 2, 3):
        # adam_eps 1e-3: Adam would blow the ~1e-10 float noise of exactly-zero gradients (e.g. the key
        # LayerNorm bias, which softmax ignores) up to ±lr, hiding real differences between the stages.
        config = _config(zero_stage=stage, adam_eps=1e-3, extra_deepspeed=Z3_SMALL if stage == 3 else {})
        learner, planner = Learner(_model(data), *config), Planner(config)
        plan = planner.plan(trajs, rewards, prompts)
        state = learner.accumulate_gradients(plan.groups)
        grads = learner.full_gradients()
        metrics = [{**learner.apply_update(state).metrics(), **plan.metrics()},
                   planner.train(learner, trajs, rewards, prompts)]
        buckets = list(learner.iter_weight_buckets(bucket_bytes=40_000))
        results[stage] = (_state(learner), metrics, buckets, grads)
    ref_state, ref_metrics, ref_buckets, ref_grads = results[0]
    init = data[0]
    assert max((ref_state[k] - init[k]).abs().max().item() for k in init) > 1e-4     # it did train
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for stage in (2, 3):
        state, metrics, buckets, grads = results[stage]
        assert set(grads) == set(ref_grads)
        for k, g in ref_grads.items():
            assert (grads[k] - g).abs().max().item() <= 1e-5 * scale, k
        _assert_close(state, ref_state)
        for a, b in zip(metrics, ref_metrics):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)   # ≈ 0: cancellation noise
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["lr"] == b["lr"] and a["version"] == b["version"]
        assert [b.names for b in buckets] == [b.names for b in ref_buckets]       # gathered under ZeRO-3 too
        for b, rb in zip(buckets, ref_buckets):
            assert b.shapes == rb.shapes and b.version == rb.version == 2
    m = results[3][1][1]
    assert m["rows"] == 2 * 3 * 3 and m["kept_groups"] == 2


# ----- weight export -------------------------------------------------------------------------------------------
def test_weight_buckets_bounded_and_applied(data):
    learner = Learner(_model(data), *_config())
    Planner(learner.algorithm).train(learner, data[1], data[2], data[3])
    limit = 40_000
    buckets = list(learner.iter_weight_buckets(bucket_bytes=limit))
    assert len(buckets) > 3 and buckets[-1].last and not buckets[0].last
    assert [b.index for b in buckets] == list(range(len(buckets)))
    for b in buckets:
        assert b.version == learner.version == 1
        assert b.nbytes <= limit or len(b.names) == 1          # only a single oversized tensor may exceed it
        assert b.flat.dim() == 1 and all(d == str(b.flat.dtype) for d in b.dtypes)
    names = [n for b in buckets for n in b.names]
    assert names == [n for n, _ in learner.policy.named_parameters()]
    receiver = random_showo(seed=99)
    for b in buckets:
        assert apply_weight_bucket(receiver, b) == 1
    for k, v in learner.policy.state_dict().items():
        assert torch.equal(receiver.state_dict()[k], v), k
    half = list(learner.iter_weight_buckets(bucket_bytes=limit, dtype=torch.bfloat16))
    assert half[0].flat.dtype == torch.bfloat16
    bad = buckets[0]
    bad.names = ["not.a.parameter"] + bad.names[1:]
    with pytest.raises(KeyError, match="not.a.parameter"):
        apply_weight_bucket(receiver, bad)


# ----- checkpoints -----------------------------------------------------------------------------------------------
def _resume_round_trip(data, tmp_path, **kw):
    _, trajs, rewards, prompts = data
    a, planner = Learner(_model(data), *_config(**kw)), Planner(_config(**kw))
    for _ in range(2):
        planner.train(a, trajs, rewards, prompts)
    # the driver's state (its step and its advantage tracker) rides along in the checkpoint
    a.driver_state = {"step": 2, "counters": {"groups_trained": 4}, "tracker": planner.tracker.state_dict()}
    path = a.save_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step_000002" and latest_checkpoint(tmp_path / "checkpoints") == path
    tail_a = [planner.train(a, trajs, rewards, prompts) for _ in range(2)]

    b, resumed = Learner(_model(data), *_config(**kw)), Planner(_config(**kw))
    assert b.resume(tmp_path / "checkpoints") == path
    assert b.step == 2 and b.version == 2 and b.lr == tail_a[0]["lr"]
    assert b.driver_state["counters"] == {"groups_trained": 4}
    resumed.tracker.load_state_dict(b.driver_state["tracker"])
    resumed.step = b.driver_state["step"]
    assert resumed.tracker.history.keys() == {"prompt 0", "prompt 1"}
    tail_b = [resumed.train(b, trajs, rewards, prompts) for _ in range(2)]
    sa, sb = _state(a), _state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for ma, mb in zip(tail_a, tail_b):
        for key in ("loss", "grad_norm", "lr", "ratio_mean", "clip_frac", "version"):
            assert ma[key] == mb[key], key
    assert planner.tracker.state_dict() == resumed.tracker.state_dict()
    return a, b, path


def test_save_resume_continues_bit_for_bit(data, tmp_path):
    a, b, path = _resume_round_trip(data, tmp_path)
    oa, ob = a._torch_optimizer.state_dict(), b._torch_optimizer.state_dict()
    for pid, st in oa["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], ob["state"][pid][key])
    # the checkpoint's policy is the released layout: Show-o's loader reads it as is
    policy = Showo.from_pretrained(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and "pytorch_model.safetensors" in manifest["files"]
    assert "llm/config.json" in manifest["files"] and "model.safetensors" not in manifest["files"]
    assert set(policy.state_dict()) == set(a.policy.state_dict())
    assert all(k.startswith("showo.") for k in policy.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_save_resume_bit_for_bit_under_zero(data, tmp_path, stage):
    _resume_round_trip(data, tmp_path, zero_stage=stage, extra_deepspeed=Z3_SMALL if stage == 3 else {})


def test_checkpoint_crash_corruption_and_mismatch(data, tmp_path, monkeypatch):
    _, trajs, rewards, prompts = data
    root = tmp_path / "ck"
    learner = Learner(_model(data), *_config())
    planner = Planner(learner.algorithm)
    planner.train(learner, trajs, rewards, prompts)
    good = learner.save_checkpoint(root)
    good_files = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}

    # a crash while writing the next checkpoint leaves the last good one as the latest
    planner.train(learner, trajs, rewards, prompts)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("learner.checkpoint.save_engine_state", boom)
    with pytest.raises(CheckpointError, match="untouched"):
        learner.save_checkpoint(root)
    monkeypatch.undo()
    assert not (root / ".step_000002.tmp").exists() and not (root / "step_000002").exists()   # no debris
    assert latest_checkpoint(root) == good
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == good_files
    # a directory with a checkpoint name but no manifest (e.g. copied half-way) is not complete
    (root / "step_000009").mkdir()
    assert latest_checkpoint(root) == good
    with pytest.raises(CheckpointError, match="not a complete"):
        Learner(_model(data), *_config()).resume(root / "step_000009")

    # the next successful save replaces the stale temporary directory
    second = learner.save_checkpoint(root, keep_last=1)
    assert second.name == "step_000002" and not (root / ".step_000002.tmp").exists()
    assert not good.exists()                               # rotated out, after the new one was in place

    # corruption: a truncated weight file and a flipped byte are refused before anything is loaded
    fresh = Learner(_model(data), *_config())
    before = _state(fresh)
    weights = second / "pytorch_model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        fresh.resume(second)
    weights.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        fresh.resume(second)
    weights.write_bytes(blob)
    for k, v in _state(fresh).items():
        assert torch.equal(v, before[k])
    assert fresh.step == 0

    # mismatch: another model size
    from benchmarks.tiny_models import tiny_showo_config
    other = Learner(random_showo(seed=1, config=tiny_showo_config(hidden=32)), *_config())
    with pytest.raises(CheckpointError, match="does not match"):
        other.resume(second)
    with pytest.raises(CheckpointError, match="no complete"):
        fresh.resume(tmp_path / "empty")


# ----- guards ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_guard_skips_counts_and_raises(data, tmp_path, stage):
    _, trajs, rewards, prompts = data
    learner = Learner(_model(data), *_config(zero_stage=stage, max_consecutive_nonfinite=3, selector="all"))
    planner = Planner(learner.algorithm)
    planner.train(learner, trajs, rewards, prompts)
    ckpt = learner.save_checkpoint(tmp_path / "ck")
    poisoned = [behaviour_logprob(tr, "candidate1").clone() for tr in trajs]
    poisoned[1][2, 1] = float("nan")                      # one recorded behaviour log-prob is NaN
    clean = [behaviour_logprob(tr, "candidate1") for tr in trajs]

    def bad_step():
        return planner.train(learner, trajs, rewards, prompts, behaviour=poisoned)

    before, lr = _state(learner), learner.lr
    m = bad_step()
    assert m["nonfinite_skipped"] == 1 and m["nonfinite_total"] == 1 and m["version"] == 1
    assert not math.isfinite(m["loss"])
    assert learner.lr == lr and learner.step == 1
    for k, v in _state(learner).items():
        assert torch.equal(v, before[k]), k
    m = bad_step()
    assert m["nonfinite_total"] == 2
    good = planner.train(learner, trajs, rewards, prompts, behaviour=clean)   # resets the streak
    assert good["nonfinite_skipped"] == 0 and good["version"] == 2 and math.isfinite(good["grad_norm"])
    bad_step()
    bad_step()
    with pytest.raises(NonFiniteUpdateError) as e:
        bad_step()
    assert "3 consecutive" in str(e.value) and str(ckpt) in str(e.value) and "intact" in str(e.value)
    assert learner.nonfinite_total == 5 and learner.step == 2


def test_nan_reward_raises_in_the_driver_before_any_update(data):
    _, trajs, rewards, prompts = data
    learner = Learner(_model(data), *_config(reward_name="hps"))
    before = _state(learner)
    bad = [rewards[0], torch.tensor([0.1, float("nan"), 0.3])]
    with pytest.raises(RewardError, match=r"'hps'.*sample 1 of group 1") as e:
        Planner(learner.algorithm).train(learner, trajs, bad, prompts)
    assert e.value.reward == "hps" and e.value.sample == 1
    for k, v in _state(learner).items():
        assert torch.equal(v, before[k])


def test_all_groups_filtered_is_a_no_signal_step(data):
    _, trajs, _, prompts = data
    learner = Learner(_model(data), *_config(advantage="group", filter_min_std=1e-3))
    m = Planner(learner.algorithm).train(learner, trajs, [torch.ones(3), torch.ones(3)], prompts)
    assert m["no_signal_skipped"] == 1 and m["kept_groups"] == 0 and m["dropped_groups"] == 2
    assert learner.step == 0 and m["nonfinite_skipped"] == 0


def test_gradient_checkpointing_same_gradients(data):
    _, trajs, rewards, prompts = data
    grads = []
    for ckpt in (False, True):
        learner = Learner(_model(data), *_config(gradient_checkpointing=ckpt, advantage="group"))
        assert learner.policy.gradient_checkpointing is ckpt
        state = learner.accumulate_gradients(Planner(learner.algorithm).plan(trajs, rewards, prompts).groups)
        grads.append(learner.full_gradients())
        learner.apply_update(state)
    _assert_close(grads[1], grads[0], rel=1e-6)


# ----- learning signal ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transition", ["candidate2", "ar_style"])
def test_few_steps_raise_high_advantage_and_lower_low_advantage_logprobs(transition):
    """Candidate 1 is left out on purpose: its re-mask term log Σ_{p(v) < threshold} p(v) jumps whenever a code's
    probability crosses the recorded threshold, so on a random tiny model a finite step need not follow the
    first-order direction (seen on this batch); candidates 2 and AR-style are smooth."""
    model = random_showo(seed=21)
    trajs, prompts = sample_groups(model, num_groups=1, group_size=4, steps=4, seed=4)
    rewards = [torch.tensor([1.0, 0.0, 0.2, 0.9])]
    before = policy_step_logprobs(model, trajs[0], transition).sum(-1)
    learner = Learner(model, *configs(transition=transition, lr=1e-4, warmup_steps=1, micro_batch_rows=8,
                                           stale_logprobs="recorded"))
    planner = Planner(learner.algorithm)
    for i in range(3):
        m = planner.train(learner, trajs, rewards, prompts)
        assert m["nonfinite_skipped"] == 0
        if i == 0:   # sampled with the weights being trained: recorded and recomputed log-probs agree
            assert m["on_policy_rows"] == 4 * 4 and m["on_policy_ratio_dev"] < 1e-5
            assert m["on_policy_outside_clip"] == 0 and m["staleness_mean"] == 0
        else:
            assert m["on_policy_rows"] == 0 and m["staleness_mean"] == i
        change = (policy_step_logprobs(learner.policy, trajs[0], transition).sum(-1) - before).tolist()
        assert change[0] > 0 and change[3] > 0, change          # positive advantages: more likely
        assert change[1] < 0 and change[2] < 0, change          # negative advantages: less likely
    assert m["ratio_mean"] != pytest.approx(1.0, abs=1e-4)  # later steps are off-policy w.r.t. the recorded ones
    assert m["clip_frac"] > 0


def test_stale_trajectories_take_their_ratio_against_recomputed_logprobs(data):
    """`stale_logprobs: recompute` (the default): a trajectory sampled with older weights is scored against the
    learner's log-probs at the start of the update (ratio 1, nothing clipped), and the distance to the recorded
    behaviour log-probs is reported; `recorded` keeps the importance ratio to the behaviour policy."""
    _, trajs, rewards, prompts = data
    figures = {}
    for mode in ("recompute", "recorded"):
        learner = Learner(_model(data), *_config(stale_logprobs=mode, selector="all"))
        planner = Planner(learner.algorithm)
        first = planner.train(learner, trajs, rewards, prompts)          # on-policy: version 0 sampled them
        assert first["stale_rows"] == 0 and first["on_policy_ratio_dev"] < 1e-5
        figures[mode] = planner.train(learner, trajs, rewards, prompts)  # now one version stale
    fresh, old = figures["recompute"], figures["recorded"]
    assert fresh["staleness_mean"] == old["staleness_mean"] == 1
    assert fresh["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and fresh["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert fresh["stale_rows"] == fresh["rows"] == 2 * 3 * 4 and fresh["stale_behaviour_kl"] > 1e-6
    assert old["stale_rows"] == 0 and old["ratio_max"] > 1.0 + 1e-3
    assert fresh["stale_behaviour_kl"] == pytest.approx(old["approx_kl"], rel=1e-3)   # the same distance, seen twice
