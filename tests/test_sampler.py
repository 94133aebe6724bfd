"""Unmasking sampler invariants on the tiny Show-o (seed 0)."""
from __future__ import annotations

import pytest
import torch

from algorithm.transitions import behaviour_logprob, transition_logprobs
from policy.sampler import SamplerConfig, UnmaskingSampler, masked_counts
from algorithm.transitions import TRANSITION_NAMES as TRANSITIONS
from policy.trajectory import Trajectory

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58], []]


def _sample(model, steps=6, group=3, guidance=0.0, reuse=True, seeds=None, prompts=PROMPTS, schedule="cosine"):
    sampler = UnmaskingSampler(model, SamplerConfig(steps=steps, guidance_scale=guidance, prefix_reuse=reuse,
                                                    schedule=schedule))
    text = {"ids": model.layout.text_area(prompts)}
    seeds = seeds if seeds is not None else list(range(100, 100 + len(prompts) * group))
    return sampler.sample(text, seeds, group_size=group, null_condition=model.padding_condition())


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_every_position_unmasked_once_and_schedule_followed(tiny_showo, schedule):
    traj = _sample(tiny_showo, steps=6, schedule=schedule)
    n, steps = traj.num_image_tokens, traj.num_steps
    assert (traj.unmask_step < steps).all(), "a position was never committed"
    _, kept, remasked = traj.step_masks()
    assert torch.equal(kept.sum(1), torch.ones_like(traj.unmask_step)), "each position kept exactly once"
    counts = masked_counts(n, steps, schedule)
    assert counts[-1] == 0
    assert remasked.sum(-1).tolist() == [counts] * traj.batch_size
    assert (traj.final_codes >= 0).all() and (traj.final_codes < tiny_showo.layout.codebook_size).all()


def test_trajectory_replays_to_final_codes(tiny_showo):
    traj = _sample(tiny_showo)
    codes = torch.full_like(traj.final_codes, -1)
    _, kept, _ = traj.step_masks()
    for t in range(traj.num_steps):
        assert torch.equal(codes, traj.input_codes(torch.tensor([t]))[:, 0])
        codes = torch.where(kept[:, t], traj.sampled_codes[:, t], codes)
    assert torch.equal(codes, traj.final_codes)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_batched_equals_single_samples(tiny_showo, guidance):
    batched = _sample(tiny_showo, group=2, guidance=guidance)
    seeds = list(range(100, 100 + 2 * len(PROMPTS)))
    for i, prompt in enumerate(PROMPTS):
        for g in range(2):
            row = i * 2 + g
            single = _sample(tiny_showo, group=1, guidance=guidance, prompts=[prompt], seeds=[seeds[row]])
            assert torch.equal(single.final_codes[0], batched.final_codes[row])
            assert torch.equal(single.unmask_step[0], batched.unmask_step[row])
            torch.testing.assert_close(single.token_logprob[0], batched.token_logprob[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_prefix_reuse_changes_nothing(tiny_showo, guidance):
    a = _sample(tiny_showo, guidance=guidance, reuse=True)
    b = _sample(tiny_showo, guidance=guidance, reuse=False)
    assert torch.equal(a.final_codes, b.final_codes)
    torch.testing.assert_close(a.token_logprob, b.token_logprob, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_recorded_behaviour_logprobs_equal_recomputed(tiny_showo, transition, guidance):
    traj = _sample(tiny_showo, guidance=guidance)
    with torch.no_grad():
        current = transition_logprobs(tiny_showo, traj, transition).logprob
    torch.testing.assert_close(current, behaviour_logprob(traj, transition), rtol=1e-4, atol=1e-4)
    # a subset of steps scores the same values
    steps = torch.tensor([0, 3, 5])
    with torch.no_grad():
        sub = transition_logprobs(tiny_showo, traj, transition, steps=steps).logprob
    torch.testing.assert_close(sub, current[:, steps], rtol=1e-5, atol=1e-5)


def test_same_seed_same_rollout_and_trajectory_select_concat(tiny_showo):
    a, b = _sample(tiny_showo), _sample(tiny_showo)
    assert torch.equal(a.final_codes, b.final_codes)
    c = _sample(tiny_showo, seeds=list(range(200, 209)))
    assert not torch.equal(a.final_codes, c.final_codes)
    parts = [a.select(slice(0, 3)), a.select(slice(3, 9))]
    joined = Trajectory.concat(parts)
    assert torch.equal(joined.sampled_codes, a.sampled_codes) and joined.sampled_codes.is_contiguous()


def test_sampler_rejects_bad_seeds_and_schedule(tiny_showo):
    with pytest.raises(ValueError, match="one seed per sample"):
        _sample(tiny_showo, seeds=[1, 2])
    with pytest.raises(ValueError, match="unknown mask schedule"):
        SamplerConfig(schedule="zigzag")
