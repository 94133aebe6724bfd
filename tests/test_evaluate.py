"""Evaluation: the report's metrics and intervals, GenEval's verdicts (only with a GenEval reward), the captioned
category grids, the tables, the reward curve, and a tiny run on a non-GenEval reward."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cluster.evaluate import format_before_after, format_table
from cluster.intervals import RESAMPLES, mean_interval, paired_change
from rewards.worker import RewardResult


def scored(rewards, details, label="geneval") -> RewardResult:
    return RewardResult(torch.tensor(rewards), {label: torch.tensor(rewards)}, details, (0.0, 0.0), 0)


# ---------------------------------------------------------------------------------------------- intervals

def test_bootstrap_over_prompts_stratified_by_group():
    values = [0.2, 0.4, 0.9, 1.0, 0.0, 0.6]
    tags = ["b", "b", "a", "a", "a", "c"]
    out = mean_interval(values, tags)
    assert out["mean"] == pytest.approx(np.mean(values)) and out["n"] == 6
    assert list(out["groups"]) == ["a", "b", "c"]                             # alphabetical
    assert out["groups"]["a"]["mean"] == pytest.approx(1.9 / 3) and out["groups"]["a"]["n"] == 3
    assert out["groups"]["c"]["ci95"] is None                                 # one prompt: no interval
    # by hand: the same generator draws each group's prompts in turn (groups in order), with replacement
    rng = np.random.default_rng(0)
    v = np.asarray(values)
    boot = {t: v[ix][rng.integers(0, len(ix), size=(RESAMPLES, len(ix)))].mean(1)
            for t, ix in (("a", [2, 3, 4]), ("b", [0, 1]), ("c", [5]))}
    overall = (3 * boot["a"] + 2 * boot["b"] + boot["c"]) / 6
    assert out["ci95"] == pytest.approx(list(np.quantile(overall, [0.025, 0.975])))
    assert out["groups"]["b"]["ci95"] == pytest.approx(list(np.quantile(boot["b"], [0.025, 0.975])))
    lo, hi = out["ci95"]
    assert lo < out["mean"] < hi and 0.0 <= lo and hi <= 1.0
    assert mean_interval(values, tags) == out                                 # seeded: the same every time
    # GenEval's aggregate: the mean of the groups' means
    macro = mean_interval(values, tags, "groups")
    assert macro["mean"] == pytest.approx((1.9 / 3 + 0.3 + 0.6) / 3)
    assert macro["ci95"] == pytest.approx(list(np.quantile((boot["a"] + boot["b"] + boot["c"]) / 3, [0.025, 0.975])))
    # a paired change: the interval of the differences' mean; no change, no width
    same = paired_change(values, values, tags)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    shifted = paired_change(values, [x + 0.1 for x in values], tags)
    assert shifted["mean"] == pytest.approx(0.1) and shifted["ci95"] == pytest.approx([0.1, 0.1])
    assert mean_interval([0.5], ["x"])["ci95"] is None and mean_interval([], [])["n"] == 0
    with pytest.raises(ValueError, match="aggregate"):
        mean_interval(values, tags, "images")


def test_format_table_lists_categories_and_overall():
    text = format_table({"overall": 0.5, "categories": {"counting": 0.25, "colors": 0.75}}, "title")
    title, header, row = text.splitlines()
    assert title == "title"
    assert [c.strip() for c in header.split("|")] == ["counting", "colors", "overall"]
    assert [float(c) for c in row.split("|")] == [0.25, 0.75, 0.5]
    # the columns line up: every cell of the header and of the row has the same width
    assert [len(c) for c in header.split("|")] == [len(c) for c in row.split("|")]


def test_tables_without_verdicts_list_each_metric_with_its_interval():
    def report(step, mean, ci, per_prompt):
        return {"step": step, "prompts": [{"prompt": p, "tag": t} for p, t in zip("pqr", "xxy")], "metrics": {
            "pickscore": {"mean": mean, "ci95": ci, "n": 3, "aggregate": "prompts", "reward": "pickscore",
                          "verdicts": False, "per_prompt": per_prompt,
                          "groups": {"x": {"mean": mean, "ci95": ci, "n": 2},
                                     "y": {"mean": per_prompt[2], "ci95": None, "n": 1}}}}}
    before, after = report(0, 20.5, [20.0, 21.0], [20.0, 21.0, 20.5]), report(3, 21.5, [21.0, 22.0], [21.0, 22.0, 21.5])
    lines = format_table(after, "title").splitlines()
    assert lines[0] == "title" and "overall" not in "\n".join(lines)
    assert lines[2].split() == ["pickscore", "21.5", "[21,", "22]", "3"]
    assert lines[3].split() == ["x", "21.5", "[21,", "22]", "2"] and lines[4].split() == ["y", "21.5", "[n/a]", "1"]
    table = format_before_after(before, after).splitlines()
    assert "overall" not in "\n".join(table) and table[0].split()[:3] == ["metric", "step", "0"]
    # the change with the interval of the paired per-prompt differences (each prompt gained exactly 1)
    assert table[1].split() == ["pickscore", "20.5", "[20,", "21]", "21.5", "[21,", "22]", "+1", "[+1,", "+1]"]
    # a GenEval report: its table as before, another reward's metric below it
    geneval = {"overall": 0.5, "categories": {"counting": 0.5}, "metrics": {
        "geneval": {"mean": 0.7, "reward": "geneval", "verdicts": False},
        "geneval/strict": {"mean": 0.5, "reward": "geneval", "verdicts": True}, **after["metrics"]}}
    lines = format_table(geneval).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["counting", "overall"] and lines[2].startswith("metric")
    assert [line.split()[0] for line in lines[3:]] == ["pickscore", "x", "y"]


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

    def __init__(self, label="geneval"):
        self.overrides, self.label = None, label
        self.backend = SimpleNamespace(get=lambda futures: futures)

    def dispatch(self, requests, overrides):
        self.overrides = overrides
        return requests

    def gather(self, requests, rewards, stats):
        """Each group with its (streamed) scores, as the real rollout group returns them."""
        from actors.types import GroupMeta
        from cluster.rollout_group import GroupResult
        out = []
        for r in requests:
            codes = torch.full((len(r.seeds), 4), r.prompt_index, dtype=torch.long)
            meta = GroupMeta(r.group_id, r.step, r.prompt_index, r.prompt, r.metadata, 0, 0, 0.0, 0.0)
            scores = scored(REWARDS[r.prompt_index],
                            {"geneval/strict": torch.tensor(VERDICTS[r.prompt_index], dtype=torch.float32),
                             "geneval/objects": torch.tensor(OBJECTS[r.prompt_index], dtype=torch.float32)},
                            label=self.label)
            out.append(GroupResult(meta, SimpleNamespace(final_codes=codes), scores))
        return out


class FakeRewards:
    """Records that the evaluation submitted the scoring of its rollouts before gathering them (streaming)."""

    def __init__(self, rollouts):
        self.rollouts = rollouts

    def score_rollouts(self, pending):
        self.rollouts.pool = "scored before the gather"


def decode(codes):
    """Each image a flat colour: its prompt index x 40 (so a grid's rows can be traced back to prompts)."""
    return (codes[:, :1, None, None] * 40).expand(-1, 8, 8, 3).to(torch.uint8).contiguous()


def _evaluate(tmp_path, monkeypatch, rewards_cfg, rollouts):
    import cluster.evaluate as ev
    import policy.images
    from cluster.prompts import PromptItem
    items = [PromptItem(p, {"tag": t, "include": [{"class": "circle", "count": 1}]}) for p, t in PROMPTS]
    monkeypatch.setattr(ev, "eval_prompts", lambda cfg: items)
    calls = []
    real = policy.images.save_captioned_grid
    monkeypatch.setattr(ev, "save_captioned_grid",
                        lambda images, path, captions, nrow, scale=1, **marks:
                        calls.append((path.name, images.clone(), list(captions), nrow, marks))
                        or real(images, path, captions, nrow, scale=scale, **marks))
    cfg = OmegaConf.create({"seed": 0, "output_dir": str(tmp_path), "rewards": rewards_cfg,
                            "eval": {"samples_per_prompt": 3, "guidance_scale": 2.5, "rewards": []}})
    return ev.evaluate(cfg, rollouts, FakeRewards(rollouts), step=7, decoder=decode), {c[0]: c[1:] for c in calls}


def test_evaluate_report_numbers_and_captioned_grids(tmp_path, monkeypatch):
    rollouts = FakeRollouts()
    report, by_name = _evaluate(tmp_path, monkeypatch, [{"name": "geneval", "detector": {"name": "shapes"}}], rollouts)

    assert rollouts.overrides == {"guidance_scale": 2.5} and rollouts.pool == "scored before the gather"
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

    # the metrics: the GenEval reward's score, and its strict verdicts with overall and categories as above
    strict, frac = report["metrics"]["geneval/strict"], report["metrics"]["geneval"]
    assert strict["mean"] == pytest.approx(report["overall"]) and strict["aggregate"] == "groups"
    assert {t: g["mean"] for t, g in strict["groups"].items()} == pytest.approx(report["categories"])
    assert strict["per_prompt"] == pytest.approx([np.mean(VERDICTS[i]) for i in range(5)])
    assert strict["groups"]["counting"]["ci95"] is None and strict["groups"]["colors"]["n"] == 2
    lo, hi = strict["ci95"]
    assert lo <= strict["mean"] <= hi and strict["n"] == 5 and strict["images"] == 15 and strict["verdicts"]
    assert frac["mean"] == pytest.approx(np.mean([np.mean(REWARDS[i]) for i in range(5)]))
    assert frac["aggregate"] == "prompts" and not frac["verdicts"] and frac["reward"] == "geneval"

    # one captioned grid per category: a row per prompt, captioned with it, the verdicts of its images
    assert sorted(by_name) == ["colors.png", "counting.png", "single_object.png"]
    images, captions, nrow, marks = by_name["colors.png"]
    assert captions == ["a photo of a red circle", "a photo of a blue square"] and nrow == 3
    assert marks == {"verdicts": VERDICTS[3] + VERDICTS[4]}
    assert images[:, 0, 0, 0].tolist() == [120] * 3 + [160] * 3                    # prompts 3 and 4, in order
    assert by_name["single_object.png"][1] == ["a photo of a circle", "a photo of a square"]
    assert by_name["counting.png"][3] == {"verdicts": VERDICTS[2]}
    for name in by_name:
        assert (tmp_path / "eval" / "step_000007" / name).is_file()


def test_evaluate_without_a_geneval_reward_reports_metrics_and_no_verdicts(tmp_path, monkeypatch):
    """A preference reward (here named pickscore; its scores are the fake's): no overall, no categories, no
    per-prompt accuracy even with GenEval details present under another label, nothing thresholded; its mean
    and interval per prompt group; grids captioned with the score, no frames."""
    rollouts = FakeRollouts(label="pickscore")
    report, by_name = _evaluate(tmp_path, monkeypatch, [{"name": "pickscore", "path": "/unused"}], rollouts)
    assert not {"overall", "categories", "counts", "images"} & set(report)
    assert report["prompts"] == [{"prompt": p, "tag": t} for p, t in PROMPTS]
    assert list(report["metrics"]) == ["pickscore"]
    m = report["metrics"]["pickscore"]
    per_prompt = [np.mean(REWARDS[i]) for i in range(5)]
    assert m["mean"] == pytest.approx(np.mean(per_prompt)) and m["per_prompt"] == pytest.approx(per_prompt)
    assert m["groups"]["colors"]["mean"] == pytest.approx(np.mean(per_prompt[3:]))
    assert m["ci95"][0] < m["mean"] < m["ci95"][1] and m["reward"] == "pickscore" and not m["verdicts"]
    images, captions, nrow, marks = by_name["colors.png"]
    assert marks == {"scores": pytest.approx(REWARDS[3] + REWARDS[4]), "score_name": "pickscore"}
    assert json.loads((tmp_path / "eval" / "step_000007.json").read_text()) == json.loads(json.dumps(report))


def test_a_reward_servers_geneval_component_gets_geneval_verdicts(tmp_path, monkeypatch):
    """Behind a reward server the config names only `remote`; the server's component labelled geneval (with its
    geneval/strict details) is summarized by GenEval, so the report has the same overall and categories."""
    local, _ = _evaluate(tmp_path / "local", monkeypatch, [{"name": "geneval", "detector": {"name": "shapes"}}],
                         FakeRollouts())
    remote, _ = _evaluate(tmp_path / "remote", monkeypatch,
                          [{"name": "remote", "url": "http://127.0.0.1:1/score", "label": "server"}], FakeRollouts())
    assert remote["overall"] == pytest.approx(local["overall"]) and remote["categories"] == local["categories"]
    assert remote["metrics"]["geneval/strict"]["verdicts"] and "overall" in local


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


def test_reward_curve_without_verdicts_plots_each_metric_with_its_interval(tmp_path):
    from cluster.plots import reward_curve_data, reward_curve_figure
    _write_run(tmp_path, [20.0, 20.5, 21.0], [1.0] * 3, [])
    for step, mean in ((0, 20.0), (2, 21.0)):
        metric = {"mean": mean, "ci95": [mean - 0.5, mean + 0.25], "reward": "pickscore", "verdicts": False,
                  "groups": {"Animals": {"mean": mean + 1}, "Arts": {"mean": mean - 1}}}
        (tmp_path / "eval" / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "metrics": {
            "pickscore": metric}}))
    data = reward_curve_data(tmp_path)
    assert np.isnan(data["eval_overall"]).all() and data["eval_categories"] == {}
    assert data["eval_primary"] == "pickscore"
    np.testing.assert_array_equal(data["eval_metrics"]["pickscore"]["lo"], [19.5, 20.5])
    np.testing.assert_array_equal(data["eval_groups"]["Animals"], [21.0, 22.0])
    top, bottom = reward_curve_figure(data).axes
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert "held-out pickscore (95 % interval)" in labels and "held-out GenEval overall" not in labels
    assert {line.get_label() for line in bottom.get_lines()} == {"Animals", "Arts", "all prompts"}
    assert bottom.get_title() == "held-out pickscore per prompt group"


