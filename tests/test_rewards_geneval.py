"""GenEval rule engine (hand-checked verdicts per category), detector post-processing and the geneval reward."""
import json
import numpy as np
import pytest
import torch

from policy.weights import CheckpointError
from rewards.base import build_reward
from rewards.geneval import (COCO_CLASSES, GENEVAL_METADATA, GENEVAL_OBJECT_NAMES, GenEvalEngine,
                             relative_position, select_objects, summarize_geneval)
from rewards.types import GENEVAL_TAGS, Detection, GenEvalItem

METADATA = GENEVAL_METADATA


def det(label, score=0.95, box=(0, 0, 10, 10), color=None, mask=None):
    return Detection(label=label, score=score, box=tuple(float(v) for v in box), color=color, mask=mask)


def judge(item, dets, **kw):
    return GenEvalEngine(**kw).evaluate_batch([GenEvalItem.from_json(item)], [dets])[0]


# ---------------------------------------------------------------------------------------------- categories

def test_single_object_threshold_is_strict():
    item = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    assert judge(item, [det("cat", 0.31)]).correct
    r = judge(item, [det("cat", 0.3), det("dog", 0.99)])        # 0.3 is not > 0.3
    assert not r.correct and (r.met, r.total) == (0, 1) and "expected cat>=1, found 0" in r.reason


def test_two_object_fraction():
    item = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
            "prompt": "a photo of a cat and a dog"}
    assert judge(item, [det("dog", 0.5), det("cat", 0.4)]).correct
    r = judge(item, [det("cat", 0.8)])
    assert not r.correct and r.fraction == 0.5


def test_counting_uses_0_9_for_every_class_and_exclude():
    item = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
    dets = [det("clock", 0.95), det("clock", 0.92), det("clock", 0.85)]
    r = judge(item, dets)
    assert r.correct and (r.met, r.total) == (2, 2)             # the 0.85 clock does not count at 0.9
    r = judge(item, dets + [det("clock", 0.91)])                 # three confident clocks: exclude fails
    assert not r.correct and (r.met, r.total) == (1, 2) and "expected clock<3, found 3" in r.reason
    r = judge(item, [det("clock", 0.95), det("clock", 0.89)])
    assert not r.correct and r.fraction == 0.5                   # include fails, exclude holds
    # the same detections under a non-counting tag use 0.3: then all three clocks count
    assert not judge(dict(item, tag="two_object"), dets).correct


def test_at_most_16_objects_per_class():
    item = {"tag": "counting", "include": [{"class": "book", "count": 4}], "exclude": [{"class": "book", "count": 17}],
            "prompt": "a photo of four books"}
    dets = [det("book", 0.91 + i * 0.001) for i in range(20)]
    assert judge(item, dets).correct                             # 20 detected, 16 kept, 16 < 17
    assert len(select_objects(dets, "counting")["book"]) == 16
    assert not judge(item, dets, max_objects=17).correct


def test_colors_checked_on_top_detections():
    item = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    assert judge(item, [det("car", 0.9, color="red")]).correct
    r = judge(item, [det("car", 0.9, color="blue"), det("car", 0.8, color="red")])   # only the best car is judged
    assert not r.correct and (r.met, r.total) == (1, 2)
    assert "expected red car>=1, found 0 red; and 1 blue" in r.reason
    r = judge(item, [])
    assert (r.met, r.total) == (0, 2)                            # no car: its colour is not met either


