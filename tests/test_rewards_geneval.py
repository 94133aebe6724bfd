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
    detections = [[{"label": "cat"}], [{"label": "dog"}, {"label": "dog"}], [{"label": "car", "color": "red"}]]
    images = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    spec = {"name": "geneval", "detector": {"name": f"{__name__}:ListDetector", "detections": detections}}
    out = build_reward(spec).score(images, ["a cat", "a cat and a dog", "a red car"], meta)
    assert torch.equal(out.scores, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(out.details["strict"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(out.details["objects"], torch.tensor([1.0, 2.0, 1.0]))     # detected, asked for or not
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
    from benchmarks.tiny_models import make_tiny_mask2former, make_tiny_open_clip
    d = tmp_path_factory.mktemp("m2f")
    cfg, ckpt = make_tiny_open_clip(d / "clip", name="tiny-clip-colors", quick_gelu=True)
    return {"m2f": make_tiny_mask2former(d / "m2f"), "clip_cfg": cfg, "clip": ckpt, "dir": d}


@torch.no_grad()
def _reference_detections(model_dir, images, top_k=100):
    """mmdet's Mask2Former post-processing written out independently (numpy), on images that need no resize
    (48x64 with shortest edge 48 / longest 64): ImageNet-normalised pixels zero-padded to 64x64, the model's own
    forward, the top (query, class) pairs by class probability, masks upsampled x4 and cut to the image, binary at
    logit > 0, score = class probability x mean mask probability inside the mask, box = the mask's extent."""
    from transformers import Mask2FormerForUniversalSegmentation
    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    b, h, w, _ = images.shape
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.zeros((b, 3, 64, 64), dtype=np.float32)
    pixels[:, :, :h, :w] = ((images.numpy() / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    pmask = np.zeros((b, 64, 64), dtype=np.int64)
    pmask[:, :h, :w] = 1
    out = model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(pmask))
    result = []
    for cl, ml in zip(out.class_queries_logits.numpy(), out.masks_queries_logits):
        e = np.exp(cl - cl.max(-1, keepdims=True))
        probs = (e / e.sum(-1, keepdims=True))[:, :-1]
        order = np.argsort(-probs, axis=None, kind="stable")[:top_k]
        up = torch.nn.functional.interpolate(ml[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
        up = up[:, :h, :w].numpy().astype(np.float64)
        dets = []
        for flat in order:
            q, c = divmod(int(flat), probs.shape[1])
            m = up[q] > 0
            mask_score = (1 / (1 + np.exp(-up[q])) * m).sum() / (m.sum() + 1e-6)
            ys, xs = np.nonzero(m)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0)
            dets.append((COCO_CLASSES[c], probs[q, c] * mask_score, tuple(float(v) for v in box), m))
        result.append(dets)
    return result


def test_mask2former_detector_through_real_loader(tiny_m2f):
    from rewards.detectors import build_detector
    detector = build_detector({"name": "mask2former", "path": tiny_m2f["m2f"], "shortest_edge": 48,
                               "longest_edge": 64, "min_score": 0.0})
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8, generator=g)
    got = detector.detect(images)
    expected = _reference_detections(tiny_m2f["m2f"], images)
    assert [len(d) for d in got] == [len(d) for d in expected] == [100, 100]     # 8 queries x 80 classes, top 100
    for dets, refs in zip(got, expected):
        assert [d.label for d in dets] == [r[0] for r in refs]
        np.testing.assert_allclose([d.score for d in dets], [r[1] for r in refs], rtol=1e-4, atol=1e-7)
        assert [d.box for d in dets] == [r[2] for r in refs]
        assert all(np.array_equal(d.mask, r[3]) for d, r in zip(dets, refs))
    assert any(d.box != (0.0, 0.0, 0.0, 0.0) for d in got[0])                  # some masks are not empty
    # min_score drops pairs below it, nothing else
    strict = build_detector({"name": "mask2former", "path": tiny_m2f["m2f"], "shortest_edge": 48,
                             "longest_edge": 64, "min_score": 0.05}).detect(images)
    for dets, all_dets in zip(strict, got):
        assert [(d.label, d.box) for d in dets] == [(d.label, d.box) for d in all_dets if d.score >= 0.05]


def test_mask2former_checkpoint_errors(tiny_m2f, tmp_path):
    from rewards.detectors import build_detector
    from benchmarks.tiny_models import make_tiny_mask2former
    with pytest.raises(CheckpointError, match="not found; expected .*mask2former"):
        build_detector({"name": "mask2former", "path": str(tmp_path / "none")})
    with pytest.raises(CheckpointError, match="10 classes but 80"):
        build_detector({"name": "mask2former", "path": make_tiny_mask2former(tmp_path / "m10", num_labels=10)})


@torch.no_grad()
def _reference_colors(clip_cfg, clip_ckpt, crops, classname):
    """GenEval's zero-shot colour: 100 x cos(image, mean of the normalised template embeddings), by open_clip's
    own encoders on 64x64 crops (the tiny model's input size: no resize); returns (logits [n, 10], classifier)."""
    import open_clip
    from rewards.colors import TEMPLATES
    from rewards.types import GENEVAL_COLORS
    open_clip.add_model_config(clip_cfg)
    name = clip_cfg.rsplit("/", 1)[-1][:-5]
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
    model.load_state_dict(torch.load(clip_ckpt, weights_only=True))
    model.eval()
    tok = open_clip.get_tokenizer(name)
    per_color = []
    for c in GENEVAL_COLORS:
        emb = model.encode_text(tok([t.format(c=c, object=classname) for t in TEMPLATES]), normalize=True)
        per_color.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    classifier = torch.stack(per_color, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255 for c in crops]) - mean) / std
    return 100 * model.encode_image(x, normalize=True) @ classifier, classifier


def test_clip_color_classifier(tiny_m2f):
    from rewards.colors import ClipColorClassifier, masked_crop
    from rewards.types import GENEVAL_COLORS
    img = torch.zeros(20, 30, 3, dtype=torch.uint8)
    img[5:10, 10:20] = torch.tensor([200, 10, 10], dtype=torch.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[6:9, 11:19] = True
    crop = masked_crop(img, det("apple", box=(10.4, 5, 20, 10.6), mask=mask))
    assert crop.shape == (3, 6, 10)                       # rounded box, as PIL's crop rounds
    assert torch.allclose(crop[:, 0, 0], torch.full((3,), 153 / 255))   # outside the mask: grey #999
    assert torch.allclose(crop[:, 2, 2], torch.tensor([200, 10, 10]) / 255)

    # classification, against open_clip's own encoders on crops of exactly the model's input size
    g = torch.Generator().manual_seed(3)
    images = torch.randint(-12, 13, (2, 96, 128, 3), generator=g)          # coloured halves, a little noise
    for i, (left, right) in enumerate([((20, 200, 40), (20, 40, 220)), ((250, 250, 250), (5, 5, 5))]):
        images[i, :, :64] += torch.tensor(left)
        images[i, :, 64:] += torch.tensor(right)
    images = images.clamp(0, 255).to(torch.uint8)
    obj = np.zeros((96, 128), dtype=bool)
    obj[24:72, 8:56] = True                                               # pasted on grey outside the mask
    queries = [(0, det("apple", box=(0, 0, 64, 64)), "apple"), (0, det("apple", box=(64, 32, 128, 96)), "apple"),
               (1, det("apple", box=(0, 16, 64, 80), mask=obj), "apple"), (1, det("apple", box=(64, 0, 128, 64)), "apple")]
    crops = []
    for i, d, _ in queries:
        x = images[i].numpy().copy()
        if d.mask is not None:
            x[~d.mask] = 153
        x0, y0, x1, y1 = (int(v) for v in d.box)
        crops.append(x[y0:y1, x0:x1])
    logits, classifier = _reference_colors(tiny_m2f["clip_cfg"], tiny_m2f["clip"], crops, "apple")
    clf = ClipColorClassifier(tiny_m2f["clip"], model_config=tiny_m2f["clip_cfg"])
    torch.testing.assert_close(clf.text_classifier("apple"), classifier, rtol=1e-5, atol=1e-6)
    assert clf.text_classifier("apple").shape == (32, 10)
    expected = [GENEVAL_COLORS[int(k)] for k in logits.argmax(1)]
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3                # no near-tie: the argmax is well defined
    assert clf.classify(images, queries) == expected
    assert len(set(expected)) > 1                                 # the crops' content decides the colour


def test_geneval_reward_with_mask2former_and_clip_colors(tiny_m2f):
    """The reward's verdicts, worked out by hand from the detector's and the colour classifier's outputs."""
    from rewards.colors import ClipColorClassifier
    from rewards.detectors import build_detector
    det_spec = {"name": "mask2former", "path": tiny_m2f["m2f"], "shortest_edge": 48, "longest_edge": 64,
                "min_score": 0.0}
    spec = {"name": "geneval", "strict": False, "detector": det_spec,
            "color_classifier": {"name": "clip", "path": tiny_m2f["clip"], "model_config": tiny_m2f["clip_cfg"]},
            "threshold": 0.0}                              # random weights: every detection counts
    reward = build_reward(spec)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 48, 64, 3), dtype=torch.uint8, generator=g)
    meta = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
            {"tag": "two_object", "include": [{"class": "car", "count": 1}, {"class": "bus", "count": 1}]},
            {"tag": "colors", "include": [{"class": "person", "count": 1, "color": "green"}],
             "exclude": [{"class": "dog", "count": 2}]}]
    prompts = ["a red car", "a car and a bus", "a green person"]
    out = reward.score(images, prompts, meta)

    dets = build_detector(det_spec).detect(images)
    clf = ClipColorClassifier(tiny_m2f["clip"], model_config=tiny_m2f["clip_cfg"])

    def best(i, label):                                  # the highest-scoring detection of a class, or None
        found = sorted((d for d in dets[i] if d.label == label and d.score > 0), key=lambda d: -d.score)
        return found[0] if found else None

    def color_fraction(i, label, color):                 # requirements: the count, then the colour of the best
        top = best(i, label)
        if top is None:
            return 0.0
        return (1 + (clf.classify(images, [(i, top, label)])[0] == color)) / 2

    dogs = sum(1 for d in dets[2] if d.label == "dog" and d.score > 0)
    expected = [color_fraction(0, "car", "red"),
                ((best(1, "car") is not None) + (best(1, "bus") is not None)) / 2,
                (2 * color_fraction(2, "person", "green") + (dogs < 2)) / 3]
    torch.testing.assert_close(out.scores, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.details["strict"], torch.tensor([float(e == 1.0) for e in expected]))
    assert best(0, "car") is not None and best(2, "person") is not None   # the colour classifier was asked
    assert len(set(expected)) > 1, expected


def test_geneval_reward_on_the_shapes_world():
    """The shapes world's exact detector plugs in by name: its prompt-satisfying scenes all pass."""
    from worlds.shapes import all_prompts, render_batch
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