@pytest.mark.integration
def test_a_run_on_non_geneval_rewards_reports_their_metrics_at_the_first_and_last_step(tmp_path, capsys):
    """configs/tiny.yaml trained and evaluated on self_certainty plus HPSv2 (a tiny random open_clip ViT in HPSv2's
    checkpoint format): each evaluation has both metrics' means and intervals, per prompt group, and nothing
    thresholded; the self-certainty reward gets the trajectory's value and no images, HPSv2 the images."""
    from benchmarks.tiny_models import make_tiny_open_clip
    from cluster.config import load_config
    from cluster.train import train
    cfg_path, ckpt = make_tiny_open_clip(tmp_path / "hps", wrap_key="state_dict", filename="HPS_v2_compressed.pt")
    rewards = (f"rewards=[{{name: self_certainty}}, {{name: hpsv2, weight: 0.5, path: {ckpt}, "
               f"model_config: {cfg_path}}}]")
    out = tmp_path / "run"
    summary = train(load_config("configs/tiny.yaml", [f"output_dir={out}", "cluster.backend=local", "max_steps=2",
                                                      "eval.samples_per_prompt=2", rewards]))
    reports = [json.loads((out / "eval" / f"step_{s:06d}.json").read_text()) for s in (0, 2)]
    for report in reports:
        assert not {"overall", "categories", "counts", "images"} & set(report)
        assert all(set(p) == {"prompt", "tag"} for p in report["prompts"]) and len(report["prompts"]) == 8
        assert list(report["metrics"]) == ["self_certainty", "hpsv2"]
        for m in report["metrics"].values():
            lo, hi = m["ci95"]
            assert lo <= m["mean"] <= hi and m["n"] == 8 and m["images"] == 16 and len(m["groups"]) == 6
        assert report["metrics"]["self_certainty"]["mean"] < 0
        weighted = report["metrics"]["self_certainty"]["mean"] + 0.5 * report["metrics"]["hpsv2"]["mean"]
        assert report["reward_mean"] == pytest.approx(weighted, abs=1e-5)
    assert json.loads(json.dumps(summary["eval_start"])) == reports[0]
    assert sorted(p.name for p in (out / "eval" / "step_000002").iterdir()) == sorted(
        f"{t}.png" for t in reports[1]["metrics"]["hpsv2"]["groups"])
    # the summary printed at the end: each metric before and after, with the paired change
    printed = capsys.readouterr().out
    table = printed[printed.index("before and after RL:"):].splitlines()
    assert table[1].split()[:3] == ["metric", "step", "0"] and "overall" not in printed
    assert [row.split()[0] for row in table[2:4]] == ["self_certainty", "hpsv2"]


