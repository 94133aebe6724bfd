"""Reward workers: batching across groups, decoding codes, Ray actors, and surviving an injected failure."""
import pytest
import torch

from cluster.backend import RayBackend
from cluster.errors import RewardGroupError
from cluster.reward_group import RewardGroup
from rewards.worker import RewardWorker, decoder_from_spec
from tests.helpers.rewards import make_palette_decoder

PIX = {"name": "tests.helpers.rewards:PixelMeanReward", "label": "pix", "weight": 2.0}
ONE = {"name": "tests.helpers.rewards:ConstantReward", "label": "one", "value": 1.0, "weight": 0.5}
DECODER = {"factory": "tests.helpers.rewards:make_palette_decoder", "height": 16, "width": 16}


def _groups(n_groups=3, g=4, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"codes": torch.randint(0, 16, (g, n), generator=gen), "prompts": [f"p{k}"] * g,
             "metadata": [{"group": k}] * g} for k in range(n_groups)]


def _expected(items):
    decode = make_palette_decoder(16, 16)
    return [2.0 * decode(it["codes"]).float().mean(dim=(1, 2, 3)) / 255 + 0.5 for it in items]


def test_worker_batches_across_groups_and_splits_back():
    worker = RewardWorker([PIX, ONE], decoder=DECODER, batch_size=5)
    items = _groups(3, 4)
    out = worker.score_groups(items)
    assert worker.stats()["batch_sizes"] == [5, 5, 2]              # 12 samples across 3 groups, batches of 5
    assert len(out) == 3
    for o, exp in zip(out, _expected(items)):
        assert o.rewards.dtype == torch.float32 and o.rewards.shape == (4,)
        assert torch.allclose(o.rewards, exp)
        assert torch.equal(o.components["one"], torch.ones(4))
        assert o.details["pix/prompt_len"].shape == (4,)


def test_worker_accepts_images_and_mixed_groups():
    worker = RewardWorker([PIX], decoder=DECODER, batch_size=64)
    items = _groups(2, 3)
    images = make_palette_decoder(16, 16)(items[1]["codes"])
    mixed = [items[0], {"images": images, "prompts": items[1]["prompts"]}]
    out = worker.score_groups(mixed)
    assert worker.stats()["batch_sizes"] == [6]
    for o, exp in zip(out, _expected(items)):
        assert torch.allclose(o.rewards, exp - 0.5)
    with pytest.raises(ValueError, match="no decoder"):
        RewardWorker([PIX]).score_groups(items)
    with pytest.raises(ValueError, match="exactly one of"):
        worker.score_groups([{"prompts": ["a"]}])


def test_build_decoder_errors():
    assert decoder_from_spec(None) is None
    with pytest.raises(ValueError, match="factory"):
        decoder_from_spec({"height": 3})
    with pytest.raises(ValueError, match="cannot import"):
        decoder_from_spec("no_such_module_xyz:make")


# ---------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    if ray.is_initialized():          # started by another test module: share it
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_ray_actors_batch_and_survive_one_injected_failure(ray_cluster, tmp_path):
    flag = tmp_path / "fail_once"
    flag.touch()
    flaky = {"name": "tests.helpers.rewards:FlakyReward", "label": "flaky", "flag_file": str(flag), "weight": 2.0}
    pool = RewardGroup.create(RayBackend(), [flaky, ONE], num_actors=2, decoder=DECODER, batch_size=5, num_cpus=0.5)
    try:
        items = _groups(3, 4)
        out = pool.score_groups(items)                 # actor 0 raises once; the retry runs on actor 1
        assert pool.retries == 1 and not flag.exists()
        for o, exp in zip(out, _expected(items)):
            assert torch.allclose(o.rewards, exp)
            assert set(o.components) == {"flaky", "one"}
        # concurrent calls spread over both actors
        outs = pool.map([_groups(2, 4, seed=1), _groups(1, 3, seed=2)])
        assert [len(o) for o in outs] == [2, 1]
        stats = pool.stats()
        batches = sorted(tuple(s["batch_sizes"]) for s in stats)
        # actor 0: the failed call (no batch finished) + 3 groups of 1; actor 1: the retried 12 samples + 2 groups of 4
        assert sorted(sum(batches, ())) == sorted([5, 5, 2, 5, 3, 3])
        assert sum(s["calls"] for s in stats) == 4
    finally:
        pool.shutdown()


@pytest.mark.integration
def test_ray_pool_names_the_failing_reward(ray_cluster):
    failing = {"name": "tests.helpers.rewards:FailingReward", "label": "always_fails"}
    pool = RewardGroup.create(RayBackend(), [ONE, failing], num_actors=1, num_cpus=0.5)
    try:
        with pytest.raises(RewardGroupError, match="reward always_fails failed twice") as ei:
            pool.score_groups([{"images": torch.zeros(2, 8, 8, 3, dtype=torch.uint8), "prompts": ["a", "b"]}])
        assert ei.value.reward == "always_fails"
    finally:
        pool.shutdown()


