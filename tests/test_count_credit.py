"""GenEval counting credit (`count_credit: graded`): in [0, 1], 1 only for the exact count, falling with the
distance from it, composing with exclusions and `max_extra_objects`; `exact` keeps GenEval's partial credit."""
from __future__ import annotations

import pytest
import torch

from rewards.base import build_reward
from rewards.geneval import exclude_count_credit, include_count_credit
from worlds.shapes.codebook import make_decoder

FOUR_CIRCLES = {"tag": "counting", "include": [{"class": "circle", "count": 4}],
                "exclude": [{"class": "circle", "count": 5}]}
N_TOKENS = 64          # the default shapes world: an 8x8 grid


def _circles(counts, extra_squares: int = 0) -> torch.Tensor:
    """Images of the default shapes world with `c` red circles (code 1), then `extra_squares` red squares."""
    codes = torch.zeros(len(counts), N_TOKENS, dtype=torch.long)
    for i, c in enumerate(counts):
        codes[i, :c] = 1
        codes[i, c:c + extra_squares] = 1 + 4          # shape 1 (square) x 4 colours + colour 0
    return torch.as_tensor(make_decoder()(codes))


def _reward(**kw):
    return build_reward({"name": "geneval", "detector": {"name": "shapes"}, **kw})


def test_formula():
    assert [include_count_credit(c, 4) for c in (0, 2, 3, 4, 6)] == [0.0, 0.5, 0.75, 1.0, 1.0]
    assert [exclude_count_credit(c, 5) for c in (0, 4, 5, 8)] == [1.0, 1.0, 0.8, 0.5]
    assert exclude_count_credit(2, 1) == 0.0                      # "no dogs": any dog earns nothing


def test_graded_counts_fall_with_distance_and_peak_only_at_the_target():
    counts = list(range(0, 9))
    images = _circles(counts)
    meta = [FOUR_CIRCLES] * len(counts)
    prompts = ["a photo of four circles"] * len(counts)
    graded = _reward(count_credit="graded").score(images, prompts, meta)
    exact = _reward().score(images, prompts, meta)
    g = graded.scores.tolist()
    # (min(c,4)/4 + min(1, 4/c)) / 2 for c = 0..8
    want = [(min(c, 4) / 4 + (min(1.0, 4 / c) if c else 1.0)) / 2 for c in counts]
    assert g == pytest.approx(want)
    assert all(0.0 <= x <= 1.0 for x in g) and g.index(1.0) == 4 and g.count(1.0) == 1
    assert all(a < b for a, b in zip(g[:4], g[1:5])) and all(a > b for a, b in zip(g[4:], g[5:]))
    assert g[3] > g[0]                      # three circles for four now beat an empty canvas
    assert exact.scores.tolist() == [0.5, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5]     # GenEval's partial credit
    assert torch.equal(graded.details["strict"], exact.details["strict"])              # verdicts unchanged


def test_graded_credit_composes_with_max_extra_objects():
    images = _circles([3, 4, 5, 3], extra_squares=0)
    images[3] = _circles([3], extra_squares=2)[0]                 # 3 circles + 2 squares: 1 object too many
    meta = [FOUR_CIRCLES] * 4
    out = _reward(count_credit="graded", max_extra_objects=0).score(images, ["p"] * 4, meta)
    assert out.scores.tolist() == [pytest.approx(0.875), 1.0, 0.0, 0.0]   # over the allowance: 0, as before
    loose = _reward(count_credit="graded", max_extra_objects=1).score(images, ["p"] * 4, meta)
    assert loose.scores.tolist() == pytest.approx([0.875, 1.0, 0.9, 0.875])


def test_graded_credit_leaves_colour_and_position_rules_alone():
    meta = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "blue"}]}]
    red_circle = _circles([1])
    assert _reward(count_credit="graded").score(red_circle, ["p"], meta).scores.tolist() == [0.5]


def test_unknown_count_credit_is_refused():
    with pytest.raises(ValueError, match="count_credit='fuzzy'"):
        _reward(count_credit="fuzzy")


@pytest.mark.integration
def test_counting_breakdown_reproduces_the_runs_own_evaluation(tmp_path, capsys):
    # benchmarks/counting_breakdown re-evaluates a run's last checkpoint with the run's seed: the held-out overall
    # equals the run's own last evaluation, the counting category is the mean of its prompts, and the training
    # split's counting prompts are scored too (docs/rewards.md's table)
    import json
    from benchmarks.counting_breakdown import main
    from cluster.config import load_config
    from cluster.train import train
    run = tmp_path / "run"
    train(load_config("configs/tiny.yaml", [f"output_dir={run}", "cluster.backend=local", "max_steps=2",
                                            "eval.samples_per_prompt=4"]))
    own = json.loads((run / "eval" / "step_000002.json").read_text())
    assert main([str(run)]) == 0
    again = json.loads((run / "counting_breakdown" / "last" / "heldout" / "eval" / "step_000002.json").read_text())
    assert again["overall"] == own["overall"] and again["categories"] == own["categories"]
    counting = [p["accuracy"] for p in again["prompts"] if p["tag"] == "counting"]
    assert counting and sum(counting) / len(counting) == pytest.approx(own["categories"]["counting"])
    train_report = json.loads((run / "counting_breakdown" / "last" / "train" / "eval" / "step_000002.json").read_text())
    assert set(train_report["categories"]) == {"counting"} and len(train_report["prompts"]) >= 2
    out = capsys.readouterr().out.splitlines()
    row = [line for line in out if line.startswith(f"| {run} | step_000002 | {own['overall']:.3f} |")]
    assert len(row) == 1
    # and a row per counting prompt (held-out, then training) with the objects its images show
    rows = [line for line in out if line.startswith((f"| {run} | step_000002 | held-out |",
                                                      f"| {run} | step_000002 | training |"))]
    assert len(rows) == len(counting) + len(train_report["prompts"])
    for line, p in zip(rows, [p for p in again["prompts"] if p["tag"] == "counting"] + train_report["prompts"]):
        assert sum(p["objects"].values()) == 4                       # eval.samples_per_prompt images each
        assert line.endswith(" | " + ", ".join(f"{n}: {c}" for n, c in p["objects"].items()) + " |")
