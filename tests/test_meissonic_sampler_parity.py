"""Meissonic through the policy interface, against the authors' sampling runs (tests/fixtures/meissonic, or
$MASKGRPO_PARITY_DIR/meissonic): the release's unmasking rule step for step given its recorded draws and Gumbel
noise (schedule, temperatures, re-masking), its guidance ``uncond + s·(cond − uncond)`` as our weight w = s − 1,
and the timestep convention T − 1 − i of `MeissonicPolicy.logits`.

Sizes and settings come from the fixture's manifest.json, so another set made the same way runs unchanged. The
logits at timesteps above 0 carry a platform spread of the float32 sinusoid of 1000·t (see
test_meissonic_parity.py): the step where t = 0 is checked at 1e-4, the others at a bound that a wrong guidance
weight or timestep exceeds a hundredfold.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from policy.factory import PolicyConfig
from policy.family import family
from policy.sampler import masked_counts, remask_positions
from policy.transition import code_logprob, codebook_logprobs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _file(directory: Path, name: str) -> Path:
    p = directory / name
    if not p.exists():
        pytest.fail(f"Meissonic parity fixture {p} not found (tests/fixtures/meissonic, or "
                    f"$MASKGRPO_PARITY_DIR/meissonic when set)")
    return p


@pytest.fixture(scope="module")
def ref(meissonic_fixture_dir):
    manifest = json.loads(_file(meissonic_fixture_dir, "manifest.json").read_text())
    vectors = load_file(str(_file(meissonic_fixture_dir, "vectors.safetensors")))
    return manifest, vectors


@pytest.fixture(scope="module")
def policy(meissonic_fixture_dir, ref):
    """The fixture's transformer loaded as a policy (`policy.init` = the fixture directory, released layout)."""
    manifest, _ = ref
    run = manifest["runs"]["cfg1"]
    h, w = manifest["latent_hw"]
    assert h == w, "the policy's code grid is square"
    meissonic = family("meissonic")
    arch, _ = meissonic.arch_from_directory(meissonic_fixture_dir, PolicyConfig(family="meissonic"))  # as preflight
    arch = replace(arch, grid_size=h, image_size=run["width"], crop=run["micro_conditioning"][2:4],
                   aesthetic_score=run["micro_conditioning"][4])
    cfg = PolicyConfig(family="meissonic", init=str(meissonic_fixture_dir), arch=arch)
    model = meissonic.build_model(cfg).eval()
    assert model.arch.micro_conditions() == [float(v) for v in run["micro_conditioning"]]
    return model


def _steps(manifest: dict, vectors: dict, run: str) -> list[dict[str, torch.Tensor]]:
    n = manifest["runs"][run]["steps_recorded"]
    return [{k.split("/")[-1]: v for k, v in vectors.items() if k.startswith(f"{run}/step{i}/")} for i in range(n)]


@pytest.mark.parametrize("run", ["cfg1", "cfg3"])
def test_parity_meissonic_unmasking_rule_step_for_step(run, ref, policy):
    """Given the release's drawn codes and Gumbel noise, our rule (`remask_positions`, the family's temperatures and
    the schedule `masked_counts`) re-masks exactly the positions the release re-masked, at every step."""
    manifest, vectors = ref
    steps = _steps(manifest, vectors, run)
    t_total, mask_id = len(steps), manifest["mask_token_id"]
    temperatures = vectors[f"{run}/temperatures"]
    t0, t1 = manifest["runs"][run]["temperature"]
    assert t1 == 0, "the family anneals the temperature to 0, as the release's (t0, 0)"
    n = steps[0]["sample_in"][0].numel()
    counts = masked_counts(n, t_total, "cosine", policy.schedule_precision)
    for i, s in enumerate(steps):
        assert int(s["timestep"]) == t_total - 1 - i                         # the pipeline counts T-1 ... 0
        assert policy.remask_temperature(float(t0), i, t_total) == pytest.approx(float(temperatures[i]), abs=1e-7)
        b = s["sample_in"].shape[0]
        codes_in = s["sample_in"].reshape(b, -1)
        unknown = codes_in == mask_id
        drawn = torch.where(unknown, s["pred_original_sample"].reshape(b, -1), -1)
        logprobs = codebook_logprobs(s["model_output"].permute(0, 2, 3, 1).reshape(b, n, -1))
        logp = code_logprob(logprobs, drawn)
        keep_masked = counts[i]
        gumbel = s["gumbel"].reshape(b, -1) if keep_masked else torch.zeros(b, n)
        remask, _ = remask_positions(logp, unknown, gumbel, policy.remask_temperature(float(t0), i, t_total),
                                     keep_masked)
        out = torch.where(unknown & ~remask, drawn, torch.where(unknown, mask_id, codes_in))
        assert torch.equal(out, s["prev_sample"].reshape(b, -1)), f"{run} step {i}"
        assert (remask.sum(-1) == keep_masked).all(), f"{run} step {i}: mask_len"


@pytest.mark.parametrize("run", ["cfg1", "cfg3"])
def test_parity_meissonic_guidance_and_timesteps_through_the_policy(run, ref, policy):
    """`MeissonicPolicy.logits` at step i (timestep T − 1 − i, the manifest's micro-conditions) and guidance weight
    w = s − 1 reproduce the logits the release's scheduler received: ``uncond + s·(cond − uncond)`` with the
    negative prompt's embeddings (s = 1: one branch, no guidance)."""
    manifest, vectors = ref
    scale = float(manifest["runs"][run]["guidance_scale"])
    w = policy.guidance_weight(scale)
    assert w == (scale - 1.0 if scale > 1.0 else 0.0)
    cond = {"pooled": vectors["pooled"], "hidden": vectors["encoder_hidden_states"]}
    null = {"pooled": vectors["negative_pooled"], "hidden": vectors["negative_encoder_hidden_states"]}
    steps = _steps(manifest, vectors, run)
    t_total, mask_id = len(steps), manifest["mask_token_id"]
    errors = []
    with torch.no_grad():
        for i, s in enumerate(steps):
            b = s["sample_in"].shape[0]
            codes = s["sample_in"].reshape(b, -1)
            codes = torch.where(codes == mask_id, -1, codes)
            logits = policy.logits(policy.context([(cond, 1)], inference=True), codes, i, t_total)
            if w:
                uncond = policy.logits(policy.context([(null, 1)], inference=True), codes, i, t_total)
                guided = (1.0 + w) * logits.float() - w * uncond.float()
            else:
                guided = logits.float()
            expected = s["model_output"].permute(0, 2, 3, 1).reshape(b, codes.shape[1], -1)
            errors.append(float((guided - expected).abs().max()))
            # and the sampler's own guided log-probs (the one formula the sampler and learner use)
            got = codebook_logprobs(logits, uncond if w else None, w)
            torch.testing.assert_close(got, expected.log_softmax(-1), atol=5e-3 * (1 + 2 * w), rtol=0)
    assert errors[-1] <= 1e-4 * (1 + 2 * w), f"t = 0: {errors[-1]:.2e}"                       # exact where t = 0
    assert max(errors) <= 5e-3 * (1 + 2 * w), errors          # a wrong w or timestep is off by O(0.1 .. 1)
    # the bound does separate a wrong guidance weight: the pipeline's own s in place of s − 1
    if w:
        wrong = (1.0 + scale) * logits.float() - scale * uncond.float()
        assert float((wrong - expected).abs().max()) > 100 * max(errors[-1], 1e-6)
