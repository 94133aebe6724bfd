"""Prompt datasets: plain text (one prompt a line), JSONL (GenEval metadata or any object with "prompt"), or
Parquet (a `prompt` column, read with pyarrow). Malformed files fail with the file, line and fix."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    pass


@dataclass
class PromptItem:
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)   # GenEval fields (tag, include, exclude) when present


def read_prompts(path: str | Path) -> list[PromptItem]:
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file {str(p)!r} not found")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        items = _read_parquet(p)
    elif suffix in (".jsonl", ".json"):
        items = _read_jsonl(p)
    else:
        items = [PromptItem(line.strip()) for line in read_text(p).splitlines() if line.strip()]
    if not items:
        raise PromptFileError(f"prompt file {str(p)!r} holds no prompts")
    return items


def read_text(p: Path) -> str:
    """A prompt file's text (UTF-8, a leading byte-order mark dropped); PromptFileError naming the file, line and
    column of the first byte that is not UTF-8, and the fix."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PromptFileError(f"{p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}): save the "
                              f"file as UTF-8, e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}") from None


def _read_jsonl(p: Path) -> list[PromptItem]:
    items = []
    for n, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object "
                                  f"with a \"prompt\" field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise PromptFileError(f"{p}:{n}: each line needs a non-empty string field \"prompt\"")
        items.append(PromptItem(obj["prompt"], {k: v for k, v in obj.items() if k != "prompt"}))
    return items


def _read_parquet(p: Path) -> list[PromptItem]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(p)
    except Exception as e:
        raise PromptFileError(f"{p}: not a readable Parquet file ({e})") from None
    if "prompt" not in table.column_names:
        raise PromptFileError(f"{p}: no 'prompt' column (columns: {table.column_names})")
    rows = table.to_pylist()
    items = []
    for n, row in enumerate(rows):
        prompt = row.pop("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{p}: row {n} has an empty or non-string prompt")
        for key in ("include", "exclude"):   # GenEval clauses stored as JSON strings
            if isinstance(row.get(key), str):
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{p}: row {n}: column {key!r} is not valid JSON ({e.msg})") from None
        items.append(PromptItem(prompt, row))
    return items
