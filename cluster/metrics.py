"""Per-step metrics: one JSON object a line in metrics.jsonl always; TensorBoard / W&B when configured."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from policy.files import atomic_write_text


class MetricsFileError(ValueError):
    """metrics.jsonl holds a damaged line other than the last one; the message names the file, line and fix."""


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A damaged LAST line (a kill or a full disk during the write leaves one) is
    dropped with a note: its step is re-run after a resume. A damaged line elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"[maskgrpo] {path}:{i + 1}: the last line is incomplete (the run was stopped while writing "
                      f"it); dropping it", flush=True)
                break
            raise MetricsFileError(f"{path}:{i + 1}: not a JSON record ({e}): repair or delete that line, then "
                                   f"resume again") from None
        records.append(record)
    return records


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = False, wandb_project: Optional[str] = None,
                 config: Optional[dict[str, Any]] = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, so the curve continues without duplicates."""
        truncate_metrics(self.path.parent, step, "after the checkpoint")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(record.get("step", 0))
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(output_dir: str | Path, step: int, where: str) -> list[int]:
    """Keep the lines of steps <= `step` in ``output_dir/metrics.jsonl`` (their steps run again), so that the
    metrics always describe the weights a run continues from; -1 keeps none (a resume that found no checkpoint).
    Prints what was dropped, `where` saying relative to what; returns the dropped steps."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = _read_records(path)
    keep = [r for r in records if r.get("step", -1) <= step]
    dropped = [r.get("step") for r in records if r.get("step", -1) > step]
    if dropped:
        print(f"[maskgrpo] {path}: {len(dropped)} lines of steps {where} (steps {dropped[0]}..{dropped[-1]}) "
              f"dropped; those steps run again", flush=True)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return dropped


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    return _read_records(Path(output_dir) / "metrics.jsonl")
