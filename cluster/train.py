"""`maskgrpo train` / `python -m cluster.train`: Mask-GRPO training on a Ray cluster, on this machine's own Ray
instance, or in this one process (`cluster.backend=local`); see `cluster.ray_session` for how Ray is joined.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from omegaconf import OmegaConf
from tqdm import tqdm

from learner.checkpoint import (OldFormatError, check_data_files, checkpoint_step, pick_resume_checkpoint,
                                verify_checkpoint)
from policy.files import unused_path
from policy.weights import CheckpointError

from .config import Backend, ConfigError, save_resolved
from .driver import Trainer
from .errors import Interrupted, LearnerFailure
from .evaluate import eval_scalars, format_before_after, format_table, report_path
from .metrics import truncate_metrics
from .plots import reward_curve
from .preflight import (StartupError, check_cluster_resources, check_local_resources, check_prompt_lengths,
                        config_changes, prepare_output_dir, refuse_to_mix_runs, release_output_dir,
                        verify_policy_init, verify_resume_lora)
from .pretrain import ensure_base_policy
from .ray_session import backend_session, cluster_address, in_ray_job
from .runtime import cpu_deepspeed_env, watch_cluster


def _resume_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint to continue from; `resume=auto` prints which one and why, every time. Its files are checked
    to be data (JSON / safetensors) here, before any actor starts: one replaced on purpose stops the run."""
    if cfg.resume is None:
        return None
    root = Path(cfg.output_dir) / "checkpoints"
    if cfg.resume == "auto":
        try:
            found, line = pick_resume_checkpoint(root)
        except OldFormatError as e:
            raise StartupError(f"resume=auto: {e}") from None
        print(f"[maskgrpo] {line}", flush=True)
        if found is not None:
            try:
                check_data_files(found, verify_checkpoint(found, check_hash=False))
            except CheckpointError as e:
                raise StartupError(f"resume=auto: {e}") from None
        return str(found) if found else None
    try:
        check_data_files(cfg.resume, verify_checkpoint(cfg.resume))
    except OldFormatError as e:
        raise StartupError(f"resume={cfg.resume}: {e}") from None
    except CheckpointError as e:
        raise StartupError(f"resume={cfg.resume}: {e}; resume=auto continues from the newest intact checkpoint "
                           f"of output_dir") from None
    return str(cfg.resume)


def keep_history(cfg: DictConfig, step: int) -> None:
    """Before a resumed run writes its own config.yaml and timeline.json, keep the earlier ones (as
    ``config.before_step_NNNNNN.yaml`` when the config changed, ``timeline.before_step_NNNNNN.json``) and name
    every changed key, so that the run directory still says what trained steps 0..step-1. A timeline of an
    attempt that resumed from the same step and failed is dropped (it timed nothing that the weights hold)."""
    out = Path(cfg.output_dir)
    saved_path = out / "config.yaml"
    if saved_path.is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        except Exception as e:                     # a damaged config.yaml must not stop the resume
            changes = [f"(the saved config.yaml is unreadable: {type(e).__name__})"]
        else:
            # compared as config.yaml would hold it (the YAML round trip turns tuples into lists)
            changes = config_changes(saved, OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg,
                                                                                                       resolve=True))))
        if changes:
            kept = unused_path(out / f"config.before_step_{step:06d}.yaml")
            os.replace(saved_path, kept)
            print(f"[maskgrpo] resuming with a changed config ({len(changes)} keys; steps before {step} ran with "
                  f"{kept.name}):\n  " + "\n  ".join(changes), flush=True)
    timeline, kept = out / "timeline.json", out / f"timeline.before_step_{step:06d}.json"
    if timeline.is_file():
        if kept.exists():      # the run up to `step` is kept already: this one is of a resume that failed
            timeline.unlink()
        else:
            os.replace(timeline, kept)


