"""The prompt schedule (which prompts and sampler seeds each step uses) and the metrics loggers (JSONL, TensorBoard)."""
from __future__ import annotations

import json
import math

import pytest

from cluster.data import PromptSchedule
from cluster.metrics import MetricsLogger, read_metrics


# ---------------------------------------------------------------------------------------------- PromptSchedule

@pytest.mark.parametrize("num_prompts,per_step", [(10, 2), (10, 3), (7, 7), (5, 8)])
def test_schedule_epochs_are_permutations(num_prompts, per_step):
    sched = PromptSchedule(num_prompts, per_step, seed=3)
    steps = -(-4 * num_prompts // per_step)                     # enough steps for four whole epochs
    drawn = [i for s in range(steps) for i in sched.indices(s)]
    assert all(len(sched.indices(s)) == per_step for s in range(steps))
    epochs = [drawn[k * num_prompts:(k + 1) * num_prompts] for k in range(4)]
    for e in epochs:                                             # every prompt exactly once per epoch
        assert sorted(e) == list(range(num_prompts))
    if num_prompts > 3:
        assert len({tuple(e) for e in epochs}) == 4              # each epoch its own order
        assert epochs[0] != sorted(epochs[0])                    # shuffled


def test_schedule_is_deterministic_and_resumable():
    a = PromptSchedule(94, 8, seed=0)
    b = PromptSchedule(94, 8, seed=0)
    forward = [a.indices(s) for s in range(40)]
    backward = [b.indices(s) for s in reversed(range(40))][::-1]   # no state: a resumed run draws the same
    assert forward == backward
    assert [PromptSchedule(94, 8, seed=1).indices(s) for s in range(40)] != forward
    assert a.seeds(5, 2, 8) == b.seeds(5, 2, 8)


def test_schedule_by_tag_trains_every_tag_equally():
    # 3 tags with 1, 2 and 6 prompts: by_tag draws each tag once per tag epoch, and within a tag every prompt
    # once per epoch of that tag; no state, so a resumed run draws the same
    tags = ["a"] + ["b"] * 2 + ["c"] * 6
    sched = PromptSchedule(len(tags), 3, seed=0, tags=tags)
    drawn = [i for s in range(24) for i in sched.indices(s)]          # 72 draws = 24 tag epochs
    for e in range(24):
        assert sorted(tags[i] for i in drawn[3 * e:3 * e + 3]) == ["a", "b", "c"]
    per_tag = {t: [i for i in drawn if tags[i] == t] for t in "abc"}
    assert per_tag["a"] == [0] * 24
    for t, members in (("b", [1, 2]), ("c", list(range(3, 9)))):
        n = len(members)
        for k in range(24 // n):                                        # each of its epochs a permutation
            assert sorted(per_tag[t][k * n:(k + 1) * n]) == members
    assert [PromptSchedule(9, 3, 0, tags).indices(s) for s in reversed(range(24))][::-1] == \
        [sched.indices(s) for s in range(24)]
    assert [PromptSchedule(9, 3, 1, tags).indices(s) for s in range(24)] != [sched.indices(s) for s in range(24)]
    with pytest.raises(ValueError, match="2 tags for 9 prompts"):
        PromptSchedule(9, 3, 0, tags=["a", "b"])


def test_schedule_by_tag_with_weights_draws_each_tag_its_weight_per_tag_epoch():
    # weights 1, 2, 3 over tags with 1, 2 and 6 prompts: a tag epoch is 6 draws (a once, b twice, c three times);
    # within a tag every prompt still comes once per epoch of that tag; weight 0 leaves a tag out
    tags = ["a"] + ["b"] * 2 + ["c"] * 6
    sched = PromptSchedule(len(tags), 3, seed=0, tags=tags, weights={"a": 1, "b": 2, "c": 3})
    drawn = [i for s in range(24) for i in sched.indices(s)]          # 72 draws = 12 tag epochs
    for e in range(12):
        assert sorted(tags[i] for i in drawn[6 * e:6 * e + 6]) == ["a", "b", "b", "c", "c", "c"]
    per_tag = {t: [i for i in drawn if tags[i] == t] for t in "abc"}
    for t, members in (("b", [1, 2]), ("c", list(range(3, 9)))):
        n = len(members)
        for k in range(len(per_tag[t]) // n):
            assert sorted(per_tag[t][k * n:(k + 1) * n]) == members
    assert [sched.indices(s) for s in reversed(range(24))][::-1] == [sched.indices(s) for s in range(24)]
    # weights all 1 are the unweighted schedule, draw for draw
    ones = PromptSchedule(len(tags), 3, seed=0, tags=tags, weights={"a": 1, "b": 1, "c": 1})
    assert [ones.indices(s) for s in range(24)] == [PromptSchedule(9, 3, 0, tags).indices(s) for s in range(24)]
    no_a = PromptSchedule(len(tags), 3, seed=0, tags=tags, weights={"a": 0})
    assert not any(tags[i] == "a" for s in range(24) for i in no_a.indices(s))
    with pytest.raises(ValueError, match="integers >= 0"):
        PromptSchedule(len(tags), 3, seed=0, tags=tags, weights={"a": 0, "b": 0, "c": 0})


def test_prompt_sampling_config(tmp_path):
    from cluster.config import load_config
    from cluster.data import prompt_schedule, train_prompts
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.prompt_sampling=by_tag"])
    prompts = train_prompts(cfg)
    sched = prompt_schedule(cfg, prompts)
    n_tags = len({p.metadata["tag"] for p in prompts})
    drawn = [prompts[i].metadata["tag"] for s in range(n_tags) for i in sched.indices(s)]
    assert {t: drawn.count(t) for t in set(drawn)} == {t: cfg.data.prompts_per_step for t in set(drawn)}
    uniform = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    assert prompt_schedule(uniform, prompts).by_tag is None
    with pytest.raises(Exception, match="prompt_sampling"):
        load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.prompt_sampling=balanced"])
    weighted = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.prompt_sampling=by_tag",
                                                 "data.tag_weights={counting: 3}"])
    sched = prompt_schedule(weighted, prompts)
    drawn = [prompts[sched._draw(k)].metadata["tag"] for k in range((n_tags + 2) * 10)]    # ten tag epochs
    assert drawn.count("counting") == 30 and all(drawn.count(t) == 10 for t in set(drawn) - {"counting"})
    with pytest.raises(ValueError, match="a tag no training prompt has"):       # a misspelt tag, named
        prompt_schedule(load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.prompt_sampling=by_tag",
                                                          "data.tag_weights={countin: 3}"]), prompts)
    with pytest.raises(Exception, match="set that too"):                       # weights without by_tag
        load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.tag_weights={counting: 3}"])
    with pytest.raises(Exception, match="integers >= 0"):
        load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "data.prompt_sampling=by_tag",
                                          "data.tag_weights={counting: -1}"])
    no_counting = prompt_schedule(load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                                                    "data.prompt_sampling=by_tag",
                                                                    "data.tag_weights={counting: 0}"]), prompts)
    drawn = [prompts[no_counting._draw(k)].metadata["tag"] for k in range((n_tags - 1) * 10)]  # the others stay at 1
    assert "counting" not in drawn and all(drawn.count(t) == 10 for t in set(drawn)) and len(set(drawn)) == n_tags - 1