def test_colors_from_a_classifier_batched_once():
    calls = []

    class Stub:
        def classify(self, images, queries):
            calls.append([(i, d.label, cls) for i, d, cls in queries])
            return ["red" if d.score > 0.85 else "green" for _, d, _ in queries]

    items = [GenEvalItem.from_json({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
                                    "prompt": "a red car"}),
             GenEvalItem.from_json({"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "green"},
                                                                     {"class": "cup", "count": 1, "color": "red"}],
                                    "prompt": "a green car and a red cup"})]
    dets = [[det("car", 0.9)], [det("car", 0.8), det("cup", 0.95, color="blue")]]
    engine = GenEvalEngine(color_classifier=Stub())
    res = engine.evaluate_batch(items, dets, images=torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    assert calls == [[(0, "car", "car"), (1, "car", "car")]]     # one call; the cup's exact colour is used as is
    assert res[0].correct and not res[1].correct and (res[1].met, res[1].total) == (3, 4)
    with pytest.raises(ValueError, match="no colour classifier"):
        GenEvalEngine().evaluate_batch(items, dets)


def test_color_attr():
    item = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                             {"class": "apple", "count": 1, "color": "black"}],
            "prompt": "a photo of a purple wine glass and a black apple"}
    assert judge(item, [det("wine glass", color="purple"), det("apple", color="black")]).correct
    r = judge(item, [det("wine glass", color="black"), det("apple", color="purple")])
    assert not r.correct and (r.met, r.total) == (2, 4)


def test_relative_position_formula():
    # A centred 150 px right of B, boxes 100 wide: offset 150, shrunk by 0.1 * 200 -> 130 / 150 > 0.5
    assert relative_position((150, 0, 250, 100), (0, 0, 100, 100)) == {"right of"}
    assert relative_position((0, 0, 100, 100), (150, 0, 250, 100)) == {"left of"}
    assert relative_position((0, 150, 100, 250), (0, 0, 100, 100)) == {"below"}
    assert relative_position((0, -150, 100, -50), (0, 0, 100, 100)) == {"above"}
    # 10 px apart with 100 px boxes: inside the 0.1 x 200 margin -> no relation; without margin -> right of
    assert relative_position((10, 0, 110, 100), (0, 0, 100, 100)) == set()
    assert relative_position((10, 0, 110, 100), (0, 0, 100, 100), margin=0.0) == {"right of"}
    # diagonal, small boxes (sizes 10): offset (100, 100) -> (98, 98) / 141.4 = 0.69 on both axes
    assert relative_position((95, 95, 105, 105), (-5, -5, 5, 5)) == {"right of", "below"}
    # offset (100, 60): shrunk (98, 58) / 116.6 = (0.840, 0.497): y just under 0.5 -> only "right of"
    assert relative_position((95, 55, 105, 65), (-5, -5, 5, 5)) == {"right of"}
    # offset (100, 62): (98, 60) / 117.7 = (0.833, 0.510) -> both
    assert relative_position((95, 57, 105, 67), (-5, -5, 5, 5)) == {"right of", "below"}


def test_position_clause():
    item = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear"}
    bear = det("teddy bear", box=(0, 0, 100, 100))
    assert judge(item, [bear, det("dog", box=(150, 0, 250, 100))]).correct
    r = judge(item, [bear, det("dog", box=(10, 0, 110, 100))])        # within the margin
    assert not r.correct and (r.met, r.total) == (2, 3) and "found no relation to target" in r.reason
    assert judge(item, [bear, det("dog", box=(10, 0, 110, 100))], position_margin=0.0).correct
    r = judge(item, [bear, det("dog", box=(-150, 0, -50, 100))])
    assert "expected dog right of target, found left of target" in r.reason
    r = judge(item, [det("dog", box=(150, 0, 250, 100))])             # no target: count and position unmet
    assert (r.met, r.total) == (1, 3) and "no target for dog to be right of" in r.reason


def test_position_needs_colour_first_and_judges_every_pair():
    item = {"tag": "position", "include": [{"class": "cup", "count": 2},
                                           {"class": "cat", "count": 1, "color": "red", "position": ["above", 0]}],
            "prompt": "a red cat above two cups"}
    cups = [det("cup", 0.9, box=(0, 200, 50, 250)), det("cup", 0.8, box=(300, 200, 350, 250))]
    assert judge(item, cups + [det("cat", color="red", box=(150, 0, 200, 50))]).correct
    r = judge(item, cups + [det("cat", color="blue", box=(150, 0, 200, 50))])
    assert (r.met, r.total) == (2, 4)                                 # colour unmet -> position not met
    # the cat is above the near cup, but for the far cup the offset is mostly sideways: "left of" only
    r = judge(item, cups + [det("cat", color="red", box=(0, 150, 50, 190))])
    assert not r.correct and (r.met, r.total) == (3, 4) and "found left of target" in r.reason


