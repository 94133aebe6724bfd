"""Self-certainty: recorded by the sampler from the logits it already has, equal to a direct computation from the
policy's logits (with and without classifier-free guidance), and scored as a reward through the reward worker."""
from __future__ import annotations

import pytest
import torch

from policy.sampler import SamplerConfig, UnmaskingSampler
from rewards.base import RewardError, build_rewards
from rewards.worker import RewardWorker
from tests.helpers.rewards import make_palette_decoder

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44], []]


def _sample(model, guidance: float, steps: int = 5, group: int = 2):
    sampler = UnmaskingSampler(model, SamplerConfig(steps=steps, guidance_scale=guidance))
    seeds = list(range(7, 7 + len(PROMPTS) * group))
    return sampler.sample({"ids": model.layout.text_area(PROMPTS)}, seeds, group_size=group,
                          null_condition=model.padding_condition())


def _direct(model, traj) -> torch.Tensor:
    """Per step: replay the step's input codes, softmax the (guided) logits, mean over masked positions of p log p."""
    s = traj.guidance_weight
    out = torch.zeros(traj.batch_size, traj.num_steps, dtype=torch.float64)
    with torch.no_grad():
        for t in range(traj.num_steps):
            codes = traj.input_codes(torch.tensor([t]))[:, 0]
            if s:
                both = model.image_logits_full(torch.cat([traj.condition["ids"], traj.null_condition["ids"]]),
                                               torch.cat([codes, codes])).double()
                cond, uncond = both.chunk(2)
                logits = (1 + s) * cond - s * uncond
            else:
                logits = model.image_logits_full(traj.condition["ids"], codes).double()
            p = torch.softmax(logits, -1)
            plogp = (p * torch.log(p)).nan_to_num(0.0).sum(-1)            # [B, N]
            masked = (codes < 0).double()
            out[:, t] = (plogp * masked).sum(-1) / masked.sum(-1)
    return out


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_sampler_records_self_certainty_equal_to_direct_computation(tiny_showo, guidance):
    traj = _sample(tiny_showo, guidance)
    assert traj.self_certainty.shape == (traj.batch_size, traj.num_steps)
    assert (traj.self_certainty <= 0).all()
    torch.testing.assert_close(traj.self_certainty.double(), _direct(tiny_showo, traj), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.certainty_score().double(), _direct(tiny_showo, traj).mean(-1),
                               rtol=1e-4, atol=1e-5)
    sub = traj.select(torch.tensor([1, 4]))       # a sub-batch keeps its rows
    assert torch.equal(sub.self_certainty, traj.self_certainty[[1, 4]])


def test_guidance_changes_self_certainty(tiny_showo):
    """Under CFG it is measured on the guided distribution that is sampled, not the conditional one."""
    plain, guided = _sample(tiny_showo, 0.0), _sample(tiny_showo, 3.0)
    assert not torch.allclose(plain.self_certainty[:, 0], guided.self_certainty[:, 0])


def test_reward_worker_passes_self_certainty_to_the_reward(tiny_showo):
    traj = _sample(tiny_showo, 0.0)
    decoder = {"factory": "tests.helpers.rewards:make_palette_decoder", "height": 8, "width": 8, "codebook": 64}
    worker = RewardWorker([{"name": "self_certainty", "weight": 2.0},
                           {"name": "tests.helpers.rewards:ConstantReward", "label": "one", "value": 1.0}], decoder=decoder)
    items = [{"prompts": ["p"] * traj.batch_size, "metadata": [{"tag": "x"}] * traj.batch_size}]
    out = worker.score_groups(items, traj)[0]
    torch.testing.assert_close(out.components["self_certainty"], traj.certainty_score())
    torch.testing.assert_close(out.rewards, 2.0 * traj.certainty_score() + 1.0)


def test_each_reward_gets_exactly_what_it_needs_and_only_image_rewards_cost_a_decode(tiny_showo):
    traj = _sample(tiny_showo, 0.0)
    b = traj.batch_size
    calls = []

    decode = make_palette_decoder(8, 8, 64)

    def counting_decoder(codes):
        calls.append(len(codes))
        return decode(codes)
    seen = "tests.helpers.rewards:SeenInputsReward"
    worker = RewardWorker([{"name": "self_certainty"},
                           {"name": seen, "label": "nothing"},
                           {"name": seen, "label": "codes", "needs": ["codes"]},
                           {"name": seen, "label": "all", "needs": ["images", "codes", "self_certainty"]}],
                          decoder=counting_decoder)
    assert worker.needs == ["codes", "images", "self_certainty"]
    out = worker.score_groups([{"prompts": ["p"] * b, "metadata": [{"tag": "x"}] * b}], traj)[0]
    torch.testing.assert_close(out.components["self_certainty"], traj.certainty_score())
    codes = traj.final_codes.sum(-1).float()
    for label, height, certainty, code_sum in (("nothing", 0, 0, -torch.ones(b)), ("codes", 0, 0, codes),
                                               ("all", 8, 1, codes)):
        assert out.details[f"{label}/height"].tolist() == [height] * b, label
        assert out.details[f"{label}/self_certainty"].tolist() == [certainty] * b, label
        assert torch.equal(out.details[f"{label}/codes"], code_sum), label
    assert calls == [b]
    # a worker whose rewards need no images decodes nothing (it needs no decoder at all)
    alone = RewardWorker([{"name": "self_certainty"}])
    out = alone.score_groups([{"prompts": ["p"] * b}], traj)[0]
    torch.testing.assert_close(out.rewards, traj.certainty_score())
    assert alone.stats()["seconds"]["decode"] == 0.0
    with pytest.raises(ValueError, match=r"reward 'x' needs \['logits'\].*cannot give"):
        RewardWorker([{"name": seen, "label": "x", "needs": ["logits"]}])
    with pytest.raises(ValueError, match="needs must be a list"):
        RewardWorker([{"name": seen, "needs": "codes"}])


def test_self_certainty_without_the_trajectory_is_a_clear_error():
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(RewardError, match="needs metadata\\['self_certainty'\\]"):
        build_rewards([{"name": "self_certainty"}]).score(images, ["a", "b"], [{"self_certainty": -1.0}, {}])
    out = build_rewards([{"name": "self_certainty", "scale": 0.5}]).score(
        images, ["a", "b"], [{"self_certainty": -1.0}, {"self_certainty": -0.25}])
    assert out.scores.tolist() == [-0.5, -0.125]