class InterruptGuard:
    """Defers Ctrl-C (and SIGTERM, which `ray job stop` sends) while a training step is in flight (rollouts,
    update, weight sync, metrics line), so that an interrupt never lands between the learner's update and the
    driver's bookkeeping: the step completes, then the run stops with a consistent checkpoint. A second signal
    stops at once (no checkpoint is saved then).

    Python runs a signal's handler only when the main thread is back in the interpreter, and signals that arrive
    while it waits in C (e.g. in ``ray.get``) call the handler once: two Ctrl-C 0.5 s apart looked like one. A
    wakeup fd (`signal.set_wakeup_fd`) receives one byte per delivered signal, so the handler counts them all."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def delivered() -> int:
            """Signals of ours delivered since the last call (at least this one)."""
            try:
                data = os.read(read_fd, 4096)
            except BlockingIOError:
                data = b""
            return max(1, sum(1 for b in data if b in self.SIGNALS))

        def handler(signum, frame):
            count = delivered()
            if self.pending or count >= 2:
                self.pending = False
                for sig, old in previous.items():
                    signal.signal(sig, old)
                raise KeyboardInterrupt
            self.pending = True
            what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM (e.g. ray job stop)"
            print(f"\n[maskgrpo] {what}: finishing the step in flight, then saving a checkpoint (a second signal "
                  "stops at once, without saving)", flush=True)

        for sig in self.SIGNALS:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(old_wakeup)
            os.close(read_fd)
            os.close(write_fd)
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training to `max_steps`; returns a summary (evaluations before and after, last checkpoint). Everything
    that can be checked before an actor starts is checked first (see `cluster.preflight`)."""
    cpu_deepspeed_env()
    if in_ray_job() and not Path(cfg.output_dir).expanduser().is_absolute():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is relative: under `ray job submit` the driver runs in a "
                          f"temporary copy of --working-dir that disappears with the Ray session (and is shared by "
                          f"jobs with the same code); give an absolute path on storage that outlives the job, e.g. "
                          f"output_dir=/shared/runs/<name>")
    prepare_output_dir(cfg.output_dir)
    refuse_to_mix_runs(cfg.output_dir, cfg.resume)
    local_ray = cfg.cluster.backend == Backend.ray and not (in_ray_job() or cluster_address(cfg))
    if local_ray:
        check_local_resources(cfg)
    ensure_base_policy(cfg)
    note = verify_policy_init(cfg)
    if note:
        print(f"[maskgrpo] {note}", flush=True)
    note = check_prompt_lengths(cfg)
    if note:
        print(f"[maskgrpo] warning: {note}", flush=True)
    resume = _resume_path(cfg)
    if resume is not None:
        verify_resume_lora(cfg, resume)
        done = checkpoint_step(resume)
        if done >= cfg.max_steps:
            print(f"[maskgrpo] {resume} is at step {done} >= max_steps={cfg.max_steps}: nothing to train (raise "
                  f"max_steps to continue)", flush=True)
            release_output_dir(cfg.output_dir)
            return {"output_dir": cfg.output_dir, "checkpoint": resume, "nothing_to_do": True}
        keep_history(cfg, done)
    elif cfg.resume is not None:       # nothing saved to continue from: no line of the earlier attempt stays
        truncate_metrics(cfg.output_dir, -1, "of an attempt that saved no checkpoint")
    save_resolved(cfg, cfg.output_dir)
    try:
        return _run(cfg, resume)
    finally:
        release_output_dir(cfg.output_dir)


def _run(cfg: DictConfig, resume: Optional[str]) -> dict[str, Any]:
    """Start the role groups on the configured backend and train."""
    with backend_session(cfg) as (backend, mode):
        trainer, watch = None, None
        try:
            if backend.name == "ray":
                # a private local instance never grows: no point waiting for nodes an autoscaler might add
                check_cluster_resources(cfg, 0.0 if mode == "local" else cfg.cluster.resource_wait_s)
            if mode == "cluster":          # a cluster this process does not own can go away under it
                watch = watch_cluster(cfg.cluster.cluster_lost_s)
            trainer = Trainer(cfg, backend)
            return _train_loop(cfg, trainer, resume)
        finally:
            if watch is not None:
                watch.set()
            if trainer is not None:
                trainer.timeline.write()
                trainer.shutdown()


