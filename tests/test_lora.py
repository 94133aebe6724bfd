"""LoRA (`learner.lora`): adapters start as the base, only they train, the KL reference is the base with them off,
the merged export computes what the adapted model computes, rollout copies equal the learner's after every sync
path, checkpoints resume bit for bit and are peft's format, and bad settings fail with the fix in the message."""
from __future__ import annotations

import json
import pickle
import threading

import pytest
import torch

from learner import Learner, LearnerConfig, apply_weight_bucket
from learner.config import LoraSettings
from learner.lora import (adapter_parameters, adapters_disabled, add_adapters, is_adapter_name, merged_state_dict,
                          released_name)
from learner.memory import trainable_numel
from benchmarks.tiny_models import random_showo
from tests.helpers.learner import fixed_batch, model_with
from policy.showo import Showo, write_pretrained
from policy.weights import CheckpointError
from tests.updates import Planner, configs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LORA = LoraSettings(rank=4, alpha=8.0)
Z3_SMALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def data():
    return fixed_batch()


def _config(lora: LoraSettings = LORA, **kw):
    base = dict(transition="candidate2", lr=3e-2, warmup_steps=0, total_steps=10, micro_batch_rows=6,
                advantage="group", seed=3, lora=lora)
    base.update(kw)
    return configs(**base)


def _logits(model: Showo, trajs) -> torch.Tensor:
    """Codebook logits of every trajectory's rollouts at their final codes (the whole sequence, one pass)."""
    with torch.no_grad():
        return torch.cat([model.image_logits_full(tr.condition["ids"], tr.final_codes) for tr in trajs]).float()


def _trained(data, steps: int = 1, **kw) -> Learner:
    learner = Learner(model_with(data[0]), *_config(**kw))
    planner = Planner(learner.algorithm)
    for _ in range(steps):
        planner.train(learner, data[1], data[2], data[3])
    return learner


# ----- settings ---------------------------------------------------------------------------------------------------
def test_settings_are_checked_with_the_fix_named():
    with pytest.raises(ValueError, match=r"rank=-1 is negative: use 0"):
        LoraSettings(rank=-1)
    assert LearnerConfig(lora={"rank": 8}).lora == LoraSettings(rank=8)     # a plain dict (checkpoints, YAML)
    from cluster.config import ConfigError, load_config, section
    # the target names are the policy family's (Show-o's Phi projections), checked when the config loads ...
    with pytest.raises(ConfigError, match=r"\['lm_head'\] match no layer showo adapts \(lm_head's weight is read"):
        load_config(None, ["learner.lora.rank=4", "learner.lora.target_modules=[q_proj,lm_head]"])
    with pytest.raises(ConfigError, match=r"\['qproj'\] match no layer showo adapts: choose from \['q_proj'"):
        load_config(None, ["learner.lora.rank=4", "learner.lora.target_modules=[qproj]"])
    # ... and when the adapters are added to a model of the family
    with pytest.raises(ValueError, match=r"\['qproj'\] match no layer showo adapts"):
        add_adapters(random_showo(0), LoraSettings(rank=4, target_modules=["qproj"]))
    cfg = load_config(None, ["learner.lora.rank=16", "learner.lora.target_modules=[q_proj,v_proj]"])
    assert section(cfg, "learner").lora == LoraSettings(rank=16, target_modules=["q_proj", "v_proj"])
    # none named: every layer the family adapts, written into the config (config.yaml and resumes say the list)
    assert section(load_config(None, ["learner.lora.rank=16"]), "learner").lora.target_modules == \
        ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    with pytest.raises(ConfigError, match="learner.lora.rank=-2 is negative"):
        load_config(None, ["learner.lora.rank=-2"])
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))                        # names matching no layer of the model
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer of this model"):
        add_adapters(plain, LoraSettings(rank=2, target_modules=["q_proj"]))


