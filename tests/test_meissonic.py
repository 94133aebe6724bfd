"""Mask-GRPO on Meissonic through the policy interface (configs/tiny_meissonic.yaml, seed 0): what the sampler
records is what the learner recomputes (all three transitions, with and without guidance), the learner's ZeRO
stages and LoRA agree, the product's run gives the same metrics on both backends and resumes exactly, and its
checkpoints hold the transformer in the released layout; models load by Hub id from an offline cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster.config import load_config, section
from learner import Learner
from learner.lora import adapter_parameters
from policy.factory import PolicyConfig, build_model, load_policy
from algorithm.transitions import all_transition_logprobs, behaviour_logprob
from policy.sampler import SamplerConfig, UnmaskingSampler
from algorithm.transitions import TRANSITION_NAMES as TRANSITIONS
from policy.weights import CheckpointError
from tests.updates import Planner, configs

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_meissonic.yaml")
FIXTURE = REPO / "tests" / "fixtures" / "meissonic"
PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle left of a circle"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _policy(**overrides):
    cfg = section(load_config(TINY, [f"{k}={v}" for k, v in overrides.items()]), "policy")
    return load_policy(cfg, "cpu", with_decoder=False)


def _sample(policy, guidance: float, group: int = 3, steps: int = 4, prompts=PROMPTS[:2], seed: int = 0):
    sampler = UnmaskingSampler(policy.model.eval(), SamplerConfig(steps=steps, guidance_scale=guidance))
    seeds = [seed * 1000 + i for i in range(len(prompts) * group)]
    return sampler.sample(policy.condition(prompts), seeds, group_size=group, null_condition=policy.null_condition())


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_meissonic_sampler_records_what_the_learner_recomputes(guidance):
    """The on-policy check: the behaviour log-probs the sampler records equal the learner's recomputation from
    the trajectory alone (the condition embeddings travel with it), for every transition; with guidance the
    negative prompt's branch is recomputed too."""
    policy = _policy()
    traj = _sample(policy, guidance)
    assert set(traj.condition) == {"pooled", "hidden"} and traj.condition["hidden"].shape[:2] == (6, 77)
    assert traj.guidance_weight == (2.0 if guidance else 0.0) and bool(traj.null_condition) == bool(guidance)
    assert (traj.unmask_step < traj.num_steps).all() and (traj.final_codes < policy.model.codebook_size).all()
    with torch.no_grad():
        recomputed = all_transition_logprobs(policy.model, traj)
        sub = all_transition_logprobs(policy.model, traj, torch.tensor([1, 3]), prefix_reuse=False)
    for t in TRANSITIONS:
        torch.testing.assert_close(recomputed[t].logprob, behaviour_logprob(traj, t), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sub[t].logprob, recomputed[t].logprob[:, [1, 3]], rtol=1e-5, atol=1e-4)
    # a sample is the same alone as in a batch (per-sample seeds)
    sampler = UnmaskingSampler(policy.model, SamplerConfig(steps=4, guidance_scale=guidance))
    null = policy.null_condition()
    both = sampler.sample(policy.condition(PROMPTS[:2]), [7, 8], 1, null_condition=null)
    alone = sampler.sample(policy.condition(PROMPTS[1:2]), [8], 1, null_condition=null)
    assert torch.equal(alone.final_codes[0], both.final_codes[1])
    torch.testing.assert_close(alone.token_logprob[0], both.token_logprob[1])


def _batch():
    policy = _policy()
    state = {k: v.clone() for k, v in policy.model.state_dict().items()}
    trajs = [_sample(policy, 0.0, group=3, prompts=[p], seed=g) for g, p in enumerate(PROMPTS[:2])]
    for g, tr in enumerate(trajs):
        tr.meta["group_id"] = g
    return state, trajs, [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.2, 0.9, 0.4])], PROMPTS[:2]


def _learner(state, **kw):
    model = _policy().model
    model.load_state_dict(state)
    base = dict(transition="candidate1", lr=1e-3, warmup_steps=0, total_steps=10, micro_batch_rows=5,
                selector="random_k", select_k=3, adam_eps=1e-3, seed=11)
    config = configs(**{**base, **kw})
    return Learner(model, *config), Planner(config)


