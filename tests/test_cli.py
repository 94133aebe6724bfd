"""The `maskgrpo` command end to end on the tiny config: generate, eval of a saved checkpoint, bench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}


@pytest.fixture()
def restore_threads():
    """Benchmarks set torch's thread count; give later tests the one they had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- generate

def _generate(out: Path, *extra: str) -> dict:
    argv = ["generate", "--config", TINY, "--num-images", "3", f"output_dir={out}", *extra]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert cli_main(argv) == 0
    return torch.load(out / "generate" / "codes.pt", weights_only=False)


def test_generate_writes_codes_prompts_and_a_captioned_grid(tmp_path, capsys):
    from PIL import Image

    from cluster.config import load_config, section, world_kwargs
    from policy.factory import build_decoder
    from policy.images import captioned_grid
    saved = _generate(tmp_path / "a")
    assert f"wrote {tmp_path / 'a' / 'generate' / 'grid.png'}" in capsys.readouterr().out
    codes = saved["codes"]
    assert codes.shape == (6, 16) and codes.dtype == torch.long                  # 2 prompts x 3 images, 4x4 tokens
    assert int(codes.min()) >= 0 and int(codes.max()) < 64                       # every token committed, in the codebook
    assert saved["prompts"] == PROMPTS and saved["num_images"] == 3
    from cluster.data import GENERATE_STEP, sample_seeds
    assert saved["seeds"] == sample_seeds(0, GENERATE_STEP, 0, 3) + sample_seeds(0, GENERATE_STEP, 1, 3)
    assert json.loads((tmp_path / "a" / "generate" / "prompts.json").read_text()) == PROMPTS
    # the grid: a row per prompt, captioned, the decoded codes at 16x (256 px)
    cfg = load_config(TINY, [])
    decode = build_decoder(section(cfg, "policy"), "cpu", world_kwargs(cfg))
    expected = captioned_grid(decode(codes), PROMPTS, nrow=3, scale=16)
    with Image.open(tmp_path / "a" / "generate" / "grid.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), expected)
    # same config and seed: the same codes; another seed: other codes
    assert torch.equal(_generate(tmp_path / "b")["codes"], codes)
    other = _generate(tmp_path / "c", "seed=1")
    assert other["seeds"] == sample_seeds(1, GENERATE_STEP, 0, 3) + sample_seeds(1, GENERATE_STEP, 1, 3) and not torch.equal(other["codes"], codes)


def test_generate_needs_a_prompt(tmp_path, capsys):
    assert cli_main(["generate", "--config", TINY, f"output_dir={tmp_path}"]) == 2
    assert "give --prompt TEXT" in capsys.readouterr().err


def test_generate_from_a_saved_checkpoint_matches_the_random_policy(tmp_path):
    """policy.init=<checkpoint dir>: the weights saved from the tiny random policy give the same images."""
    from cluster.config import load_config, section
    from policy.factory import build_model
    model = build_model(section(load_config(TINY, []), "policy"))
    model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(_generate(tmp_path / "from_ckpt", f"policy.init={tmp_path / 'ckpt'}")["codes"],
                       _generate(tmp_path / "random")["codes"])


# ---------------------------------------------------------------------------------------------- eval

@pytest.mark.integration
@pytest.mark.slow
def test_eval_of_a_saved_checkpoint(tmp_path):
    """`maskgrpo eval --checkpoint DIR` (a subprocess: it starts and leaves its own Ray instance). The report is
    named by the checkpoint's step and never replaces one the run already has."""
    from cluster.config import load_config, section
    from policy.factory import build_model
    from rewards.types import GENEVAL_TAGS
    ckpt = tmp_path / "checkpoints" / "step_000007"
    build_model(section(load_config(TINY, []), "policy")).save_pretrained(ckpt)
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "step_000007.json").write_text('{"overall": 0.5}')        # the run's own evaluation
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "eval", "--config", TINY, "--checkpoint",
                           str(ckpt), f"output_dir={out}", "eval.samples_per_prompt=2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "eval" / "step_000007.json").read_text()) == {"overall": 0.5}   # kept
    report = json.loads((out / "eval" / "step_000007.1.json").read_text())
    cats = report["categories"]
    assert report["images"] == 8 * 2 and sum(report["counts"].values()) == 16        # eval_max_prompts x samples
    assert set(cats) <= set(GENEVAL_TAGS) and len(cats) == 6                         # round-robin over the six tags
    assert report["overall"] == pytest.approx(sum(cats.values()) / len(cats))
    for tag, acc in cats.items():                                                    # k/n of n = 2 or 4 images
        assert (acc * report["counts"][tag]) == pytest.approx(round(acc * report["counts"][tag]))
    assert report["samples_per_prompt"] == 2 and report["step"] == 7
    per_prompt = report["prompts"]                                                   # each prompt's own accuracy
    assert len(per_prompt) == 8 and len({p["prompt"] for p in per_prompt}) == 8
    for tag, acc in cats.items():                                                    # a category = its prompts' mean
        assert acc == pytest.approx(sum(p["accuracy"] for p in per_prompt if p["tag"] == tag)
                                    / sum(p["tag"] == tag for p in per_prompt))
    # the strict verdicts are also a metric with its interval (docs/evaluation.md), the same numbers per category
    strict = report["metrics"]["geneval/strict"]
    assert strict["mean"] == pytest.approx(report["overall"]) and strict["ci95"][0] <= strict["mean"] <= strict["ci95"][1]
    assert {t: g["mean"] for t, g in strict["groups"].items()} == pytest.approx(cats)
    assert report["metrics"]["geneval"]["n"] == 8 and report["metrics"]["geneval"]["images"] == 16
    assert sorted(p.name for p in (out / "eval" / "step_000007.1").iterdir()) == sorted(f"{t}.png" for t in cats)
    # the printed table is the report's, titled with the checkpoint evaluated
    from cluster.evaluate import format_table
    assert format_table(report, f"GenEval ({ckpt})") in proc.stdout


