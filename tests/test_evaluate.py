"""Evaluation: strict verdicts, the report's numbers, the captioned category grids, the tables and the reward curve."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cluster.evaluate import format_before_after, format_table
from rewards.worker import RewardResult


def scored(rewards, details) -> RewardResult:
    return RewardResult(torch.tensor(rewards), {}, details, (0.0, 0.0), 0)


def test_strict_verdicts_come_from_the_geneval_detail_not_the_fraction():
    group = scored([0.5, 1.0, 0.75], {"geneval/strict": torch.tensor([0.0, 1.0, 0.0]),
                                      "geneval/fraction": torch.tensor([0.5, 1.0, 0.75])})
    assert group.strict_verdicts().tolist() == [0.0, 1.0, 0.0]
    assert scored([0.2, 0.7], {}).strict_verdicts().tolist() == [0.0, 1.0]


def test_format_table_lists_categories_and_overall():
    text = format_table({"overall": 0.5, "categories": {"counting": 0.25, "colors": 0.75}}, "title")
    title, header, row = text.splitlines()
    assert title == "title"
    assert [c.strip() for c in header.split("|")] == ["counting", "colors", "overall"]
    assert [float(c) for c in row.split("|")] == [0.25, 0.75, 0.5]
    # the columns line up: every cell of the header and of the row has the same width
    assert [len(c) for c in header.split("|")] == [len(c) for c in row.split("|")]


def test_before_after_table_has_both_rows_and_the_relative_change():
    before = {"step": 0, "overall": 0.25, "categories": {"counting": 0.0, "colors": 0.5}}
    after = {"step": 150, "overall": 0.5, "categories": {"counting": 0.25, "colors": 0.75}}
    header, row0, row1, change = format_before_after(before, after).splitlines()
    assert [c.strip() for c in header.split("|")] == ["counting", "colors", "overall"]
    assert row0.split()[:2] == ["step", "0"] and [float(c) for c in row0.split(None, 2)[2].split("|")] == [0.0, 0.5, 0.25]
    assert row1.split()[:2] == ["step", "150"] and [float(c) for c in row1.split(None, 2)[2].split("|")] == [0.25, 0.75, 0.5]
    assert change == "overall 0.250 -> 0.500, +0.250 (+100%)"
    # no relative change from a zero base
    zero = format_before_after({"step": 0, "overall": 0.0, "categories": {}}, {"step": 5, "overall": 0.1, "categories": {}})
    assert zero.splitlines()[-1] == "overall 0.000 -> 0.100, +0.100"


# ---------------------------------------------------------------------------------------------- evaluate()

PROMPTS = [("a photo of a circle", "single_object"), ("a photo of a square", "single_object"),
           ("a photo of two circles", "counting"), ("a photo of a red circle", "colors"),
           ("a photo of a blue square", "colors")]
VERDICTS = {0: [1, 1, 0], 1: [0, 0, 0], 2: [1, 0, 1], 3: [1, 1, 1], 4: [0, 1, 0]}   # per prompt, k = 3
REWARDS = {i: [0.1 * i + 0.01 * j for j in range(3)] for i in range(5)}
OBJECTS = {0: [1, 1, 0], 1: [2, 1, 1], 2: [3, 2, 10], 3: [1, 1, 1], 4: [0, 1, 0]}   # objects detected per image


class FakeRollouts:
    """Returns one group per request; the 'trajectory future' is the trajectory itself."""

    def __init__(self):
        self.overrides = None
        self.backend = SimpleNamespace(get=lambda futures: futures)

    def dispatch(self, requests, overrides, rewards=None):
        self.overrides, self.pool = overrides, rewards
        return requests

    def gather(self, requests, stats, overrides, rewards=None):
        """Each group with its (streamed) scores, as the real rollout group returns them."""
        from actors.types import GroupMeta
        from cluster.rollout_group import GroupResult
        out = []
        for r in requests:
            codes = torch.full((len(r.seeds), 4), r.prompt_index, dtype=torch.long)
            meta = GroupMeta(r.group_id, r.step, r.prompt_index, r.prompt, r.metadata, 0, 0, 0.0, 0.0)
            scores = scored(REWARDS[r.prompt_index],
                            {"geneval/strict": torch.tensor(VERDICTS[r.prompt_index], dtype=torch.float32),
                             "geneval/objects": torch.tensor(OBJECTS[r.prompt_index], dtype=torch.float32)})
            out.append(GroupResult(meta, SimpleNamespace(final_codes=codes), scores))
        return out


def decode(codes):
    """Each image a flat colour: its prompt index x 40 (so a grid's rows can be traced back to prompts)."""
    return (codes[:, :1, None, None] * 40).expand(-1, 8, 8, 3).to(torch.uint8).contiguous()


def test_evaluate_report_numbers_and_captioned_grids(tmp_path, monkeypatch):
    import cluster.evaluate as ev
    import policy.images
    from cluster.prompts import PromptItem
    items = [PromptItem(p, {"tag": t, "include": [{"class": "circle", "count": 1}]}) for p, t in PROMPTS]
    monkeypatch.setattr(ev, "eval_prompts", lambda cfg: items)
    calls = []
    real = policy.images.save_captioned_grid
    monkeypatch.setattr(ev, "save_captioned_grid",
                        lambda images, path, captions, nrow, verdicts=None, scale=1:
                        calls.append((path.name, images.clone(), list(captions), nrow, list(verdicts)))
                        or real(images, path, captions, nrow, verdicts=verdicts, scale=scale))
    cfg = OmegaConf.create({"seed": 0, "output_dir": str(tmp_path),
                            "eval": {"samples_per_prompt": 3, "guidance_scale": 2.5}})
    rollouts = FakeRollouts()
    rewards = object()
    report = ev.evaluate(cfg, rollouts, rewards, step=7, decoder=decode)

    assert rollouts.overrides == {"guidance_scale": 2.5} and rollouts.pool is rewards   # rewards streamed by them
    # accuracies by hand: single_object (2 + 0) / 6, counting 2 / 3, colors (3 + 1) / 6; overall = their mean
    assert report["categories"] == pytest.approx({"single_object": 2 / 6, "counting": 2 / 3, "colors": 4 / 6})
    assert list(report["categories"]) == ["single_object", "counting", "colors"]      # GenEval's order
    assert report["overall"] == pytest.approx((2 / 6 + 2 / 3 + 4 / 6) / 3)
    assert report["counts"] == {"single_object": 6, "counting": 3, "colors": 6} and report["images"] == 15
    assert report["reward_mean"] == pytest.approx(np.mean([v for vs in REWARDS.values() for v in vs]))
    assert report["step"] == 7 and report["samples_per_prompt"] == 3 and report["guidance_scale"] == 2.5
    # each prompt: its accuracy and how many objects its images show (counts in numeric order, as strings for JSON)
    counting = report["prompts"][2]
    assert counting == {"prompt": "a photo of two circles", "tag": "counting", "accuracy": pytest.approx(2 / 3),
                        "objects": {"2": 1, "3": 1, "10": 1}}
    assert list(counting["objects"]) == ["2", "3", "10"]
    assert [p["objects"] for p in report["prompts"][:2]] == [{"0": 1, "1": 2}, {"1": 2, "2": 1}]
    on_disk = json.loads((tmp_path / "eval" / "step_000007.json").read_text())
    assert on_disk == json.loads(json.dumps(report))

    # one captioned grid per category: a row per prompt, captioned with it, the verdicts of its images
    by_name = {c[0]: c[1:] for c in calls}
    assert sorted(by_name) == ["colors.png", "counting.png", "single_object.png"]
    images, captions, nrow, verdicts = by_name["colors.png"]
    assert captions == ["a photo of a red circle", "a photo of a blue square"] and nrow == 3
    assert verdicts == VERDICTS[3] + VERDICTS[4]
    assert images[:, 0, 0, 0].tolist() == [120] * 3 + [160] * 3                    # prompts 3 and 4, in order
    assert by_name["single_object.png"][1] == ["a photo of a circle", "a photo of a square"]
    assert by_name["counting.png"][3] == VERDICTS[2]
    for name in by_name:
        assert (tmp_path / "eval" / "step_000007" / name).is_file()


# ---------------------------------------------------------------------------------------------- reward curve

def _write_run(d, rewards, stds, evals):
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": r, "reward_std": sd}) + "\n" for s, (r, sd) in enumerate(zip(rewards, stds))))
    (d / "eval").mkdir()
    for step, overall, cats in evals:
        (d / "eval" / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "overall": overall,
                                                                      "categories": cats}))