def test_schedule_seeds_are_distinct():
    sched = PromptSchedule(94, 8, seed=0)
    seeds = [x for step in range(200) for slot in range(8) for x in sched.seeds(step, slot, 8)]
    assert len(seeds) == len(set(seeds)) == 200 * 8 * 8          # across steps, groups and samples
    assert all(0 <= x < 2 ** 62 for x in seeds)
    other = PromptSchedule(94, 8, seed=1)
    mine = set(seeds)
    assert not any(x in mine for step in range(200) for slot in range(8) for x in other.seeds(step, slot, 8))
    # the one formula also seeds the evaluation and `generate`, from their own steps: no training sample repeats
    from cluster.data import EVAL_STEP, GENERATE_STEP, sample_seeds
    for stream in (EVAL_STEP, GENERATE_STEP):
        held_out = [x for i in range(553) for x in sample_seeds(0, stream, i, 4)]
        assert len(set(held_out)) == len(held_out) and not mine & set(held_out)
    # the evaluation's seeds are those of every earlier release (its tables stay comparable), training's too
    assert sample_seeds(3, EVAL_STEP, 5, 4) == [(3 + 7919) * 100_003 + 5 * 101 + j for j in range(4)]
    assert sample_seeds(3, 17, 5, 4) == [((3 * 1_000_003 + 17) * 10_007 + 5) * 101 + j for j in range(4)]


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_jsonl_nonfinite_and_truncate(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(5):
        log.log({"step": step, "reward_mean": 0.1 * step, "loss": float("nan") if step == 2 else -step})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["loss"] is None and rows[3]["loss"] == -3     # NaN is written as null (valid JSON)
    log = MetricsLogger(tmp_path)
    log.truncate_after(2)                                        # resuming from the step-2 checkpoint
    log.log({"step": 3, "reward_mean": 9.0})
    log.close()
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 9.0)]


def test_tensorboard_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(4):
        log.log({"step": step, "reward_mean": 0.25 * step, "loss": 1.0 / (step + 1), "note": "text", "count": step * 3,
                 "hist": [1, 2]})
    log.log({"step": 4, "reward_mean": float("nan")})
    log.close()
    runs = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(runs) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["count", "loss", "reward_mean"]   # numbers only; step is the axis
    rewards = acc.Scalars("reward_mean")
    assert [e.step for e in rewards] == [0, 1, 2, 3, 4]
    assert [e.value for e in rewards[:4]] == [0.0, 0.25, 0.5, 0.75] and math.isnan(rewards[4].value)
    assert [round(e.value, 6) for e in acc.Scalars("loss")] == [1.0, 0.5, round(1 / 3, 6), 0.25]
    assert [e.value for e in acc.Scalars("count")] == [0, 3, 6, 9]
    # the JSONL file is written as well
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["note"] == "text"