@pytest.mark.slow
def test_meissonic_zero_stages_kl_and_lora():
    """ZeRO 0, 2 and 3 give the same gradients and update on Meissonic (the KL term against a frozen reference
    on), and LoRA trains only its adapters on the family's layers, starting equal to the base."""
    state, trajs, rewards, prompts = _batch()
    grads, weights = {}, {}
    for stage in (0, 2, 3):
        learner, planner = _learner(state, zero_stage=stage, kl_beta=0.01, extra_deepspeed={
            "zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {})
        stats = learner.accumulate_gradients(planner.plan(trajs, rewards, prompts).groups)
        grads[stage] = learner.full_gradients()
        metrics = learner.apply_update(stats).metrics()
        assert metrics["kl"] >= 0.0 and metrics["nonfinite_skipped"] == 0
        weights[stage] = learner.gathered_state_dict()
    scale = max(g.abs().max().item() for g in grads[0].values())
    assert scale > 0
    for stage in (2, 3):
        assert set(grads[stage]) == set(grads[0])
        for k, g in grads[0].items():
            assert (grads[stage][k] - g).abs().max().item() <= 1e-5 * scale, (stage, k)
        for k, w in weights[0].items():
            assert (weights[stage][k].float() - w.float()).abs().max().item() <= 1e-5 * max(w.abs().max().item(), 1e-3)
    assert max((weights[0][k] - state[k]).abs().max().item() for k in state) > 1e-5          # it trained

    lora, planner = _learner(state, lora={"rank": 2, "alpha": 4.0}, zero_stage=0, lr=1e-2)
    names = {n for n, _ in adapter_parameters(lora.policy)}
    assert names and all(p.requires_grad == (n in names) for n, p in lora.policy.named_parameters())
    assert sorted(lora.config.lora.target_modules) == sorted(lora.policy.lora_targets)
    with torch.no_grad():
        before = all_transition_logprobs(lora.policy, trajs[0])["candidate1"].logprob
        base = all_transition_logprobs(_learner(state)[0].policy, trajs[0])["candidate1"].logprob
    torch.testing.assert_close(before, base)                                      # B = 0: exactly the base
    planner.train(lora, trajs, rewards, prompts)
    buckets = list(lora.iter_weight_buckets())
    assert {n for b in buckets for n in b.names} == names                          # only adapters hand over


def _run(out: Path, *overrides: str) -> list[dict]:
    from cluster.train import train
    train(load_config(TINY, [f"output_dir={out}", "learner.warmup_steps=0", "learner.lr=1e-3",
                             "eval.at_start=false", "save_every=2", *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.slow
def test_meissonic_tiny_run_same_on_both_backends_resumes_exactly_and_writes_the_released_layout(local_ray, tmp_path):
    """configs/tiny_meissonic.yaml: the local backend run twice (2 steps, then resume=auto to 4) equals the Ray
    backend's 4 steps in one go; with staleness 1 stale groups train against recomputed log-probs; the
    checkpoints hold transformer/ with the release's names and the fixture's shapes; `maskgrpo eval` and
    `generate` take the family."""
    local = tmp_path / "local"
    _run(local, "cluster.backend=local", "max_steps=2")
    resumed = _run(local, "cluster.backend=local", "max_steps=4", "resume=auto")
    remote = _run(tmp_path / "ray", "cluster.backend=ray", "max_steps=4")
    stale = _run(tmp_path / "stale", "cluster.backend=local", "max_steps=3", "cluster.max_staleness=1")
    assert any(r["staleness_max"] == 1 for r in stale) and any(r["learner/stale_rows"] > 0 for r in stale)
    assert all(r["learner/nonfinite_skipped"] == 0 for r in stale)
    assert [r["step"] for r in resumed] == [r["step"] for r in remote] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "loss", "version", "learner/ratio_max", "learner/grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in remote], key
    assert any(r["loss"] != 0.0 for r in remote)
    ck = local / "checkpoints" / "step_000004"
    weights = ck / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as ours, \
            safe_open(str(FIXTURE / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as rel:
        assert set(ours.keys()) == set(rel.keys())
        assert all(ours.get_slice(k).get_shape() == rel.get_slice(k).get_shape() for k in rel.keys())
    config = json.loads((ck / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "Transformer2DModel"
    assert {k: v for k, v in config.items() if not k.startswith("_")} == \
        {k: v for k, v in json.loads((FIXTURE / "transformer" / "config.json").read_text()).items()
         if not k.startswith("_")}
    # the checkpoint is a policy.init of the family (eval) and generates
    from cluster.evaluate import evaluate_command
    from cluster.generate import generate
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'eval'}", "cluster.backend=local"])
    report = evaluate_command(cfg, checkpoint=str(ck))
    assert report["step"] == 4 and 0.0 <= report["overall"] <= 1.0
    grid = generate(load_config(TINY, [f"output_dir={tmp_path / 'gen'}", f"policy.init={ck}"]), PROMPTS[:1], 2)
    assert grid.is_file()


def _hub_cache(root: Path, repo: str, source: Path) -> None:
    """huggingface_hub's cache layout for `repo` at one revision holding the files of `source`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_meissonic_model_by_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch):
    """`policy.init: MeissonFlow/Meissonic` (and component paths such as `.../vqvae`) resolve through the cache
    with HF_HUB_OFFLINE=1; an id that is not cached fails at load, naming the id and the fix."""
    _hub_cache(tmp_path / "hub", "MeissonFlow/Meissonic", FIXTURE)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = section(load_config(TINY, ["policy.init=MeissonFlow/Meissonic", "policy.decoder.kind=vqvae",
                                     "policy.decoder.path=MeissonFlow/Meissonic/vqvae"]), "policy")
    policy = load_policy(cfg, "cpu")
    local = load_policy(section(load_config(TINY, [f"policy.init={FIXTURE}", "policy.decoder.kind=vqvae"]),
                                "policy"), "cpu")
    for (n, p), (_, q) in zip(policy.model.named_parameters(), local.model.named_parameters()):
        assert torch.equal(p, q), n
    torch.testing.assert_close(policy.condition(PROMPTS[:1])["pooled"], local.condition(PROMPTS[:1])["pooled"])
    images = policy.decode(torch.zeros(1, 64, dtype=torch.long))
    assert images.shape == (1, 16, 16, 3) and images.dtype == torch.uint8
    with pytest.raises(CheckpointError, match=r"MeissonFlow/Missing.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        build_model(PolicyConfig(family="meissonic", init="MeissonFlow/Missing"))
    from cluster.config import ConfigError
    from cluster.preflight import verify_policy_init
    with pytest.raises(ConfigError, match=r"MeissonFlow/Missing.*hf download MeissonFlow/Missing"):
        verify_policy_init(load_config(TINY, ["policy.init=MeissonFlow/Missing"]))


def test_showo_model_by_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch):
    """The other family the same way: `policy.init: showlab/show-o-512x512` (Show-o's released layout) resolves
    through the cache offline; a missing id fails at load naming itself."""
    show_o_tiny = str(REPO / "configs" / "tiny.yaml")
    released = tmp_path / "released"
    model = build_model(section(load_config(show_o_tiny, []), "policy"))
    with torch.no_grad():                        # weights no random initialisation gives, so loading is what matches
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(released)
    _hub_cache(tmp_path / "hub", "showlab/show-o-512x512", released)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = build_model(section(load_config(show_o_tiny, ["policy.init=showlab/show-o-512x512"]), "policy"))
    local = build_model(section(load_config(show_o_tiny, [f"policy.init={released}"]), "policy"))
    for (n, p), (_, q), (_, r) in zip(by_id.named_parameters(), local.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n
    with pytest.raises(CheckpointError, match=r"showlab/show-o-missing.*not in the Hugging Face cache"):
        build_model(section(load_config(show_o_tiny, ["policy.init=showlab/show-o-missing"]), "policy"))


def test_meissonic_1024_config_names_only_its_placeholders_and_samples_as_the_release(tmp_path, monkeypatch):
    """configs/meissonic_1024.yaml: the Hub id is a valid policy.init (resolved at load), the /data/ reward and
    prompt placeholders are the only problems reported; it samples as the release's inference.py."""
    from cluster.config import ConfigError
    path = REPO / "configs" / "meissonic_1024.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    problems = str(e.value).splitlines()[1:]
    assert problems and all("/data/" in p for p in problems), str(e.value)
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a cat", "tag": "single_object",
                                   "include": [{"class": "cat", "count": 1}]}) + "\n")
    for d in ("m2f", "clip"):
        (tmp_path / d).mkdir()
    cfg = load_config(path, [f"data.train_prompts={prompts}", f"data.eval_prompts={prompts}",
                             f"rewards=[{{name: geneval, detector: {{name: mask2former, path: {tmp_path}/m2f}}, "
                             f"color_classifier: {{name: clip, path: {tmp_path}/clip}}}}]"])
    policy, sampler = section(cfg, "policy"), section(cfg, "sampler")
    assert policy.family == "meissonic" and policy.init == "MeissonFlow/Meissonic"
    assert policy.arch.micro_conditions() == [1024.0, 1024.0, 0.0, 0.0, 6.0] and policy.arch.transformer.downsample
    assert (sampler.steps, sampler.guidance_scale, sampler.temperature) == (48, 9.0, 2.0)
    assert sampler.negative_prompt.startswith("worst quality")
    from policy.family import family
    assert family("meissonic").model_class.guidance_weight(sampler.guidance_scale) == 8.0   # uncond + 9 (c - u)
    c = cfg.cluster
    assert c.num_rollout_workers * c.rollout_gpus + c.num_reward_actors * c.reward_gpus + \
        c.num_learner_ranks * c.learner_gpus <= 8 and cfg.data.prompts_per_step % c.num_learner_ranks == 0
