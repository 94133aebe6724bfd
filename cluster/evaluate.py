"""Evaluation: N images per held-out prompt from the rollout group, scored by the evaluation's reward group.

Writes ``eval/step_NNNNNN.json``: ``{"metrics": {"<metric>": {"mean", "ci95", "groups", ...}}, "prompts": [...],
...}``, with GenEval's ``overall`` and ``categories`` when a GenEval reward gives verdicts, and an image grid per
prompt group (docs/evaluation.md). Seeds depend only on the prompt and sample index, so evaluations at different
steps compare like with like.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from actors.types import GroupRequest
from learner.checkpoint import checkpoint_step
from policy.factory import build_decoder
from policy.files import atomic_write_json, unused_path
from policy.images import save_captioned_grid
from rewards.base import PromptScores, reward_class

from .config import ConfigError, plain, section, world_kwargs
from .data import EVAL_STEP, eval_prompts, sample_seeds
from .intervals import format_interval, mean_interval, paired_change
from .preflight import StartupError, prepare_output_dir, root_cause, verify_policy_init
from .ray_session import backend_session
from .fleet import RolloutFleet
from .reward_group import RewardGroup
from .rollout_group import RolloutGroup, RolloutStats


def eval_requests(cfg: DictConfig) -> list[GroupRequest]:
    k = cfg.eval.samples_per_prompt
    return [GroupRequest(group_id=-(i + 1), step=EVAL_STEP, prompt_index=i, prompt=it.prompt, metadata=it.metadata,
                         seeds=sample_seeds(cfg.seed, EVAL_STEP, i, k))
            for i, it in enumerate(eval_prompts(cfg))]


def report_path(output_dir: str | Path, step: int) -> Path:
    """`eval/step_NNNNNN.json` of a run; its category grids are in the directory of the same name without `.json`."""
    return Path(output_dir) / "eval" / f"step_{step:06d}.json"


def eval_reward_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The evaluation's rewards: `eval.rewards`, or the training rewards when it is empty."""
    return list(plain(OmegaConf.select(cfg, "eval.rewards", default=None)) or
                plain(OmegaConf.select(cfg, "rewards", default=None)) or [])


def evaluate(cfg: DictConfig, rollouts: RolloutGroup, rewards: RewardGroup, step: int, decoder=None,
             path: Optional[Path] = None) -> dict[str, Any]:
    """Score the held-out prompts; the report goes to `path` (default: the run's `eval/step_NNNNNN.json`).

    Each reward contributes its metrics (`Reward.summarize_evaluation`: its mean score; GenEval also its strict
    verdicts), each written with its mean and 95 % interval overall and per prompt group (`cluster.intervals`)
    under ``metrics``. The first reward with verdicts (GenEval) adds its keys (``overall``, ``categories``, and
    ``accuracy``/``objects`` per prompt); without one the report has none of them."""
    k = cfg.eval.samples_per_prompt
    overrides = {"guidance_scale": float(cfg.eval.guidance_scale)}
    pending = rollouts.dispatch(eval_requests(cfg), overrides)
    rewards.score_rollouts(pending)                   # streamed: each worker's groups scored as they exist
    groups = rollouts.gather(pending, rewards, RolloutStats())
    tags = [str(g.meta.metadata.get("tag", "all")) for g in groups]
    per_prompt: list[dict[str, Any]] = [{"prompt": g.meta.prompt, "tag": t} for g, t in zip(groups, tags)]
    classes = {spec.get("label") or spec.get("name"): reward_class(spec) for spec in eval_reward_specs(cfg)}
    metrics: dict[str, dict[str, Any]] = {}
    owned: dict[str, Any] = {}            # the report's keys from the reward with verdicts
    verdicts = None
    for label in (groups[0].scores.components if groups else {}):
        prompts = [PromptScores(g.meta.prompt, t, g.scores.components[label].tolist(),
                                {key[len(label) + 1:]: v.tolist() for key, v in g.scores.details.items()
                                 if key.startswith(label + "/")}) for g, t in zip(groups, tags)]
        # a component the config does not name came from a reward server: its label is the server's reward name
        summary = (classes.get(label) or reward_class(label)).summarize_evaluation(label, prompts)
        for name, (values, aggregate) in summary.metrics.items():
            metrics[name] = {**mean_interval(values, tags, aggregate), "images": sum(len(p.scores) for p in prompts),
                             "aggregate": aggregate, "reward": label, "verdicts": summary.verdicts is not None
                             and name != label, "per_prompt": [float(x) for x in values]}
        if summary.verdicts is not None and verdicts is None:
            verdicts = summary.verdicts
            owned = summary.report
            for entry, extra in zip(per_prompt, summary.prompts):
                entry.update(extra)
    scores = [x for g in groups for x in g.scores.rewards.tolist()]
    report = {**owned, "prompts": per_prompt,    # which prompts a group's score comes from
              "step": step, "reward_mean": float(torch.tensor(scores).mean()) if scores else float("nan"),
              "samples_per_prompt": k, "guidance_scale": float(cfg.eval.guidance_scale), "metrics": metrics}
    path = atomic_write_json(path or report_path(cfg.output_dir, step), report)
    if decoder is not None and groups:
        if verdicts is not None:
            marks = {"verdicts": [v for vs in verdicts for v in vs]}
        else:                                      # the first reward's score of each image, in the caption
            label = next(iter(groups[0].scores.components))
            marks = {"scores": [x for g in groups for x in g.scores.components[label].tolist()], "score_name": label}
        _category_grids(rollouts, groups, tags, k, decoder, path.with_suffix(""), marks)
    return report


