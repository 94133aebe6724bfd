"""Evaluation: N images per held-out prompt from the rollout group, scored by the (GenEval) reward group.

Writes ``eval/step_NNNNNN.json`` (``{"overall": x, "categories": {...}, ...}``) and an image grid per category.
Seeds depend only on the prompt and sample index, so evaluations at different steps compare like with like.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from actors.types import GroupRequest
from learner.checkpoint import checkpoint_step
from policy.factory import build_decoder
from policy.files import atomic_write_json, unused_path
from policy.images import save_captioned_grid
from rewards.geneval import summarize_geneval

from .config import ConfigError, plain, section
from .data import eval_prompts
from .preflight import StartupError, prepare_output_dir, root_cause, verify_policy_init
from .ray_session import backend_session
from .reward_group import RewardGroup
from .rollout_group import RolloutGroup, RolloutStats


def eval_requests(cfg: DictConfig) -> list[GroupRequest]:
    k = cfg.eval.samples_per_prompt
    return [GroupRequest(group_id=-(i + 1), step=-1, prompt_index=i, prompt=it.prompt, metadata=it.metadata,
                         seeds=[(cfg.seed + 7919) * 100_003 + i * 101 + j for j in range(k)])
            for i, it in enumerate(eval_prompts(cfg))]


def report_path(output_dir: str | Path, step: int) -> Path:
    """`eval/step_NNNNNN.json` of a run; its category grids are in the directory of the same name without `.json`."""
    return Path(output_dir) / "eval" / f"step_{step:06d}.json"


def evaluate(cfg: DictConfig, rollouts: RolloutGroup, rewards: RewardGroup, step: int, decoder=None,
             path: Optional[Path] = None) -> dict[str, Any]:
    """Score the held-out prompts; the report goes to `path` (default: the run's `eval/step_NNNNNN.json`)."""
    k = cfg.eval.samples_per_prompt
    overrides = {"guidance_scale": float(cfg.eval.guidance_scale)}
    groups = rollouts.gather(rollouts.dispatch(eval_requests(cfg), overrides, rewards=rewards), RolloutStats(),
                             overrides, rewards=rewards)
    tags, verdicts, scores, per_prompt = [], [], [], []
    for g in groups:
        tags += [str(g.meta.metadata.get("tag", "all"))] * k
        prompt_verdicts = g.scores.strict_verdicts().tolist()
        verdicts += prompt_verdicts
        scores += g.scores.rewards.tolist()
        entry = {"prompt": g.meta.prompt, "tag": tags[-1],
                 "accuracy": sum(prompt_verdicts) / max(len(prompt_verdicts), 1)}
        objects = g.scores.objects_found()
        if objects is not None:      # how many objects its images show, e.g. {"2": 9, "3": 7}
            entry["objects"] = {str(n): c for n, c in sorted(Counter(objects.long().tolist()).items())}
        per_prompt.append(entry)
    report = summarize_geneval(tags, verdicts)
    report["prompts"] = per_prompt          # which prompts a category's score comes from
    report.update({"step": step, "reward_mean": float(torch.tensor(scores).mean()) if scores else float("nan"),
                   "samples_per_prompt": k, "guidance_scale": float(cfg.eval.guidance_scale)})
    path = atomic_write_json(path or report_path(cfg.output_dir, step), report)
    if decoder is not None and groups:
        _category_grids(rollouts, groups, tags, verdicts, k, decoder, path.with_suffix(""))
    return report


def _category_grids(rollouts: RolloutGroup, groups, tags, verdicts, k, decoder, directory: Path,
                    per_category: int = 8) -> None:
    """`<category>.png` per category: a row per prompt (its first `per_category` prompts), captioned with the
    prompt, each image framed green (correct) or red (wrong) by its strict GenEval verdict."""
    by_tag: dict[str, list] = {}
    for i, g in enumerate(groups):
        by_tag.setdefault(tags[i * k], []).append((g, verdicts[i * k:(i + 1) * k]))
    for tag, entries in by_tag.items():
        entries = entries[:per_category]
        trajs = rollouts.backend.get([g.trajectory for g, _ in entries])
        images = decoder(torch.cat([t.final_codes for t in trajs]))
        save_captioned_grid(images, directory / f"{tag}.png", [g.meta.prompt for g, _ in entries], nrow=k,
                            verdicts=[v for _, vs in entries for v in vs], scale=max(1, 128 // images.shape[1]))


def _header(cats: list[str]) -> str:
    return " | ".join(f"{c:>13}" for c in cats + ["overall"])


def _scores(report: dict[str, Any], cats: list[str]) -> str:
    vals = [report.get("categories", {}).get(c, float("nan")) for c in cats] + [report["overall"]]
    return " | ".join(f"{v:13.3f}" for v in vals)


def format_table(report: dict[str, Any], title: str = "") -> str:
    cats = list(report.get("categories", {}))
    return "\n".join(([title] if title else []) + [_header(cats), _scores(report, cats)])


def format_before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The held-out table before and after RL, one row each, and the change of the overall score."""
    cats = list(after.get("categories", {}))
    rows = [" " * 10 + _header(cats)]
    for rep in (before, after):
        rows.append(f"{'step ' + str(rep.get('step', '?')):>10}" + _scores(rep, cats))
    b, a = before["overall"], after["overall"]
    change = f"{a - b:+.3f}" + (f" ({(a - b) / b:+.0%})" if b > 0 else "")
    rows.append(f"overall {b:.3f} -> {a:.3f}, {change}")
    return "\n".join(rows)


def evaluate_command(cfg: DictConfig, checkpoint: Optional[str] = None, prompts: Optional[str] = None) -> dict:
    """`maskgrpo eval`: rollout workers with the checkpoint's weights + reward actors; prints the table. The report
    is `eval/step_NNNNNN.json` of output_dir for the checkpoint's step (0 for a release), or, when the run already
    has that file (its own evaluation), the next free name (`step_NNNNNN.1.json`): a run's reports are kept."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise ConfigError(f"--checkpoint {checkpoint!r} does not exist: give a checkpoint directory (e.g. "
                              f"runs/default/checkpoints/step_000150) or a Show-o release directory")
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
        rollouts = RolloutGroup(backend, cfg)
        rewards = RewardGroup.from_config(backend, cfg, plain(cfg.eval.rewards) or plain(cfg.rewards))
        try:
            decoder = build_decoder(section(cfg, "policy"), "cpu")
            report = evaluate(cfg, rollouts, rewards, step=step, decoder=decoder, path=out)
        except Exception as e:           # an actor could not load the weights, or died
            if backend.name != "ray" or not _is_ray_error(e):
                raise
            raise StartupError(f"evaluation of policy.init={str(cfg.policy.init)!r} failed: {root_cause(e)}") from None
        finally:
            rollouts.shutdown()
            rewards.shutdown()
    print(format_table(report, f"GenEval ({cfg.policy.init})"))
    print(f"reward mean {report['reward_mean']:.4f}; report {out}, image grids in {out.with_suffix('')}")
    return report


def _is_ray_error(e: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(e).__mro__)
