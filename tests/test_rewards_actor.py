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