def _train_loop(cfg: DictConfig, trainer: Trainer, resume: Optional[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"output_dir": cfg.output_dir}
    if resume:
        trainer.resume(resume)
        print(f"[maskgrpo] resumed from {resume} at step {trainer.step}", flush=True)
    trainer.sync_weights()
    if cfg.eval.at_start and trainer.step == 0:
        summary["eval_start"] = trainer.evaluate(0)
        print(format_table(summary["eval_start"], "evaluation at step 0"), flush=True)
    bar = tqdm(initial=trainer.step, total=cfg.max_steps, desc="train", disable=not cfg.logging.progress,
               dynamic_ncols=True)
    guard = InterruptGuard()
    in_step = False
    try:
        while trainer.step < cfg.max_steps:
            with guard.deferred():
                in_step = True
                try:
                    record = _one_step(cfg, trainer)
                except LearnerFailure as e:      # cluster.learner_restarts: rebuild from the last checkpoint
                    if trainer.learner_restarts >= cfg.cluster.learner_restarts:
                        raise
                    trainer.restart_learner(e)
                    bar.n = trainer.step
                    in_step = False
                    continue
                step = record["step"]
                in_step = False
            bar.update(1)
            bar.set_postfix_str(progress_line(record), refresh=False)
            if not cfg.logging.progress:
                print(f"[maskgrpo] step {step} {progress_line(record)}", flush=True)
    except KeyboardInterrupt:
        if in_step:    # a second Ctrl-C inside a step: learner and driver may disagree, so save nothing
            raise Interrupted(trainer.step, trainer.last_checkpoint, consistent=False) from None
        print("[maskgrpo] interrupted: saving a checkpoint before shutting down", flush=True)
        raise Interrupted(trainer.step, trainer.save_checkpoint()) from None
    summary["checkpoint"] = trainer.save_checkpoint()
    summary["eval_end"] = trainer.evaluate(trainer.step)
    print(format_table(summary["eval_end"], f"evaluation at step {trainer.step}"), flush=True)
    summary["reward_curve"] = str(reward_curve(cfg.output_dir))
    summary["counters"] = dict(trainer.counters)
    summary["busy_share"] = trainer.timeline.busy_share()
    summary["timeline"] = str(trainer.timeline.write())
    _print_outcome(cfg, summary)
    return summary


def _one_step(cfg: DictConfig, trainer: Trainer) -> dict[str, Any]:
    """A training step with its samples, evaluation and checkpoint when due; returns its metrics line (logged)."""
    result = trainer.train_step()
    step = result.step
    last = step == cfg.max_steps - 1
    if cfg.logging.sample_every and step % cfg.logging.sample_every == 0 or step == 0 or last:
        trainer.save_samples(step, trainer.last_groups)
    if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
        result.extra.update(eval_scalars(trainer.evaluate(step + 1)))
    if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
        result.extra["checkpoint"] = trainer.save_checkpoint()
    record = result.to_json()
    trainer.metrics.log(record)
    return record


def progress_line(record: dict[str, Any]) -> str:
    """What a GRPO user watches each step (every figure is also in metrics.jsonl under the same name)."""
    on_policy = record.get("learner/on_policy_ratio_dev")
    return (f"reward {record['reward_mean']:.3f} ± {record['reward_std']:.3f} | "
            f"clip {record.get('learner/clip_frac', 0.0):.3f} approx_kl {record.get('learner/approx_kl', 0.0):.2e} "
            f"ratio_max {record.get('learner/ratio_max', 0.0):.2f} "
            + (f"on-policy |r-1| {on_policy:.1e} " if on_policy is not None and on_policy == on_policy else "")
            + f"grad {record.get('learner/grad_norm', 0.0):.2f} | groups {int(record.get('kept_groups', 0))}/"
            f"{record['groups']} | {record['images_per_second']:.1f} img/s | stale {record['staleness_mean']:.1f}"
            + (f" | compute {record['compute_tokens'] / 1e3:.0f}k tok" if "compute_tokens" in record else ""))


def _print_outcome(cfg: DictConfig, summary: dict[str, Any]) -> None:
    """The run's result for a newcomer: held-out scores before and after RL, and where the pictures are."""
    start, end = report_path(cfg.output_dir, 0), report_path(cfg.output_dir, int(summary["eval_end"]["step"]))
    # read step 0 from disk when this process did not evaluate it (a resumed run)
    before = summary.get("eval_start") or (json.loads(start.read_text()) if start.is_file() else None)
    after = summary["eval_end"]
    if before is not None:
        print(f"\n[maskgrpo] held-out evaluation ({cfg.eval.samples_per_prompt} images per prompt), "
              f"before and after RL:\n{format_before_after(before, after)}")
    grids = f"{end.with_suffix('')}/" + (f" (after), {start.with_suffix('')}/ (before)" if before is not None else "")
    print(f"[maskgrpo] reward curve: {summary['reward_curve']}\n[maskgrpo] image grids: {grids}, "
          f"{Path(cfg.output_dir) / 'samples'}/\n[maskgrpo] last checkpoint: {summary['checkpoint']}", flush=True)
    share = ", ".join(f"{role} {100 * v:.0f} %" for role, v in summary["busy_share"].items())
    print(f"[maskgrpo] timeline: {summary['timeline']} (open in https://ui.perfetto.dev); busy share of the "
          f"wall time: {share}", flush=True)


if __name__ == "__main__":     # `python -m cluster.train ...` is `maskgrpo train ...` (for `ray job submit`)
    from cluster.cli import main
    raise SystemExit(main(["train", *sys.argv[1:]]))
