"""Evaluation: N images per held-out prompt from the rollout workers, scored by the (GenEval) reward actors.

Writes ``eval/step_NNNNNN.json`` (``{"overall": x, "categories": {...}, ...}``) and an image grid per category.
Seeds depend only on the prompt and sample index, so evaluations at different steps compare like with like.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import ray
import torch
from omegaconf import DictConfig

from actors.types import GroupRequest
from policy.files import atomic_write_json

from .data import eval_prompts
from .fleet import RolloutFleet, RolloutStats


def eval_requests(cfg: DictConfig) -> list[GroupRequest]:
    k = cfg.eval.samples_per_prompt
    return [GroupRequest(group_id=-(i + 1), step=-1, prompt_index=i, prompt=it.prompt, metadata=it.metadata,
                         seeds=[(cfg.seed + 7919) * 100_003 + i * 101 + j for j in range(k)])
            for i, it in enumerate(eval_prompts(cfg))]


def report_path(output_dir: str | Path, step: int) -> Path:
    """`eval/step_NNNNNN.json` of a run; its category grids are in the directory of the same name without `.json`."""
    return Path(output_dir) / "eval" / f"step_{step:06d}.json"


def evaluate(cfg: DictConfig, fleet: RolloutFleet, pool, step: int, decoder=None,
             path: Optional[Path] = None) -> dict[str, Any]:
    """Score the held-out prompts; the report goes to `path` (default: the run's `eval/step_NNNNNN.json`)."""
    from rewards.geneval import summarize_geneval
    k = cfg.eval.samples_per_prompt
    overrides = {"guidance_scale": float(cfg.eval.guidance_scale)}
    groups = fleet.gather(fleet.dispatch(eval_requests(cfg), overrides, rewards=pool), RolloutStats(), overrides,
                          rewards=pool)
    scores = [g.scores for g in groups]
    tags, verdicts, rewards = [], [], []
    for g, s in zip(groups, scores):
        tags += [str(g.meta.metadata.get("tag", "all"))] * k
        verdicts += _strict_verdicts(s).tolist()
        rewards += s["rewards"].tolist()
    report = summarize_geneval(tags, verdicts)
    report.update({"step": step, "reward_mean": float(torch.tensor(rewards).mean()) if rewards else float("nan"),
                   "samples_per_prompt": k, "guidance_scale": float(cfg.eval.guidance_scale)})
    path = atomic_write_json(path or report_path(cfg.output_dir, step), report)
    if decoder is not None and groups:
        _category_grids(groups, tags, verdicts, k, decoder, path.with_suffix(""))
    return report


def _strict_verdicts(scored: dict[str, Any]) -> torch.Tensor:
    """GenEval's 0/1 verdicts of a scored group (the `<label>/strict` detail of the GenEval reward); without a
    GenEval reward, the reward itself thresholded at 0.5."""
    keys = [k for k in scored["details"] if k == "strict" or k.endswith("/strict")]
    if keys:
        return scored["details"][keys[0]]
    return (scored["rewards"] >= 0.5).float()


def _category_grids(groups, tags, verdicts, k, decoder, directory: Path, per_category: int = 8) -> None:
    """`<category>.png` per category: a row per prompt (its first `per_category` prompts), captioned with the
    prompt, each image framed green (correct) or red (wrong) by its strict GenEval verdict."""
    from policy.images import save_captioned_grid
    by_tag: dict[str, list] = {}
    for i, g in enumerate(groups):
        by_tag.setdefault(tags[i * k], []).append((g, verdicts[i * k:(i + 1) * k]))
    for tag, entries in by_tag.items():
        entries = entries[:per_category]
        trajs = ray.get([g.traj_ref for g, _ in entries])
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
    from policy.files import unused_path
    from .config import ConfigError, plain, section
    from .launch import start_reward_pool
    from .preflight import StartupError, prepare_output_dir, root_cause, verify_policy_init
    from learner.checkpoint import checkpoint_step
    from .train import init_ray, shutdown_local_ray
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
    mode = init_ray(cfg)
    try:
        fleet = RolloutFleet(cfg)
        specs = plain(cfg.eval.rewards) or plain(cfg.rewards)
        pool = start_reward_pool(cfg, specs)
        try:
            from policy.factory import build_decoder
            decoder = build_decoder(section(cfg, "policy"), "cpu")
            report = evaluate(cfg, fleet, pool, step=step, decoder=decoder, path=out)
        except ray.exceptions.RayError as e:           # an actor could not load the weights, or died
            raise StartupError(f"evaluation of policy.init={str(cfg.policy.init)!r} failed: {root_cause(e)}") from None
        finally:
            fleet.shutdown()
            pool.shutdown()
    finally:
        if mode == "local":
            shutdown_local_ray()
    print(format_table(report, f"GenEval ({cfg.policy.init})"))
    print(f"reward mean {report['reward_mean']:.4f}; report {out}, image grids in {out.with_suffix('')}")
    return report