def _category_grids(rollouts: RolloutGroup, groups, tags, k, decoder, directory: Path, marks: dict[str, Any],
                    per_category: int = 8) -> None:
    """`<category>.png` per prompt group: a row per prompt (its first `per_category` prompts), captioned with the
    prompt; each image framed green (correct) or red (wrong) by its strict GenEval verdict (`marks["verdicts"]`),
    or, without verdicts, captioned with its score (`marks["scores"]` of the reward `marks["score_name"]`)."""
    by_tag: dict[str, list] = {}
    for i, g in enumerate(groups):
        by_tag.setdefault(tags[i], []).append(i)
    for tag, index in by_tag.items():
        index = index[:per_category]
        trajs = rollouts.backend.get([groups[i].trajectory for i in index])
        images = decoder(torch.cat([t.final_codes for t in trajs]))
        per_image = {key: [v for i in index for v in values[i * k:(i + 1) * k]]
                     for key, values in marks.items() if key != "score_name"}
        save_captioned_grid(images, directory / f"{tag}.png", [groups[i].meta.prompt for i in index], nrow=k,
                            scale=max(1, 128 // images.shape[1]), **per_image,
                            **({"score_name": marks["score_name"]} if "score_name" in marks else {}))


# ---------------------------------------------------------------------------------------------- tables

def _header(cats: list[str]) -> str:
    return " | ".join(f"{c:>13}" for c in cats + ["overall"])


def _scores(report: dict[str, Any], cats: list[str]) -> str:
    vals = [report.get("categories", {}).get(c, float("nan")) for c in cats] + [report["overall"]]
    return " | ".join(f"{v:13.3f}" for v in vals)


def _other_metrics(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metrics a table lists beside GenEval's: all of them without verdicts, else those of the rewards that
    own none (a GenEval reward's own score and verdicts are the table above them)."""
    metrics = report.get("metrics", {})
    if "overall" not in report:
        return metrics
    owners = {m["reward"] for m in metrics.values() if m.get("verdicts")}
    return {name: m for name, m in metrics.items() if m.get("reward") not in owners}


def _metric_rows(metrics: dict[str, dict[str, Any]]) -> list[str]:
    width = max([len(n) for n in metrics] + [len("metric")]) + 2
    rows = [f"{'metric':<{width}}{'mean':>10}  {'95% interval':<24}{'prompts':>8}"]
    for name, m in metrics.items():
        rows.append(f"{name:<{width}}{m['mean']:>10.4g}  {format_interval(m.get('ci95')):<24}{m.get('n', 0):>8}")
        if len(m.get("groups", {})) > 1:
            for tag, g in m["groups"].items():
                rows.append(f"{'  ' + tag:<{width}}{g['mean']:>10.4g}  {format_interval(g.get('ci95')):<24}"
                            f"{g.get('n', 0):>8}")
    return rows


def format_table(report: dict[str, Any], title: str = "") -> str:
    """GenEval's table (categories and overall) for a report with verdicts; each other metric's mean, 95 % interval
    and prompts, overall and per group."""
    lines = [title] if title else []
    if "overall" in report:
        cats = list(report.get("categories", {}))
        lines += [_header(cats), _scores(report, cats)]
    others = _other_metrics(report)
    if others:
        lines += _metric_rows(others)
    return "\n".join(lines)


def format_before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The held-out table before and after RL: GenEval's rows and the change of its overall score when there are
    verdicts; each other metric's mean and 95 % interval at both steps and the change, with the interval of the
    paired per-prompt differences (when both evaluations scored the same prompts)."""
    rows = []
    if "overall" in after and "overall" in before:
        cats = list(after.get("categories", {}))
        rows = [" " * 10 + _header(cats)]
        for rep in (before, after):
            rows.append(f"{'step ' + str(rep.get('step', '?')):>10}" + _scores(rep, cats))
        b, a = before["overall"], after["overall"]
        change = f"{a - b:+.3f}" + (f" ({(a - b) / b:+.0%})" if b > 0 else "")
        rows.append(f"overall {b:.3f} -> {a:.3f}, {change}")
    others = _other_metrics(after)
    if others:
        same = [p.get("prompt") for p in before.get("prompts", [])] == [p.get("prompt") for p in after.get("prompts", [])]
        tags = [p.get("tag", "all") for p in after.get("prompts", [])]
        width = max(len(n) for n in others) + 2
        head = f"step {before.get('step', '?')}", f"step {after.get('step', '?')}"
        rows.append(f"{'metric':<{width}}{head[0]:>34}{head[1]:>34}{'change (paired 95% interval)':>42}")
        for name, a in others.items():
            b = before.get("metrics", {}).get(name)
            if b is None:
                rows.append(f"{name:<{width}}{'-':>34}{a['mean']:>10.4g} {format_interval(a.get('ci95')):>23}")
                continue
            change = f"{a['mean'] - b['mean']:+.4g}"
            if same and len(a.get("per_prompt", [])) == len(b.get("per_prompt", [])) == len(tags):
                paired = paired_change(b["per_prompt"], a["per_prompt"], tags, a.get("aggregate", "prompts"))
                change += " " + format_interval(paired["ci95"], signed=True)
            rows.append(f"{name:<{width}}{b['mean']:>10.4g} {format_interval(b.get('ci95')):>23}"
                        f"{a['mean']:>10.4g} {format_interval(a.get('ci95')):>23}{change:>42}")
    return "\n".join(rows)


def eval_scalars(report: dict[str, Any]) -> dict[str, float]:
    """What a run's metrics.jsonl records of an evaluation between the first and the last: GenEval's overall
    (``eval_overall``) with verdicts, else each metric's mean (``eval/<metric>``)."""
    if "overall" in report:
        return {"eval_overall": report["overall"]}
    return {f"eval/{name}": m["mean"] for name, m in report.get("metrics", {}).items()}


def evaluate_command(cfg: DictConfig, checkpoint: Optional[str] = None, prompts: Optional[str] = None) -> dict:
    """`maskgrpo eval`: rollout workers with the checkpoint's weights + reward actors; prints the table. The report
    is `eval/step_NNNNNN.json` of output_dir for the checkpoint's step (0 for a release), or, when the run already
    has that file (its own evaluation), the next free name (`step_NNNNNN.1.json`): a run's reports are kept."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise ConfigError(f"--checkpoint {checkpoint!r} does not exist: give a checkpoint directory (e.g. "
                              f"runs/default/checkpoints/step_000150) or a released model directory (Show-o, "
                              f"Meissonic)")
        cfg.policy.init = str(path)   # a training checkpoint holds config.json + pytorch_model.safetensors
    if prompts is not None:
        cfg.data.eval_prompts = prompts
    prepare_output_dir(cfg.output_dir)
    note = verify_policy_init(cfg)
    if note:
        print(f"[maskgrpo] {note}", flush=True)
    init = Path(str(cfg.policy.init)).expanduser()
    step = checkpoint_step(init) if init.is_dir() else 0
    out = unused_path(report_path(cfg.output_dir, step))
    with backend_session(cfg) as (backend, _):
        fleet = RolloutFleet(backend, cfg)
        rollouts = RolloutGroup(backend, cfg, fleet)
        rewards = RewardGroup.from_config(backend, cfg, eval_reward_specs(cfg))
        try:
            decoder = build_decoder(section(cfg, "policy"), "cpu", world_kwargs(cfg))
            report = evaluate(cfg, rollouts, rewards, step=step, decoder=decoder, path=out)
        except Exception as e:           # an actor could not load the weights, or died
            if backend.name != "ray" or not _is_ray_error(e):
                raise
            raise StartupError(f"evaluation of policy.init={str(cfg.policy.init)!r} failed: {root_cause(e)}") from None
        finally:
            fleet.shutdown()
            rewards.shutdown()
    print(format_table(report, f"{'GenEval' if 'overall' in report else 'held-out evaluation'} ({cfg.policy.init})"))
    print(f"reward mean {report['reward_mean']:.4f}; report {out}, image grids in {out.with_suffix('')}")
    return report


def _is_ray_error(e: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(e).__mro__)