# ----- the adapted model ---------------------------------------------------------------------------------------------
def test_zero_B_starts_as_the_base_and_only_adapters_train(data):
    base = model_with(data[0])
    learner = Learner(model_with(data[0]), *_config())
    assert torch.equal(_logits(learner.policy, data[1]), _logits(base, data[1]))           # B = 0: exactly the base
    adapters = adapter_parameters(learner.policy)
    assert len(adapters) == 2 * 6 * base.config.phi.num_hidden_layers                       # A and B of 6 layers each
    opt_params = [p for g in learner._torch_optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for _, p in adapters}                      # AdamW state: adapters only
    assert trainable_numel(learner.policy) == sum(p.numel() for _, p in adapters)           # what the planner reserves
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    Planner(learner.algorithm).train(learner, data[1], data[2], data[3])
    after = learner.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)                                  # the base is untouched
    assert any(".lora_B." in k for k in changed)
    base_sd = base.state_dict()
    assert all(torch.equal(v, base_sd[released_name(k)]) for k, v in after.items() if not is_adapter_name(k))
    assert not torch.allclose(_logits(learner.policy, data[1]), _logits(base, data[1]))


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_zero_stages_train_the_same_adapters(data, stage):
    extra = Z3_SMALL if stage == 3 else {}
    ref = _trained(data, 2, adam_eps=1e-3).gathered_adapters()
    got = _trained(data, 2, adam_eps=1e-3, zero_stage=stage, extra_deepspeed=extra).gathered_adapters()
    assert set(got) == set(ref)
    for k, v in ref.items():   # ZeRO sums in another order; Adam at lr 3e-2 turns that float noise into ~1e-6
        assert (got[k] - v).abs().max().item() <= 1e-4 * max(v.abs().max().item(), 1e-3), k


@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_kl_reference_is_the_base_with_adapters_off(data, stage):
    learner = _trained(data, 2, kl_beta=0.5, zero_stage=stage, extra_deepspeed=Z3_SMALL if stage == 3 else {})
    assert learner.reference is None                                   # no second copy of the model
    import contextlib

    import deepspeed
    gathered = deepspeed.zero.GatheredParameters(list(learner.policy.parameters())) if stage == 3 \
        else contextlib.nullcontext()
    with gathered, adapters_disabled(learner.policy):
        assert torch.equal(_logits(learner.policy, data[1]), _logits(model_with(data[0]), data[1]))
    assert all(p.requires_grad for _, p in adapter_parameters(learner.policy))   # still trainable afterwards
    stats = learner.train_step(Planner(learner.algorithm).plan(data[1], data[2], data[3]).groups)
    assert stats.has_reference and stats.kl_sum > 0                   # the adapted policy has moved off the base


def test_gradient_checkpointing_gives_the_same_adapter_gradients(data):
    grads = []
    for checkpointing in (False, True):
        learner = Learner(model_with(data[0]), *_config(gradient_checkpointing=checkpointing))
        Planner(learner.algorithm).train(learner, data[1], data[2], data[3])     # B != 0: A gets gradients too
        learner.accumulate_gradients(Planner(learner.algorithm).plan(data[1], data[2], data[3]).groups)
        grads.append(learner.full_gradients())
    assert grads[0].keys() == grads[1].keys() and all(is_adapter_name(k) for k in grads[0])
    for k, g in grads[0].items():
        assert torch.allclose(grads[1][k], g, rtol=1e-5, atol=1e-7), k


# ----- merged export --------------------------------------------------------------------------------------------------
def test_merged_weights_compute_what_the_adapters_compute(data, tmp_path):
    learner = _trained(data, 2)
    merged = Showo(learner.policy.config)
    merged.load_released_state_dict(merged_state_dict(learner.policy, learner.lora))
    got, want = _logits(merged, data[1]), _logits(learner.policy, data[1])
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert learner.gathered_state_dict().keys() == merged.state_dict().keys()        # released layout


def _base_dir(data, tmp_path):
    base = tmp_path / "base"
    write_pretrained(base, data[0], model_with(data[0]).config)
    return base