# ---------------------------------------------------------------------------------------------- bench

def test_bench_sampler_rewards_learner_through_the_cli(restore_threads, capsys):
    assert cli_main(["bench", "sampler", "--sizes", "tiny", "--prompts", "1", "--group", "2", "--steps", "2",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert len(rows) == 4 and all(r[-4] == "2" for r in rows)                       # 4 variants x 2 images
    assert rows[0][-1] == "1.00x"

    assert cli_main(["bench", "rewards", "--only", "clip_score", "aesthetic", "--batch", "2", "--iters", "1",
                     "--size", "32"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert names == ["clip_score", "aesthetic"]                                      # only those were built and run
    assert all(float(line.split()[-1]) > 0 for line in out.splitlines()[2:] if line.strip())

    assert cli_main(["bench", "learner", "--hidden", "32", "--layers", "1", "--heads", "2", "--tokens", "16",
                     "--codebook", "32", "--steps", "2", "--repeats", "1", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("2 ")]
    assert [(r[1], r[2]) for r in rows] == [("all", "False"), ("all", "True"), ("first_k", "False"),
                                            ("first_k", "True")]
    assert [int(r[3]) for r in rows] == [8, 8, 4, 4]                                 # G=4 x T=2 rows; first half: 4


def test_bench_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_bench_pipeline_broadcast_and_trajectory_parts(tmp_path):
    """The Ray parts of the pipeline benchmark (a subprocess: it starts its own Ray instance)."""
    result = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "pipeline", "--only", "broadcast",
                           "--only", "trajectory", "--sizes-mb", "1", "--receivers", "1", "--reps", "1",
                           "--out", str(tmp_path / "out"), "--json", str(result)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert "pipeline" not in data
    (bc,) = data["broadcast"]
    assert len(data["trajectory"]) == 3
    tiny = data["trajectory"][0]
    assert tiny["trajectory"].startswith("tiny group") and 0 < tiny["tensor_MB"] < tiny["pickled_MB"] < 0.1
    assert all(r["put_ms"] > 0 and r["get_ms_in_actor"] > 0 for r in data["trajectory"])
    assert bc["MB"] == 1.0 and bc["receivers"] == 1
    assert bc["identical"] is True                       # the receiver holds the sender's exact weights afterwards
    assert bc["collective_s"] > 0 and bc["object_store_s"] > 0