@pytest.mark.integration
def test_ray_actor_restarts_after_crash(ray_cluster, tmp_path, capsys):
    flag = tmp_path / "crash_once"
    flag.touch()
    spec = {"name": "tests.helpers.rewards:FlakyReward", "label": "crashy", "flag_file": str(flag), "crash": True}
    pool = RewardGroup.create(RayBackend(), [spec], num_cpus=0.5, max_restarts=1)
    try:
        first_pid = ray_cluster.get(pool.actors[0].ping.remote())
        pool.note_pid(0, first_pid)
        images = torch.full((3, 8, 8, 3), 51, dtype=torch.uint8)
        out = pool.score_groups([{"images": images, "prompts": ["a", "b", "c"]}])  # dies, restarts, retried
        assert pool.retries == 1
        assert torch.allclose(out[0].rewards, torch.full((3,), 0.2))
        printed = capsys.readouterr().out
        assert "[maskgrpo] reward call failed on actor 0" in printed
        assert f"[maskgrpo] reward actor 0 was restarted (pid {first_pid} -> {pool.pids[0]})" in printed
        assert pool.pids[0] != first_pid
    finally:
        pool.shutdown()


def test_worker_decodes_shapes_world_codes_for_geneval():
    """Codes -> the shapes world's exact decoder -> exact detector -> GenEval: prompt-satisfying codes score 1."""
    import numpy as np
    from worlds.shapes import all_prompts, sample_codes
    items = all_prompts()[:12]
    codes = torch.as_tensor(sample_codes(items, np.random.default_rng(0)))
    worker = RewardWorker([{"name": "geneval", "detector": {"name": "shapes"}}],
                          decoder={"factory": "worlds.shapes.codebook:make_decoder"}, batch_size=8)
    groups = [{"codes": codes[i:i + 3], "prompts": [it.prompt for it in items[i:i + 3]],
               "metadata": [it.to_json() for it in items[i:i + 3]]} for i in range(0, 12, 3)]
    out = worker.score_groups(groups)
    assert worker.stats()["batch_sizes"] == [8, 4]
    assert all(torch.equal(o.rewards, torch.ones(3)) for o in out)
    assert all(torch.equal(o.details["geneval/strict"], torch.ones(3)) for o in out)


@pytest.mark.integration
def test_rewards_with_their_own_runtime_env_are_scored_by_actors_that_see_it(ray_cluster, tmp_path):
    """Three rewards, three environments, no network: one sets an environment variable, one imports a module that
    only its runtime_env's py_modules carries (the driver cannot import it), one runs in the run's environment.
    Each is scored by its own actor pool; the group's reward is the weighted sum over all three."""
    import importlib.util
    import zipfile
    package = tmp_path / "isolated.zip"       # Ray's remote-package layout: one top-level folder holding the modules
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("pkg/isolated_reward_mod/__init__.py",
                   "import torch\nfrom rewards.base import Reward\n\n"
                   "class Reward7(Reward):\n    def __init__(self, device=None):\n        pass\n\n"
                   "    def _score(self, images, prompts, metadata):\n        return torch.full((images.shape[0],), 0.7)\n")
    assert importlib.util.find_spec("isolated_reward_mod") is None
    var = "MASKGRPO_TEST_REWARD_ENV"
    specs = [{"name": "tests.helpers.rewards:EnvVarReward", "label": "env", "var": var, "weight": 2.0,
              "runtime_env": {"env_vars": {var: "0.25"}}},
             {"name": "isolated_reward_mod:Reward7", "label": "isolated", "weight": 1.0,
              "runtime_env": {"py_modules": [package.as_uri()]}},
             {"name": "tests.helpers.rewards:EnvVarReward", "label": "plain", "var": var, "weight": 0.5}]
    group = RewardGroup.create(RayBackend(), specs, num_actors=1, num_cpus=0.5)
    try:
        assert [p.labels for p in group.pools] == [["env"], ["isolated"], ["plain"]]
        assert len(set(ray_cluster.get(group.ready()))) == 3                # three processes
        out = group.score_groups([{"images": torch.zeros(3, 8, 8, 3, dtype=torch.uint8), "prompts": ["a"] * 3}])
        comps = {k: v.tolist() for k, v in out[0].components.items()}
        assert comps == {"env": [0.25] * 3, "isolated": [pytest.approx(0.7)] * 3, "plain": [-1.0] * 3}
        assert torch.allclose(out[0].rewards, torch.full((3,), 2.0 * 0.25 + 0.7 - 0.5))
    finally:
        group.shutdown()


def test_runtime_env_needs_ray_and_a_mapping(tmp_path):
    from cluster.config import ConfigError, load_config
    env = "{env_vars: {A: '1'}}"
    with pytest.raises(ConfigError, match=r"rewards\[0\].runtime_env: only Ray"):
        load_config("configs/tiny.yaml", ["cluster.backend=local", f"output_dir={tmp_path}",
                                          f"rewards=[{{name: geneval, detector: {{name: shapes}}, runtime_env: {env}}}]"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                          "rewards=[{name: geneval, detector: {name: shapes}, runtime_env: pip}]"])
    with pytest.raises(ConfigError, match=r"py_modules.*a local path.*file://"):   # Ray: local dirs only per job
        load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "rewards=[{name: geneval, detector: "
                                          f"{{name: shapes}}, runtime_env: {{py_modules: [{tmp_path}]}}}}]"])


def test_the_local_backend_refuses_a_runtime_env_it_cannot_apply():
    from cluster.backend import LocalBackend
    spec = {"name": "tests.helpers.rewards:ConstantReward", "runtime_env": {"env_vars": {"A": "1"}}}
    with pytest.raises(ValueError, match="only Ray can apply"):
        RewardGroup.create(LocalBackend(), [spec])