def test_checkpoint_is_peft_format_and_export_opens_as_show_o(data, tmp_path):
    from peft import PeftModel

    from cluster.config import load_config
    from cluster.export import export_merged
    from policy.factory import PolicyConfig, build_model
    learner = _trained(data, 2)
    ck = learner.save_checkpoint(tmp_path / "run" / "checkpoints")
    names = {p.name for p in ck.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "pytorch_model.safetensors" not in names
    engine_bytes = sum(f.stat().st_size for f in (ck / "engine").rglob("*") if f.is_file())
    full_bytes = sum(v.numel() * 4 for v in data[0].values())
    assert engine_bytes < full_bytes / 2                               # no frozen base in the engine state
    peft_model = PeftModel.from_pretrained(model_with(data[0]), str(ck))   # a peft user opens it on the base
    ids = learner.policy.layout.sequence(data[1][0].condition["ids"], data[1][0].final_codes)
    with torch.no_grad():
        assert torch.equal(peft_model(ids), learner.policy(ids))
    base = _base_dir(data, tmp_path)
    with pytest.raises(CheckpointError, match="holds LoRA adapters, not model weights: merge them"):
        build_model(PolicyConfig(init=str(ck)))
    out = export_merged(load_config(None, [f"policy.init={base}"]), ck, tmp_path / "merged")
    exported = build_model(PolicyConfig(init=str(out)))               # policy.init opens it; Show-o's layout
    assert set(exported.state_dict()) == set(data[0])
    got, want = _logits(exported, data[1]), _logits(learner.policy, data[1])
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    from cluster.config import ConfigError
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_merged(load_config(None, [f"policy.init={base}"]), ck, out)


# ----- weight sync ----------------------------------------------------------------------------------------------------
def _rollout_copy(data) -> Showo:
    """A rollout worker's model: the base built anew, with the same adapter layout (not yet synced)."""
    model = add_adapters(model_with(data[0]), LORA).eval().requires_grad_(False)
    return model


def _assert_same(rollout: Showo, learner: Learner, trajs) -> None:
    want = learner.policy.state_dict()
    for k, v in rollout.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(_logits(rollout, trajs), _logits(learner.policy, trajs))


def test_rollout_copy_equals_the_learner_after_object_store_and_in_process_sync(data, tmp_path):
    learner = _trained(data, 2)
    buckets = list(learner.iter_weight_buckets(bucket_bytes=2_000))
    names = [n for b in buckets for n in b.names]
    assert names == [n for n, _ in adapter_parameters(learner.policy)] and len(buckets) > 1   # adapters only
    sync_bytes = sum(b.nbytes for b in buckets)
    assert sync_bytes == sum(p.numel() * 4 for _, p in adapter_parameters(learner.policy))
    assert sync_bytes < 0.2 * sum(v.numel() * 4 for v in data[0].values())
    in_process = _rollout_copy(data)
    for b in buckets:
        assert apply_weight_bucket(in_process, b) == 2
    _assert_same(in_process, learner, data[1])
    # the object store pickles each bucket (a CPU buffer); the rollout worker applies what it fetched
    from actors.rollout import RolloutWorker
    from policy.factory import PolicyConfig
    from policy.sampler import SamplerConfig
    worker = RolloutWorker(0, PolicyConfig(init=str(_base_dir(data, tmp_path)), dtype="float32"),
                           SamplerConfig(steps=4), lora=LORA)
    fetched = [pickle.loads(pickle.dumps(b)) for b in buckets]
    for b in fetched:
        worker.version = apply_weight_bucket(worker.model, b)
    assert worker.version == 2
    _assert_same(worker.model, learner, data[1])


def test_rollout_copy_equals_the_learner_after_a_collective_sync(data):
    from actors.weight_sync import SyncGroupSpec, WeightSyncGroup, param_digest
    from learner.dist import free_port
    learner = _trained(data, 1)
    receiver = _rollout_copy(data)
    spec = SyncGroupSpec("lora-test", "127.0.0.1", free_port(), 2, "gloo", 60.0)
    stats = {}

    def send():
        stats.update(WeightSyncGroup(spec, 0).send(learner.iter_weight_buckets(bucket_bytes=2_000)))

    t = threading.Thread(target=send)
    t.start()
    version = WeightSyncGroup(spec, 1).receive(receiver, 2_000, None, learner.version)   # plans the adapters too
    t.join(60)
    assert version == 1 and stats["bytes"] == sum(p.numel() * 4 for _, p in adapter_parameters(receiver))
    assert param_digest(receiver) == param_digest(learner.policy)
    _assert_same(receiver, learner, data[1])


# ----- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_resume_with_lora_is_bit_for_bit(data, tmp_path, stage):
    _, trajs, rewards, prompts = data
    kw = dict(zero_stage=stage, extra_deepspeed=Z3_SMALL if stage == 3 else {})
    a, planner = Learner(model_with(data[0]), *_config(**kw)), Planner(_config(**kw))
    for _ in range(2):
        planner.train(a, trajs, rewards, prompts)
    a.driver_state = {"step": 2, "tracker": planner.state_dict()}
    path = a.save_checkpoint(tmp_path / "checkpoints")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lora"]["rank"] == LORA.rank
    tail_a = [planner.train(a, trajs, rewards, prompts) for _ in range(2)]
    b, resumed = Learner(model_with(data[0]), *_config(**kw)), Planner(_config(**kw))
    assert b.resume(path) == path and b.step == 2
    resumed.load_state_dict(b.driver_state["tracker"])
    resumed.step = 2
    tail_b = [resumed.train(b, trajs, rewards, prompts) for _ in range(2)]
    sa, sb = a.gathered_adapters(), b.gathered_adapters()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for ma, mb in zip(tail_a, tail_b):
        for key in ("loss", "grad_norm", "lr", "ratio_mean", "version"):
            assert ma[key] == mb[key], key


def test_resume_with_other_adapters_or_without_lora_fails_naming_the_fix(data, tmp_path):
    ck = _trained(data, 1).save_checkpoint(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters \(rank 4\) but learner.lora is off: resume with "
                                              r"learner.lora.rank=4 learner.lora.alpha=8"):
        Learner(model_with(data[0]), *_config(lora=LoraSettings())).resume(ck)
    with pytest.raises(CheckpointError, match=r"adapters of rank 4 .* the learner is set to rank 8"):
        Learner(model_with(data[0]), *_config(lora=LoraSettings(rank=8, alpha=8.0))).resume(ck)
    full = _trained(data, 1, lora=LoraSettings()).save_checkpoint(tmp_path / "full")
    with pytest.raises(CheckpointError, match=r"trained every weight \(no LoRA adapters\) but learner.lora.rank=4"):
        Learner(model_with(data[0]), *_config()).resume(full)
    from cluster.config import ConfigError, load_config
    from cluster.preflight import verify_resume_lora
    with pytest.raises(ConfigError, match=r"holds LoRA adapters \(rank 4\) but learner.lora is off"):
        verify_resume_lora(load_config(None, []), str(ck))                  # refused before any actor starts
    verify_resume_lora(load_config(None, ["learner.lora.rank=4", "learner.lora.alpha=8"]), str(ck))


# ----- through the real actors ----------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_tiny_run_with_lora_syncs_adapters_and_exports(tmp_path, local_ray):
    """configs/tiny.yaml with LoRA through Ray (rollout worker, reward actor, learner rank, gloo weight sync): the
    sync moves only the adapters, the checkpoint is peft's format, and the export opens as a policy."""
    from cluster.config import load_config, section
    from cluster.export import export_merged
    from cluster.metrics import read_metrics
    from cluster.train import train
    from policy.factory import PolicyConfig, build_model
    out = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", "max_steps=2", "learner.lora.rank=4",
                                            "logging.progress=false"])
    summary = train(cfg)
    ck = summary["checkpoint"]
    lines = read_metrics(out)
    base = build_model(section(cfg, "policy"))
    model = add_adapters(base, LoraSettings(rank=4))
    adapter_bytes = sum(p.numel() * p.element_size() for _, p in adapter_parameters(model))
    assert lines[-1]["sync_bytes"] == adapter_bytes and lines[-1]["sync_path"] == "collective"
    merged = build_model(PolicyConfig(init=str(export_merged(None, ck, tmp_path / "merged"))))
    assert set(merged.state_dict()) == {released_name(k) for k in model.state_dict() if not is_adapter_name(k)}