def test_reward_curve_plots_training_reward_evaluations_and_categories(tmp_path):
    from PIL import Image
    from cluster.plots import reward_curve, reward_curve_data, reward_curve_figure
    rewards = [0.3 + 0.01 * s for s in range(20)]
    rewards[5] = None                                    # a step without reward (all groups dropped)
    stds = [0.1] * 20
    evals = [(20, 0.6, {"counting": 0.5, "single_object": 0.7}), (0, 0.2, {"counting": 0.1, "single_object": 0.3}),
             (10, 0.4, {"single_object": 0.5})]          # written out of order; step 10 lacks counting
    _write_run(tmp_path, rewards, stds, evals)

    data = reward_curve_data(tmp_path)
    mean = np.array([np.nan if r is None else r for r in rewards])
    np.testing.assert_array_equal(data["steps"], np.arange(20))
    np.testing.assert_array_equal(data["reward_mean"], mean)
    assert data["window"] == 2
    # trailing mean over the last two finite values; the missing step does not count as a zero
    expected_ma = [mean[0]] + [np.nanmean(mean[i - 1:i + 1]) for i in range(1, 20)]
    np.testing.assert_allclose(data["moving_average"], expected_ma)
    assert data["moving_average"][5] == pytest.approx(rewards[4]) and data["moving_average"][6] == pytest.approx(rewards[6])
    np.testing.assert_array_equal(data["eval_steps"], [0, 10, 20])
    np.testing.assert_array_equal(data["eval_overall"], [0.2, 0.4, 0.6])
    assert list(data["eval_categories"]) == ["single_object", "counting"]           # GenEval's order
    np.testing.assert_array_equal(data["eval_categories"]["single_object"], [0.3, 0.5, 0.7])
    np.testing.assert_array_equal(data["eval_categories"]["counting"], [0.1, np.nan, 0.5])

    fig = reward_curve_figure(data)
    top, bottom = fig.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    np.testing.assert_array_equal(lines["training reward (mean)"].get_ydata(), mean)
    np.testing.assert_array_equal(lines["held-out GenEval overall"].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(lines["held-out GenEval overall"].get_ydata(), [0.2, 0.4, 0.6])
    assert lines["held-out GenEval overall"].get_marker() == "o"
    cats = {line.get_label(): line for line in bottom.get_lines()}
    assert set(cats) == {"single_object", "counting", "overall"}
    np.testing.assert_array_equal(cats["counting"].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(cats["single_object"].get_ydata(), [0.3, 0.5, 0.7])
    assert top.get_shared_x_axes().joined(top, bottom)

    path = reward_curve(tmp_path)
    assert path == tmp_path / "reward_curve.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (800, 650)


def test_reward_curve_without_evaluations(tmp_path):
    from cluster.plots import reward_curve, reward_curve_data, reward_curve_figure
    _write_run(tmp_path, [0.5, 0.6, 0.7], [0.0, 0.0, 0.0], [])
    data = reward_curve_data(tmp_path)
    assert len(data["eval_steps"]) == 0 and data["eval_categories"] == {}
    labels = [line.get_label() for line in reward_curve_figure(data).axes[0].get_lines()]
    assert "held-out GenEval overall" not in labels and "training reward (mean)" in labels
    assert reward_curve(tmp_path).is_file()