def test_the_shipped_parti_prompts_and_the_preference_config(tmp_path):
    """rewards/data/parti: the JSONL is the TSV's 1632 prompts with tag = category; configs/preference_1node_8gpu.yaml
    loads once its placeholder paths exist, trains on PickScore and evaluates PickScore and HPSv2 on Parti."""
    from collections import Counter
    from pathlib import Path
    from cluster.config import load_config
    from cluster.prompts import read_prompts
    repo = Path(__file__).resolve().parents[1]
    parti = repo / "rewards" / "data" / "parti"
    rows = [r.split("\t") for r in (parti / "PartiPrompts.tsv").read_text(encoding="utf-8").split("\n")[1:] if r]
    items = read_prompts(parti / "parti_prompts.jsonl")
    assert len(items) == len(rows) == 1632
    assert [(it.prompt, it.metadata["tag"], it.metadata["challenge"]) for it in items] == \
        [(p.strip(), c, ch) for p, c, ch, _ in rows]
    tags = Counter(it.metadata["tag"] for it in items)
    assert len(tags) == 12 and tags["Animals"] == 314 and tags["Indoor Scenes"] == 40
    for d in ("show-o", "phi", "magvit"):
        (tmp_path / d).mkdir()
    train = tmp_path / "train.txt"
    train.write_text("a photo of a cat\na red car\n")
    cfg = load_config(repo / "configs" / "preference_1node_8gpu.yaml", [
        f"policy.init={tmp_path / 'show-o'}", f"policy.tokenizer.path={tmp_path / 'phi'}",
        f"policy.decoder.path={tmp_path / 'magvit'}", f"data.train_prompts={train}"])
    assert [r["name"] for r in cfg.rewards] == ["pickscore"]
    assert [r["name"] for r in cfg.eval.rewards] == ["pickscore", "hpsv2"]
    assert Path(cfg.data.eval_prompts).name == "parti_prompts.jsonl" and cfg.eval.samples_per_prompt == 2