def test_fraction_and_strict_on_every_benchmark_prompt():
    """A perfect synthetic scene passes every one of the 553 prompts; an empty one fails all."""
    items = [GenEvalItem.from_json(json.loads(l)) for l in METADATA.read_text().splitlines() if l.strip()]
    assert len(items) == 553 and {i.tag for i in items} == set(GENEVAL_TAGS)
    place = {"left of": (-200, 0), "right of": (200, 0), "above": (0, -200), "below": (0, 200)}
    scenes = []
    for it in items:
        dets, centres = [], []
        for k, req in enumerate(it.include):
            cx, cy = 500, 500
            if "position" in req:
                dx, dy = place[req["position"][0]]
                tx, ty = centres[req["position"][1]]
                cx, cy = tx + dx, ty + dy
            centres.append((cx, cy))
            for j in range(req["count"]):
                dets.append(det(req["class"], 0.95, (cx - 20 + j, cy - 20, cx + 20 + j, cy + 20), req.get("color", "red")))
        scenes.append(dets)
    res = GenEvalEngine().evaluate_batch(items, scenes)
    assert all(r.correct and r.fraction == 1.0 for r in res), [r.reason for r in res if not r.correct][:3]
    empty = GenEvalEngine().evaluate_batch(items, [[] for _ in items])
    assert not any(r.correct for r in empty)
    # counting prompts keep their exclude clause met on an empty image
    assert all(r.fraction == (0.5 if it.tag == "counting" else 0.0) for it, r in zip(items, empty))


def test_packaged_geneval_data_matches_the_class_list():
    """GenEval's prompts ship inside the package (rewards/data/geneval), with their licence notice."""
    names = [l.strip() for l in GENEVAL_OBJECT_NAMES.read_text().splitlines() if l.strip()]
    assert tuple(names) == COCO_CLASSES
    assert "MIT License" in (GENEVAL_METADATA.parent / "LICENSE").read_text()
    for line in GENEVAL_METADATA.read_text().splitlines():
        item = GenEvalItem.from_json(json.loads(line))
        assert all(req["class"] in COCO_CLASSES for req in item.include)


def test_summary_is_mean_of_category_accuracies():
    s = summarize_geneval(["single_object", "single_object", "counting", "position"], [True, False, True, 0.0])
    assert s["categories"] == {"single_object": 0.5, "counting": 1.0, "position": 0.0}
    assert s["overall"] == pytest.approx(0.5) and s["images"] == 4     # (0.5 + 1 + 0) / 3, not 2 / 4
    assert list(s["categories"]) == ["single_object", "counting", "position"]


# ---------------------------------------------------------------------------------------------- reward

class ListDetector:
    """A detector returning fixed detections (the shapes world's exact detector plugs in the same way)."""

    def __init__(self, detections):
        self.detections = [[det(**d) for d in ds] for ds in detections]

    def detect(self, images):
        return self.detections[:images.shape[0]]


