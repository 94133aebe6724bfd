"""Training state as data: a nested state (optimizer, scheduler, RNG, counters) as one safetensors file of its
tensors plus one JSON file of everything else, so that reading it back can never run code (no pickle).

`write_state(stem, tree)` writes ``<stem>.safetensors`` and ``<stem>.json``; `read_state(stem)` returns the
tree. The JSON holds the structure; a tensor is ``{"__tensor__": key}`` naming its entry in the safetensors
file. Only these kinds of value are encoded (anything else is refused when saving, so a new kind of state fails
loudly at the first checkpoint instead of silently at a resume): dict, list, tuple, str, int, float, bool, None,
torch.Tensor, torch.Size, NumPy arrays, integer enums (stored as their value), and the two DeepSpeed objects its
optimizers put in their state dicts — a loss scaler (stored as its plain fields, rebuilt by the reader through
`objects`) and a ``fragment_address`` (numel, start).
"""
from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from policy.files import atomic_write_json
from policy.weights import CheckpointError

TENSORS_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"
_TAGS = ("__tensor__", "__tuple__", "__pairs__", "__size__", "__ndarray__", "__object__", "__float__")


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, str)) and not isinstance(value, enum.Enum)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        t = value.detach()
        tensors[key] = t.clone() if t.device.type == "cpu" else t.cpu()   # own storage: never a shared view
        return {"__tensor__": key}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, enum.Enum):
        if isinstance(value.value, (int, str)):
            return value.value
        raise TypeError(f"{path}: enum {value!r} with a non-plain value")
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if _is_plain(value):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        if not all(_is_plain(k) for k in value):
            raise TypeError(f"{path}: dict keys must be str/int/bool/None, got {sorted({type(k).__name__ for k in value})}")
        return {"__pairs__": [[k, _encode(v, f"{path}[{k!r}]", tensors)] for k, v in value.items()]}
    kind = type(value).__name__
    if type(value).__module__.startswith("numpy") and hasattr(value, "tolist") and hasattr(value, "dtype"):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if kind == "fragment_address":                  # deepspeed.utils.tensor_fragment (a dataclass)
        return {"__object__": "fragment_address", "numel": int(value.numel), "start": int(value.start)}
    if "LossScaler" in kind:                        # deepspeed.runtime.fp16.loss_scaler: fields only
        fields = {k: v for k, v in vars(value).items() if _is_plain(v) or isinstance(v, float)}
        return {"__object__": "loss_scaler", "class": kind,
                "fields": {k: _encode(v, f"{path}.{k}", tensors) for k, v in fields.items()}}
    raise TypeError(f"{path}: cannot store a {type(value).__module__}.{kind} as data (tensors, numbers, strings, "
                    f"lists and dicts only)")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], objects: Mapping[str, Callable[[dict], Any]]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, objects) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        key = value["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"tensor {key!r} is missing from the tensors file")
        return tensors[key]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, objects) for v in value["__tuple__"])
    if "__pairs__" in value:
        return {k: _decode(v, tensors, objects) for k, v in value["__pairs__"]}
    if "__size__" in value:
        return torch.Size(value["__size__"])
    if "__float__" in value:
        return float(value["__float__"])          # inf, -inf, nan
    if "__ndarray__" in value:
        import numpy as np
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__object__" in value:
        kind = value["__object__"]
        if kind == "fragment_address":
            from deepspeed.utils.tensor_fragment import fragment_address
            return fragment_address(numel=int(value["numel"]), start=int(value["start"]))
        if kind in objects:
            return objects[kind]({k: _decode(v, tensors, objects) for k, v in value.get("fields", {}).items()})
        raise CheckpointError(f"unknown stored object {kind!r}")
    return {k: _decode(v, tensors, objects) for k, v in value.items()}


def state_paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + TENSORS_SUFFIX), stem.with_name(stem.name + JSON_SUFFIX)


def write_state(stem: str | Path, tree: Any) -> list[Path]:
    """Write `tree` as ``<stem>.safetensors`` + ``<stem>.json``; TypeError names any value that is not data."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, "state", tensors)
    t_path, j_path = state_paths(stem)
    t_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(t_path))
    atomic_write_json(j_path, skeleton)
    return [t_path, j_path]


def read_state(stem: str | Path, objects: Optional[Mapping[str, Callable[[dict], Any]]] = None,
               device: str = "cpu") -> Any:
    """The tree `write_state` wrote; CheckpointError (naming the file) when either file is not what it wrote."""
    from safetensors.torch import load_file
    t_path, j_path = state_paths(stem)
    try:
        skeleton = json.loads(j_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{str(j_path)!r} is not a JSON state file ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(t_path), device=device)
    except Exception as e:                           # safetensors raises its own types for a bad header
        raise CheckpointError(f"{str(t_path)!r} is not a safetensors file ({type(e).__name__}: {e})") from None
    try:
        return _decode(skeleton, tensors, objects or {})
    except CheckpointError as e:
        raise CheckpointError(f"{str(j_path)!r}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{str(j_path)!r} does not describe a training state ({type(e).__name__}: {e})") from None
