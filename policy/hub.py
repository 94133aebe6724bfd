"""Models by name: every weight path of the `policy` section (`policy.init`, the text encoder, tokenizer and decoder
paths) may be a local directory or a Hugging Face Hub id, ``org/name`` or ``org/name/sub/folder`` (a folder of the
repository, e.g. ``MeissonFlow/Meissonic/vqvae``), resolved through huggingface_hub's cache.

The cache is read first, without the network. Offline (``HF_HUB_OFFLINE=1``) an id that is not cached fails here,
at load, naming the id and the fix; online it is downloaded once into the cache (the driver resolves every path
before any actor starts, so workers find it cached). The cache directory is huggingface_hub's: ``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when a path is resolved.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .weights import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(value: str) -> bool:
    """Whether `value` has the shape of a Hub id (``org/name[/folder]``) rather than a filesystem path."""
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "~")) and ".." not in value.split("/")


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_path(value: str | os.PathLike, key: str) -> Path:
    """The local directory (or file) for `value`: itself when it exists, else the cached snapshot of the Hub id it
    names (downloaded when online and not cached yet). `key` names the config key in errors."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    text = str(value)
    if not is_hub_id(text):
        raise CheckpointError(f"{key}={text!r} does not exist: give a local directory, or a Hugging Face Hub id "
                              f"such as MeissonFlow/Meissonic (resolved through the local cache)")
    parts = text.split("/")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    root = _snapshot(repo, key, text)
    found = root / folder if folder else root
    if not found.exists():
        raise CheckpointError(f"{key}={text!r}: the Hub repository {repo!r} (cached at {root}) has no folder "
                              f"{folder!r}; check the name")
    return found


def _snapshot(repo: str, key: str, text: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    cache = cache_dir()
    try:
        return Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if offline():
        raise CheckpointError(f"{key}={text!r}: the Hub id {repo!r} is not in the Hugging Face cache ({cache}) and "
                              f"offline mode is on (HF_HUB_OFFLINE=1): download it on a machine with network access "
                              f"into the same cache (`hf download {repo}`, HF_HOME/HF_HUB_CACHE pointing there), or "
                              f"give a local directory") from None
    try:
        return Path(snapshot_download(repo, cache_dir=cache))
    except Exception as e:                   # no network, no such repository, no access
        raise CheckpointError(f"{key}={text!r}: the Hub id {repo!r} is not cached ({cache}) and could not be "
                              f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check "
                              f"the id and the network, or give a local directory") from None


def maybe_resolve(value: Optional[str], key: str) -> Optional[Path]:
    return None if value is None else resolve_path(value, key)
