"""Reward interface, registry, weighted combination and NaN handling (no models)."""
import pytest
import torch

from rewards.base import (MultiRewardOutput, Reward, RewardError, RewardOutput, WeightedRewards, build_reward,
                          build_rewards, register_reward, reward_names, summarize)
from tests.helpers.rewards import ConstantReward, PixelMeanReward


def _batch(b=4, h=8, w=8):
    images = torch.stack([torch.full((h, w, 3), 50 * i, dtype=torch.uint8) for i in range(b)])
    return images, [f"prompt {i}" for i in range(b)], [{"i": i} for i in range(b)]


def test_builtin_names_known_without_importing_models():
    assert {"clip_score", "hpsv2", "pickscore", "aesthetic", "geneval"} <= set(reward_names())


def test_register_and_build_by_name_and_import_path():
    @register_reward("test_double_mean")
    class DoubleMean(Reward):
        def __init__(self, factor: float = 2.0):
            self.factor = factor

        def _score(self, images, prompts, metadata):
            return self.factor * images.float().mean(dim=(1, 2, 3))

    images, prompts, meta = _batch()
    r = build_reward({"name": "test_double_mean", "weight": 3.0, "factor": 1.0})
    assert r.name == "test_double_mean"
    out = r.score(images, prompts, meta)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (4,)
    assert torch.allclose(out.scores, torch.tensor([0.0, 50.0, 100.0, 150.0]))
    r2 = build_reward({"name": "tests.helpers.rewards:ConstantReward", "value": 2.5, "label": "const"})
    assert isinstance(r2, ConstantReward) and r2.name == "const"
    assert torch.equal(r2.score(images, prompts).scores, torch.full((4,), 2.5))


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*hpsv2"):
        build_reward({"name": "nope"})
    with pytest.raises(ValueError, match="no 'name'"):
        build_reward({"weight": 1.0})
    with pytest.raises(ValueError, match="cannot build reward 'tests.helpers.rewards:ConstantReward'"):
        build_reward({"name": "tests.helpers.rewards:ConstantReward", "bogus_option": 1})
    with pytest.raises(ValueError, match="has no attribute"):
        build_reward({"name": "tests.helpers.rewards:NoSuchReward"})


def test_input_validation():
    r = ConstantReward()
    images, prompts, _ = _batch()
    with pytest.raises(ValueError, match="uint8"):
        r.score(images.float(), prompts)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        r.score(images, prompts[:3])
    with pytest.raises(ValueError, match="metadata"):
        r.score(images, prompts, [{}])


def test_micro_batches_are_concatenated():
    images, prompts, meta = _batch(b=5)
    seen = []

    class Recording(PixelMeanReward):
        def _score(self, images, prompts, metadata):
            seen.append(images.shape[0])
            return super()._score(images, prompts, metadata)

    r = Recording()
    r.batch_size = 2
    out = r.score(images, prompts, meta)
    assert seen == [2, 2, 1]
    assert torch.allclose(out.scores, images.float().mean(dim=(1, 2, 3)) / 255)
    assert out.details["prompt_len"].shape == (5,)


def test_weighted_sum_and_raw_components():
    images, prompts, meta = _batch()
    combo = build_rewards([{"name": "tests.helpers.rewards:PixelMeanReward", "label": "pix", "weight": 2.0},
                           {"name": "tests.helpers.rewards:ConstantReward", "label": "one", "value": 1.0, "weight": -0.5}])
    out = combo.score(images, prompts, meta)
    assert isinstance(out, MultiRewardOutput)
    pix = images.float().mean(dim=(1, 2, 3)) / 255
    assert torch.allclose(out.components["pix"], pix)
    assert torch.equal(out.components["one"], torch.ones(4))
    assert torch.allclose(out.scores, 2.0 * pix - 0.5)
    assert out.weights == {"pix": 2.0, "one": -0.5}
    assert set(out.details) == {"pix/prompt_len"}
    logs = summarize(out)
    assert logs["reward/one/mean"] == 1.0 and logs["reward/one/std"] == 0.0
    assert logs["reward/pix/mean"] == pytest.approx(float(pix.mean()))
    assert logs["reward/total/mean"] == pytest.approx(float(out.scores.mean()))


def test_weighted_rewards_give_each_reward_what_it_needs():
    """`inputs` (the reward worker's per-sample values) reach only the rewards that name them; a reward that does
    not need images gets none. Without `inputs` (the reward server) the metadata passes as sent."""
    from rewards.base import reward_class
    from rewards.geneval import GenEvalReward
    images, prompts, meta = _batch()
    seen = "tests.helpers.rewards:SeenInputsReward"
    combo = build_rewards([{"name": seen, "label": "bare"},
                           {"name": seen, "label": "sc", "needs": ["images", "self_certainty"]}])
    assert combo.components[1][2].needs == ("images", "self_certainty")
    inputs = [{"self_certainty": -1.0, "codes": [1, 2]} for _ in range(4)]
    out = combo.score(images, prompts, meta, inputs)
    assert out.details["bare/height"].tolist() == [0] * 4 and out.details["sc/height"].tolist() == [8] * 4
    assert out.details["bare/self_certainty"].tolist() == [0] * 4 and out.details["sc/self_certainty"].tolist() == [1] * 4
    assert out.details["sc/codes"].tolist() == [-1] * 4                       # not named, not given
    served = combo.score(images, prompts, [dict(m, self_certainty=-1.0) for m in meta])
    assert served.details["bare/self_certainty"].tolist() == [1] * 4          # as the client sent it
    assert reward_class({"name": "geneval"}) is GenEvalReward and reward_class({"name": "no.such:Reward"}) is Reward
    assert reward_class("self_certainty").needs == ("self_certainty",) and PixelMeanReward.needs == ("images",)


def test_duplicate_labels_rejected():
    with pytest.raises(ValueError, match="unique"):
        build_rewards([{"name": "tests.helpers.rewards:ConstantReward"}, {"name": "tests.helpers.rewards:ConstantReward"}])


def test_nan_raises_naming_reward_and_sample():
    images, prompts, meta = _batch()
    combo = build_rewards([{"name": "tests.helpers.rewards:ConstantReward", "label": "ok"},
                           {"name": "tests.helpers.rewards:NaNReward", "label": "nanny", "index": 2}])
    with pytest.raises(RewardError, match=r"'nanny' returned NaN .*sample 2") as ei:
        combo.score(images, prompts, meta)
    assert ei.value.reward == "nanny" and ei.value.sample == 2
    # directly, too
    with pytest.raises(RewardError, match="sample 1"):
        build_reward({"name": "tests.helpers.rewards:NaNReward", "index": 1}).score(images, prompts)


def test_failure_wrapped_with_reward_name_and_picklable():
    import pickle
    images, prompts, meta = _batch()
    combo = WeightedRewards([("boom", 1.0, build_reward({"name": "tests.helpers.rewards:FailingReward"}))])
    with pytest.raises(RewardError, match="reward 'boom' failed on a batch of 4: RuntimeError") as ei:
        combo.score(images, prompts, meta)
    e = pickle.loads(pickle.dumps(ei.value))
    assert e.reward == "boom" and "boom" in str(e)


def test_wrong_shape_output_rejected():
    class Bad(Reward):
        def _score(self, images, prompts, metadata):
            return RewardOutput(torch.zeros(images.shape[0] + 1))

    images, prompts, _ = _batch()
    with pytest.raises(RewardError, match="shape"):
        Bad().score(images, prompts)