def test_geneval_reward_fraction_and_strict():
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
            {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
            {"geneval": {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}}]
    detections = [[{"label": "cat"}], [{"label": "dog"}], [{"label": "car", "color": "red"}]]
    images = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    spec = {"name": "geneval", "detector": {"name": f"{__name__}:ListDetector", "detections": detections}}
    out = build_reward(spec).score(images, ["a cat", "a cat and a dog", "a red car"], meta)
    assert torch.equal(out.scores, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(out.details["strict"], torch.tensor([1.0, 0.0, 1.0]))
    strict = build_reward({**spec, "strict": True}).score(images, ["a", "b", "c"], meta)
    assert torch.equal(strict.scores, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="GenEval line"):
        build_reward(spec).score(images, ["a", "b", "c"], [{}, {}, {}])


# ---------------------------------------------------------------------------------------------- detector

def test_instance_postprocess_scores_boxes_and_crop():
    from rewards.mask2former import instance_postprocess, masks_to_boxes
    q, c = 3, 4
    logits = torch.full((q, c + 1), -10.0)
    logits[0, 2] = 10.0            # query 0: class 2, confident
    logits[1, c] = 10.0            # query 1: no object
    logits[2, 1] = 0.0             # query 2: class 1 vs no-object (others -10): p ~ 0.5
    logits[2, c] = 0.0
    masks = torch.full((q, 32, 32), -5.0)
    masks[0, 4:12, 8:20] = 5.0
    masks[2, 20:30, 0:4] = 5.0
    masks[2, 20:24, 0:4] = 1.0
    labels, scores, boxes, bin_masks = instance_postprocess(logits, masks, (32, 32), (32, 32), (32, 32),
                                                            max_per_image=100, min_score=0.3)
    assert labels.tolist() == [2, 1]
    assert boxes.tolist() == [[8, 4, 20, 12], [0, 20, 4, 30]]
    s = torch.sigmoid(torch.tensor(5.0))
    p2 = torch.softmax(logits[2], 0)[1]
    assert torch.allclose(scores, torch.stack([torch.softmax(logits[0], 0)[2] * s,
                                               p2 * (24 * s + 16 * torch.sigmoid(torch.tensor(1.0))) / 40]), atol=1e-5)
    assert bin_masks.shape == (2, 32, 32) and bin_masks[0].sum() == 8 * 12
    # padded input: only the valid top 16 rows are the image, scaled back to a 16x32 original
    labels, scores, boxes, _ = instance_postprocess(logits, masks, (32, 32), (16, 32), (16, 32), min_score=0.3)
    assert labels.tolist() == [2] and boxes.tolist() == [[8, 4, 20, 12]]
    assert masks_to_boxes(torch.zeros(1, 5, 5, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


@pytest.fixture(scope="module")
def tiny_m2f(tmp_path_factory):
    from rewards.testing import make_tiny_mask2former, make_tiny_open_clip
    d = tmp_path_factory.mktemp("m2f")
    cfg, ckpt = make_tiny_open_clip(d / "clip", name="tiny-clip-colors", quick_gelu=True)
    return {"m2f": make_tiny_mask2former(d / "m2f"), "clip_cfg": cfg, "clip": ckpt, "dir": d}


def test_mask2former_detector_through_real_loader(tiny_m2f):
    from rewards.detectors import build_detector
    from rewards.mask2former import masks_to_boxes
    detector = build_detector({"name": "mask2former", "path": tiny_m2f["m2f"], "shortest_edge": 64,
                               "longest_edge": 128, "min_score": 0.0})
    images = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8)
    dets = detector.detect(images)
    assert len(dets) == 2 and all(len(d) > 0 for d in dets)
    for d in dets[0]:
        assert d.label in COCO_CLASSES and 0 <= d.score <= 1 and d.mask.shape == (48, 64)
        if d.mask.any():
            assert list(d.box) == masks_to_boxes(torch.as_tensor(d.mask)[None])[0].tolist()


def test_mask2former_checkpoint_errors(tiny_m2f, tmp_path):
    from rewards.detectors import build_detector
    from rewards.testing import make_tiny_mask2former
    with pytest.raises(CheckpointError, match="not found; expected .*mask2former"):
        build_detector({"name": "mask2former", "path": str(tmp_path / "none")})
    with pytest.raises(CheckpointError, match="10 classes but 80"):
        build_detector({"name": "mask2former", "path": make_tiny_mask2former(tmp_path / "m10", num_labels=10)})


def test_clip_color_classifier(tiny_m2f):
    from rewards.colors import ClipColorClassifier, masked_crop
    img = torch.zeros(20, 30, 3, dtype=torch.uint8)
    img[5:10, 10:20] = torch.tensor([200, 10, 10], dtype=torch.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[6:9, 11:19] = True
    crop = masked_crop(img, det("apple", box=(10.4, 5, 20, 10.6), mask=mask))
    assert crop.shape == (3, 6, 10)                       # rounded box, as PIL's crop rounds
    assert torch.allclose(crop[:, 0, 0], torch.full((3,), 153 / 255))   # outside the mask: grey #999
    assert torch.allclose(crop[:, 2, 2], torch.tensor([200, 10, 10]) / 255)
    clf = ClipColorClassifier(tiny_m2f["clip"], model_config=tiny_m2f["clip_cfg"])
    queries = [(0, det("apple", box=(10, 5, 20, 10), mask=mask), "apple"), (1, det("cup", box=(0, 0, 30, 20)), "cup")]
    colors = clf.classify(torch.stack([img, 255 - img]), queries)
    assert len(colors) == 2 and all(c in clf.colors for c in colors)
    assert clf.text_classifier("apple").shape == (32, 10)


def test_geneval_reward_with_mask2former_and_clip_colors(tiny_m2f):
    spec = {"name": "geneval", "strict": False,
            "detector": {"name": "mask2former", "path": tiny_m2f["m2f"], "shortest_edge": 64, "longest_edge": 128,
                         "min_score": 0.0},
            "color_classifier": {"name": "clip", "path": tiny_m2f["clip"], "model_config": tiny_m2f["clip_cfg"]},
            "threshold": 0.0}                              # random weights: every detection counts
    reward = build_reward(spec)
    images = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8)
    meta = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
            {"tag": "two_object", "include": [{"class": "car", "count": 1}, {"class": "bus", "count": 1}]}]
    out = reward.score(images, ["a red car", "a car and a bus"], meta)
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()


def test_geneval_reward_on_the_shapes_world():
    """The shapes world's exact detector plugs in by name: its prompt-satisfying scenes all pass."""
    from rewards.shapes import all_prompts, render_batch
    items = all_prompts()
    images = torch.as_tensor(render_batch(items, np.random.default_rng(0)))
    reward = build_reward({"name": "geneval", "detector": {"name": "shapes"}, "strict": True})
    prompts, meta = [i.prompt for i in items], [i.to_json() for i in items]
    assert torch.equal(reward.score(images, prompts, meta).scores, torch.ones(len(items)))
    shuffled = reward.score(images.roll(1, 0), prompts, meta).scores          # each image under another prompt
    assert shuffled.mean() < 0.5


def test_worker_device_reaches_model_specs_only():
    from rewards.worker import RewardWorker
    worker = RewardWorker([{"name": "geneval", "detector": {"name": "shapes"}}], device="cpu")
    assert worker.labels() == ["geneval"]


class FixedDetector:
    """Returns the same detections for every image."""

    def __init__(self, dets):
        self.dets = dets

    def detect(self, images):
        return [list(self.dets) for _ in range(len(images))]


def test_max_extra_objects_closes_the_flooding_loophole():
    """GenEval passes an image flooded with objects for "a photo of a circle"; with max_extra_objects it fails."""
    import torch
    from rewards.geneval import GenEvalReward
    from rewards.types import Detection

    flood = [Detection("circle", 1.0, (4 * i, 0, 4 * i + 4, 4), color="red") for i in range(6)]
    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}]
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    plain = GenEvalReward(detector=FixedDetector(flood), strict=True)
    assert plain.score(images, ["a photo of a circle"], meta).scores.tolist() == [1.0]
    guarded = GenEvalReward(detector=FixedDetector(flood), strict=True, max_extra_objects=1)
    assert guarded.score(images, ["a photo of a circle"], meta).scores.tolist() == [0.0]
    lenient = GenEvalReward(detector=FixedDetector(flood[:2]), max_extra_objects=1)
    out = lenient.evaluate(images, ["a photo of a circle"], meta)[0]
    assert out.correct and out.met == out.total == 1
    flooded = guarded.evaluate(images, ["a photo of a circle"], meta)[0]
    assert not flooded.correct and flooded.fraction == 0.0 and "extra objects" in flooded.reason


def test_precision_weighted_fraction_penalises_unrequested_objects():
    import torch
    from rewards.geneval import GenEvalReward
    from rewards.types import Detection

    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}]
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    four = [Detection("circle", 1.0, (4 * i, 0, 4 * i + 4, 4), color="red") for i in range(4)]
    scored = GenEvalReward(detector=FixedDetector(four), precision_weighted=True).score(images, ["a photo of a circle"], meta)
    assert scored.scores.tolist() == [0.25] and scored.details["strict"].tolist() == [1.0]
    exact = GenEvalReward(detector=FixedDetector(four[:1]), precision_weighted=True).score(images, ["a circle"], meta)
    assert exact.scores.tolist() == [1.0]
