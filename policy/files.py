"""Writing files so that a crash, a kill or a full disk never leaves a half-written file under the real name.

Every file the project writes for later reading (weights, configs, manifests, metrics, evaluation reports) goes
through `atomic_write`: the content is written to a temporary name beside the target, flushed to disk, then
renamed over the target in one step. When the write fails (ENOSPC, EIO...), the temporary file is removed and a
full disk is named as such (`DiskFullError`), so the disk is not left fuller and the cause is plain.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


class DiskFullError(OSError):
    """No space left on the device that holds a run's files; the message names the path and the free space."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(err: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, and for the errors libraries raise on a short write (torch's zip writer says
    'unexpected pos' and safetensors 'No space left') when the cause chain carries no errno."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and ("No space left" in str(e) or "unexpected pos" in str(e)):
            return True
    return False


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    free = free_bytes(path)
    return DiskFullError(errno.ENOSPC, f"the disk holding {str(path)!r} is full ({free / 2**20:.1f} MiB free) while "
                                       f"writing it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                       f"free space or choose another output_dir, then resume with resume=auto "
                                       f"(files written before are intact)")


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or directory tree if it exists (debris of a failed write)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `directory` (a manifest's "files" entry)."""
    root = Path(directory)
    return {f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != "manifest.json"}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_path(tmp)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def unused_path(path: str | os.PathLike) -> Path:
    """`path`, or `path` with .1, .2, ... before its suffix when that name is taken: for files kept beside the
    ones a run writes (an earlier run's timeline, a second evaluation of the same step), never overwriting."""
    path = Path(path)
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate
