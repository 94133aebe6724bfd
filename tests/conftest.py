"""Shared test helpers: the reference-vector directory, the tiny Show-o of the fixtures, a tiny tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


FIXTURES_ROOT = REPO / "tests" / "fixtures"
FIXTURES = FIXTURES_ROOT / "showo"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a real GPU: skipped where CUDA is not available (CI, the CPU dev machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def parity_dir(family: str = "showo") -> Path:
    """Reference vectors of a model family: tests/fixtures/<family> (in the repository), or, when
    $MASKGRPO_PARITY_DIR is set, that directory itself for Show-o (its files at the top, as ever) and
    $MASKGRPO_PARITY_DIR/<family>/ for the other families (e.g. meissonic/, same file names as ours)."""
    root = os.environ.get("MASKGRPO_PARITY_DIR")
    if not root:
        return FIXTURES_ROOT / family
    return Path(root) if family == "showo" else Path(root) / family


def _existing_parity_dir(family: str) -> Path:
    d = parity_dir(family)
    if not d.is_dir():
        pytest.fail(f"reference vectors not found at {d}: they ship in tests/fixtures/{family}; "
                    f"MASKGRPO_PARITY_DIR, when set, must name a directory made the same way")
    return d


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return _existing_parity_dir("showo")


@pytest.fixture(scope="session")
def meissonic_fixture_dir() -> Path:
    """The Meissonic reference vectors (tests/fixtures/meissonic or $MASKGRPO_PARITY_DIR/meissonic)."""
    return _existing_parity_dir("meissonic")


@pytest.fixture(scope="session")
def tiny_config_dict(fixture_dir) -> dict:
    return json.loads((fixture_dir / "tiny_config.json").read_text())


@pytest.fixture(scope="session")
def showo_vectors(fixture_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(fixture_dir / "tiny_showo_vectors.safetensors"))


@pytest.fixture()
def tiny_showo(tiny_config_dict, showo_vectors):
    """The fixtures' tiny Show-o with the reference weights loaded through the strict loader."""
    from policy.showo import PhiArch, Showo, ShowoConfig
    t = tiny_config_dict
    config = ShowoConfig(vocab_size=t["vocab_size"], llm_vocab_size=t["llm_vocab_size"],
                         codebook_size=t["codebook_size"], num_vq_tokens=t["num_vq_tokens"],
                         num_new_special_tokens=t["num_new_special_tokens"], max_seq_length=t["max_seq_length"],
                         bos_id=t["bos"], eos_id=t["eos"], phi=PhiArch.from_hf_config(t["phi"]))
    model = Showo(config)
    weights = {k[len("weights."):]: v for k, v in showo_vectors.items() if k.startswith("weights.")}
    model.load_released_state_dict(weights)
    return model.eval()


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run best on one thread; two OpenMP threads on a busy 2-core machine spin for ages."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for one test module (12 logical CPUs; every actor limits its own threads), shut down
    after the module unless one with enough CPUs was already running."""
    import ray
    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 10:
        ray.shutdown()                             # someone's small instance: not enough logical CPUs for us
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=12, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed's ZeRO-3 replaces `torch.nn.functional.linear` process-wide with its own autograd function ("This
    will persist unless manually reset"): its gradients differ from torch's in the last bits, so a later test that
    compares an in-process run with runs in fresh processes (the local and Ray backends) would see them. Undone
    after every test."""
    yield
    import sys
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original
