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
