"""The run configuration and prompt files: bad input fails up front (before Ray or any actor starts) with a
message naming the key / file:line and the fix; the CLI turns it into exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main as cli_main
from cluster.config import ConfigError, load_config
from cluster.prompts import PromptFileError, read_prompts

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def _error(overrides, path=TINY) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_tiny_config_loads():
    cfg = load_config(TINY, ["max_steps=5", "cluster.num_rollout_workers=2"])
    assert cfg.max_steps == 5 and cfg.cluster.num_rollout_workers == 2 and cfg.data.group_size == 4


@pytest.mark.parametrize("override, key", [("bogus=1", "bogus"), ("data.prompt_per_step=2", "data.prompt_per_step"),
                                           ("cluster.num_workers=2", "cluster.num_workers"),
                                           ("learner.learning_rate=1e-3", "learner.learning_rate")])
def test_unknown_key_names_the_key(override, key):
    msg = _error([override])
    assert f"'{key}'" in msg and "not in" in msg and "dataclasses in cluster/config.py" in msg
    assert len(msg.splitlines()) == 1                       # the key, the problem and where to look: one line


@pytest.mark.parametrize("override, key", [("max_steps=many", "max_steps"), ("data.group_size=1.5", "data.group_size"),
                                           ("learner.lr=fast", "learner.lr"),
                                           ("cluster.num_rollout_workers=two", "cluster.num_rollout_workers")])
def test_wrong_type_names_the_key(override, key):
    msg = _error([override])
    assert f"'{key}'" in msg and "could not be converted" in msg


def test_malformed_overrides_and_files(tmp_path):
    assert "key=value" in _error(["max_steps"])
    assert "not found" in _error([], path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1\n")
    msg = _error([], path=bad)
    assert "not valid YAML at line 2" in msg and "fix the file there" in msg and len(msg.splitlines()) == 1
    # a variants file of the ablation script is not a run config: say what it is
    assert "benchmarks.ablations" in _error([], path=REPO / "configs" / "ablations.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("cluster:\n  num_rollout_worker: 2\n")
    assert "cluster.num_rollout_worker" in _error([], path=unknown)


@pytest.mark.parametrize("name", ["ablations", "lora", "rewards", "staleness"])
def test_every_variant_of_the_measurement_files_is_a_valid_config(name, tmp_path):
    # the documented `benchmarks.ablations --config configs/X.yaml` commands must not fail on variant k after
    # hours of runs 0..k-1: every variant, with the file's common overrides, loads (its files exist)
    from omegaconf import OmegaConf
    spec = OmegaConf.load(REPO / "configs" / f"{name}.yaml")
    assert spec.variants
    for variant, overrides in spec.variants.items():
        cfg = load_config(str(REPO / spec.base), list(spec.common) + list(overrides) + [f"output_dir={tmp_path}"])
        assert cfg.max_steps >= 1, variant
        # measured on the three-shape world (configs/default.yaml's before issue 30): pinned in `common`
        assert list(cfg.world.shapes) == ["circle", "square", "triangle"] and cfg.world.split == "stratified"
        assert cfg.policy.arch.codebook_size == 13 and cfg.policy.arch.vocab_size == 88, variant


def test_missing_paths(tmp_path):
    msg = _error([f"policy.init={tmp_path}/show-o-512x512"])
    assert "policy.init=" in msg and "does not exist" in msg
    msg = _error([f"data.train_prompts={tmp_path}/prompts.txt"])
    assert "data.train_prompts=" in msg and "does not exist" in msg
    msg = _error([f"data.eval_prompts={tmp_path}/eval.jsonl", f"resume={tmp_path}/checkpoints/step_000001"])
    assert "data.eval_prompts=" in msg and "resume=" in msg      # every problem is listed at once
    msg = _error(["policy.decoder.kind=magvit", "policy.tokenizer.kind=hf"])
    assert "policy.decoder.path" in msg and "policy.tokenizer.path" in msg


def test_semantic_checks():
    msg = _error(["cluster.num_learner_ranks=3"])     # tiny: prompts_per_step 2
    assert "prompts_per_step must be a multiple of cluster.num_learner_ranks" in msg
    load_config(TINY, ["cluster.num_learner_ranks=2"])
    assert "group_size must be >= 2" in _error(["data.group_size=1"])
    assert "weight_sync" in _error(["cluster.weight_sync=nccl"])
    assert "max_staleness" in _error(["cluster.max_staleness=-1"])
    assert "num_rollout_workers must be >= 1" in _error(["cluster.num_rollout_workers=0"])
    msg = _error(["rewards=[{name: geneva}]"])
    assert "unknown reward 'geneva'" in msg and "geneval" in msg
    assert "needs a 'name'" in _error(["rewards=[{weight: 1.0}]"])
    load_config(TINY, ["rewards=[{name: 'tests.helpers.rewards:ConstantReward', value: 1.0}]"])


# ---------------------------------------------------------------------------------------------- prompt files

def test_prompt_files_of_every_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two blue squares \n")
    assert [p.prompt for p in read_prompts(txt)] == ["a red circle", "two blue squares"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a photo of a cat", "tag": "single_object",
                              "include": [{"class": "cat", "count": 1}]}) + "\n\n" +
                  json.dumps({"prompt": "a dog"}) + "\n")
    items = read_prompts(jl)
    assert [p.prompt for p in items] == ["a photo of a cat", "a dog"]
    assert items[0].metadata == {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "tag": ["single_object", "single_object"],
                             "include": ['[{"class": "cat", "count": 1}]', '[{"class": "dog", "count": 1}]']}),
                   pq_path)
    items = read_prompts(pq_path)
    assert [p.prompt for p in items] == ["a cat", "a dog"]
    assert items[1].metadata["include"] == [{"class": "dog", "count": 1}]
    cfg = load_config(TINY, [f"data.train_prompts={pq_path}", f"data.eval_prompts={jl}",
                             "rewards=[{name: 'tests.helpers.rewards:ConstantReward'}]"])   # "a dog" has no GenEval clauses
    assert cfg.data.train_prompts == str(pq_path)


def test_bad_prompt_files_name_file_and_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(PromptFileError, match=rf"{jl}:3: not valid JSON"):
        read_prompts(jl)
    msg = _error([f"data.train_prompts={jl}"])        # surfaces as a config error, before anything starts
    assert f"{jl}:3" in msg and "data.train_prompts" in msg
    jl.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert f'{jl}:2: each line needs a non-empty string field "prompt"' in _error([f"data.eval_prompts={jl}"])

    import pyarrow as pa
    import pyarrow.parquet as pq
    pqf = tmp_path / "noprompt.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), pqf)
    msg = _error([f"data.train_prompts={pqf}"])
    assert "no 'prompt' column" in msg and "caption" in msg
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in _error([f"data.train_prompts={garbage}"])

    for name, text in [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "\n")]:
        f = tmp_path / name
        f.write_text(text)
        assert "holds no prompts" in _error([f"data.train_prompts={f}"])


# ---------------------------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("name", ["cluster_1node_8gpu.yaml", "cluster_rollout_nodes.yaml"])
def test_cluster_configs_load_once_paths_are_set(name, tmp_path):
    path = REPO / "configs" / name
    msg = _error([], path=path)                          # the placeholders are reported, and nothing else
    problems = [line for line in msg.splitlines()[1:]]
    assert problems and all("/data/" in p for p in problems), msg
    for d in ("show-o-512x512", "phi-1_5", "magvitv2"):
        (tmp_path / d).mkdir()
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a cat", "tag": "single_object",
                                   "include": [{"class": "cat", "count": 1}]}) + "\n")
    cfg = load_config(path, [f"policy.init={tmp_path}/show-o-512x512", f"policy.tokenizer.path={tmp_path}/phi-1_5",
                             f"policy.decoder.path={tmp_path}/magvitv2", f"data.train_prompts={prompts}",
                             f"data.eval_prompts={prompts}"])
    c = cfg.cluster
    assert cfg.learner.zero_stage == 2 and cfg.learner.bf16 is True and c.learner_gpus == 1
    # micro-batches sized from free GPU memory, checkpointing only when needed (learner.memory)
    assert cfg.learner.micro_batch_rows == 0 and cfg.learner.gradient_checkpointing is None
    assert cfg.data.prompts_per_step % c.num_learner_ranks == 0
    if name == "cluster_1node_8gpu.yaml":                 # everything fits on 8 GPUs
        assert c.num_rollout_workers * c.rollout_gpus + c.num_reward_actors * c.reward_gpus + \
            c.num_learner_ranks * c.learner_gpus <= 8


# The three-shape world of the figures measured before issue 30, as docs/experiments.md gives its overrides
OLD_WORLD = {"default.yaml": ["world.shapes=[circle,square,triangle]", "world.split=stratified",
                              "policy.arch.codebook_size=13", "policy.arch.vocab_size=88"],
             "default_meissonic.yaml": ["world.shapes=[circle,square,triangle]", "world.split=stratified",
                                        "policy.arch.transformer.codebook_size=13",
                                        "policy.arch.transformer.vocab_size=14"]}


def _codebook_and_vocab(cfg) -> tuple[int, int, int]:
    """(world's codes, policy's codebook, policy's vocabulary less what the family adds to the codebook)."""
    from cluster.config import world_kwargs
    from worlds.shapes.codebook import ShapesCodebook
    codes = ShapesCodebook(**world_kwargs(cfg)).codebook_size
    arch = cfg.policy.arch
    if cfg.policy.family == "meissonic":
        return codes, arch.transformer.codebook_size, arch.transformer.vocab_size - 1
    return codes, arch.codebook_size, arch.vocab_size - arch.llm_vocab_size - 10 - 1


@pytest.mark.parametrize("name", ["default.yaml", "default_meissonic.yaml"])
def test_default_configs_are_on_the_four_shape_world_and_the_old_one_is_an_override(name):
    from cluster.data import eval_prompts, prompt_tag, train_prompts
    from worlds.shapes.world import ShapesWorld, make_splits
    cfg = load_config(REPO / "configs" / name)
    assert list(cfg.world.shapes) == ["circle", "square", "triangle", "ring"] and cfg.world.split == "count_transfer"
    assert _codebook_and_vocab(cfg) == (17, 17, 17)
    assert "ring" in cfg.policy.tokenizer.words and "rings" in cfg.policy.tokenizer.words
    train, held = train_prompts(cfg), eval_prompts(cfg)
    assert (len(train), len(held)) == (177, 59)
    assert [p.prompt for p in held if prompt_tag(p) == "counting"] == [
        "a photo of four circles", "a photo of two squares", "a photo of three rings"]
    old = load_config(REPO / "configs" / name, OLD_WORLD[name])
    assert _codebook_and_vocab(old) == (13, 13, 13) and len(old.policy.tokenizer.words) == 21
    world = ShapesWorld(image_size=32, grid_size=4)           # the three-shape world's split, unchanged
    assert [p.prompt for p in train_prompts(old)] == [it.prompt for it in make_splits(world)[0]]
    assert [p.prompt for p in eval_prompts(old)] == [it.prompt for it in make_splits(world)[1]]
    # the split needs the fourth shape: the old world with the new split is refused, naming the fix
    assert "at least three shapes" in _error(OLD_WORLD[name][:1], path=REPO / "configs" / name)


def test_a_cached_base_of_another_world_or_arch_is_refused(tmp_path):
    from cluster.pretrain import ensure_base_policy, pretrain
    base = ["pretrain.steps=1", "pretrain.batch_size=2", f"pretrain.output={tmp_path / 'base'}"]
    pretrain(load_config(TINY, base))
    cfg = load_config(TINY, base + ["policy.init=pretrained"])
    ensure_base_policy(cfg)                                   # its own world: used
    assert cfg.policy.init == str(tmp_path / "base")
    other = ["world.shapes=[circle,square,triangle,ring]", "world.split=count_transfer"]
    with pytest.raises(ConfigError, match="another shapes world.*world.shapes.*world.split"):
        ensure_base_policy(load_config(TINY, base + other + ["policy.init=pretrained"]))
    # a base written before pretrain.json recorded its world: its architecture must be the config's
    record = tmp_path / "base" / "pretrain.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "world"}))
    ensure_base_policy(load_config(TINY, base + ["policy.init=pretrained"]))
    with pytest.raises(ConfigError, match="another policy.arch"):
        ensure_base_policy(load_config(TINY, base + ["policy.init=pretrained", "policy.arch.codebook_size=32",
                                                     "policy.arch.vocab_size=143"]))


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_exit_code_2_and_message(tmp_path, capsys):
    import ray
    ray_before = ray.is_initialized()
    assert cli_main(["train", "--config", TINY, "bogus.key=1", f"output_dir={tmp_path}"]) == 2
    assert "maskgrpo: invalid config at 'bogus'" in capsys.readouterr().err
    jl = tmp_path / "bad.jsonl"
    jl.write_text("not json\n")
    assert cli_main(["train", "--config", TINY, f"data.train_prompts={jl}", f"output_dir={tmp_path}"]) == 2
    assert f"{jl}:1: not valid JSON" in capsys.readouterr().err
    assert cli_main(["generate", "--config", TINY, "--prompts", str(jl)]) == 2
    assert f"{jl}:1" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before and not (tmp_path / "config.yaml").exists()   # nothing started


def test_python_module_entry_point_exit_code(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([sys.executable, "-m", "cluster.train", "--config", TINY, "cluster.num_learner_ranks=3",
                        f"output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "prompts_per_step must be a multiple of cluster.num_learner_ranks" in p.stderr
    assert not (tmp_path / "config.yaml").exists()
