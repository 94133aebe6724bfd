"""Evaluation helpers: GenEval's strict verdicts are read from the weighted reward's details."""
import torch

from cluster.evaluate import _strict_verdicts, format_table


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
