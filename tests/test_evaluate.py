"""Evaluation helpers: GenEval's strict verdicts are read from the weighted reward's details."""
import torch

from cluster.evaluate import _strict_verdicts, format_before_after, format_table


def test_strict_verdicts_come_from_the_geneval_detail_not_the_fraction():
    scored = {"rewards": torch.tensor([0.5, 1.0, 0.75]),
              "details": {"geneval/strict": torch.tensor([0.0, 1.0, 0.0]),
                          "geneval/fraction": torch.tensor([0.5, 1.0, 0.75])}}
    assert _strict_verdicts(scored).tolist() == [0.0, 1.0, 0.0]
    no_geneval = {"rewards": torch.tensor([0.2, 0.7]), "details": {}}
    assert _strict_verdicts(no_geneval).tolist() == [0.0, 1.0]


def test_format_table_lists_categories_and_overall():
    text = format_table({"overall": 0.5, "categories": {"counting": 0.25, "colors": 0.75}}, "title")
    assert text.splitlines()[0] == "title" and "overall" in text and "0.250" in text


def test_before_after_table_has_both_rows_and_the_relative_change():
    before = {"step": 0, "overall": 0.25, "categories": {"counting": 0.0, "colors": 0.5}}
    after = {"step": 150, "overall": 0.5, "categories": {"counting": 0.25, "colors": 0.75}}
    lines = format_before_after(before, after).splitlines()
    assert "counting" in lines[0] and "overall" in lines[0]
    assert lines[1].split()[:3] == ["step", "0", "0.000"] and lines[2].split()[:3] == ["step", "150", "0.250"]
    assert lines[3] == "overall 0.250 -> 0.500, +0.250 (+100%)"


def test_reward_curve_marks_the_held_out_evaluations(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from cluster.plots import reward_curve
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": 0.3 + 0.01 * s, "reward_std": 0.1}) + "\n" for s in range(20)))
    (tmp_path / "eval").mkdir()
    for step, overall in ((0, 0.2), (20, 0.6)):
        (tmp_path / "eval" / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "overall": overall}))
    pixels = np.asarray(Image.open(reward_curve(tmp_path)).convert("RGB"))
    green = (pixels == (0x2C, 0xA0, 0x2C)).all(-1)      # the third series' colour: the evaluations
    assert green.sum() > 100
    rows, cols = np.nonzero(green[40:])                  # below the legend: the markers and their line
    assert cols.max() > pixels.shape[1] - 40 and rows.min() < rows.max()   # reaches step 20, rises
