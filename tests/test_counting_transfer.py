"""benchmarks/counting_transfer.py on a tiny run of the four-shape world with the count_transfer split: the untrained
pairs are the held-out counting prompts, the control is the training split's counting prompts, and the held-out
evaluation reproduces the run's own (same seeds, same protocol)."""
import json

import pytest

pytestmark = pytest.mark.integration

WORLD = ["world.shapes=[circle,square,triangle,ring]", "world.split=count_transfer"]


def test_counting_transfer_of_a_tiny_run(tmp_path, capsys):
    from benchmarks.counting_transfer import format_tables, main
    from cluster.config import load_config
    from cluster.train import train
    run = tmp_path / "run"
    train(load_config("configs/tiny.yaml", WORLD + [
        "cluster.backend=local", "max_steps=1", "learner.total_steps=1", "data.eval_max_prompts=0",
        "eval.samples_per_prompt=2", "logging.progress=false", f"output_dir={run}"]))
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "counting_transfer" / "summary.json").read_text())
    assert result["untrained"] == ["a photo of four circles", "a photo of two squares", "a photo of three rings"]
    assert len(result["trained"]) == 9 and not set(result["trained"]) & set(result["untrained"])
    table = result["table"]
    assert list(table) == ["two", "three", "four", "all"]
    for word in ("two", "three", "four"):       # one untrained pair and three trained ones per number word
        assert table[word]["untrained"]["prompts"] == 1 and table[word]["trained"]["prompts"] == 3
    assert table["all"]["untrained"]["prompts"] == 3 and table["all"]["trained"]["prompts"] == 9
    # the held-out evaluation is the run's own: the same overall score before and after
    for policy, step in (("base", 0), ("last", 1)):
        own = json.loads((run / "eval" / f"step_{step:06d}.json").read_text())
        assert result["overall"][policy] == own["overall"]
        for p in own["prompts"]:
            if p["prompt"] in result["untrained"]:
                assert result["prompts"][p["prompt"]][policy]["accuracy"] == p["accuracy"]
    for e in result["prompts"].values():
        assert sum(e["base"]["objects"].values()) == 2          # images by objects detected, 2 per prompt
    assert "| all |" in out and "three rings" in out and out.endswith(format_tables([result]) + "\n")
    # two runs: a mean row
    assert "| mean of 2 | all |" in format_tables([result, result])
    # more images of the counting prompts alone: no overall score, the same pairs
    assert main([str(run), "--samples", "3", "--counting-only"]) == 0
    few = json.loads((run / "counting_transfer_n3_counting" / "summary.json").read_text())
    assert few["overall"] == {} and few["untrained"] == result["untrained"] and few["trained"] == result["trained"]
    assert all(sum(e[p]["objects"].values()) == 3 for e in few["prompts"].values() for p in ("base", "last"))
    assert "| mean of 2 | all |" in format_tables([few, few])
