"""The reward server's wire format (docs/reward_server.md), shared by the server and the `remote` reward.

A score request is one JSON object; images travel as their raw bytes, base64-encoded, with their shape:

    {"images": {"dtype": "uint8", "shape": [B, H, W, 3], "data": "<base64 of the B·H·W·3 bytes, C order>"},
     "prompts": ["...", ...],                 # B strings
     "metadata": [{...}, ...]}                # B JSON objects (GenEval clauses, self_certainty, ...)

and the answer is ``{"scores": [B floats], "components": {label: [B]}, "details": {key: [B]},
"weights": {label: w}}``. JSON and base64 only: nothing is ever unpickled, and any language can speak it.

Both sides read JSON strictly (`loads_strict`): UTF-8 only, no ``NaN``/``Infinity`` (nor numbers that overflow to
them), and a parse that nests too deeply is a ProtocolError, not a RecursionError. Every ProtocolError carries the
HTTP status the server answers it with (400 not JSON, 413 too many images, 422 not the protocol) and a one-line
message in which any echoed value is shortened (`short`).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

PROTOCOL_VERSION = 1
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 128
MAX_METADATA_DEPTH = 16          # levels of nesting inside one metadata entry (GenEval clauses use 3)
_B64_CHUNK = 4 << 20             # base64 characters decoded at a time (a multiple of 4)


class ProtocolError(ValueError):
    """A request or answer that does not follow the protocol; the message says which field and why, and
    ``status`` is the HTTP status a server answers it with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 4


def short(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, depth- and length-limited, ASCII only (never a megabyte string,
    never a RecursionError)."""
    text = _repr.repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clip(message: str, limit: int = 200) -> str:
    """A message cut to its first line and `limit` characters, ASCII only."""
    line = (message.splitlines() or [""])[0].encode("ascii", "backslashreplace").decode("ascii")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {short(text, 24)} is not finite (JSON has no Infinity)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (use finite numbers; null where there is no value)")


def utf8(data: bytes | bytearray) -> str:
    """`data` decoded as UTF-8 (JSON's encoding); ProtocolError (400) if it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"the body is not UTF-8 (byte {e.start})", 400) from None


def loads_strict(data: bytes | bytearray | str) -> Any:
    """Parse JSON strictly: UTF-8, no NaN/Infinity, no number that overflows to infinity; ProtocolError (status
    400) for anything else, including nesting deeper than the parser's recursion limit."""
    text = data if isinstance(data, str) else utf8(data)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError("the body nests arrays/objects too deeply to parse", 400) from None
    except ValueError as e:                      # JSONDecodeError, our refusals, int digits over the limit
        raise ProtocolError(f"the body is not JSON: {clip(str(e), 160)}", 400) from None


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, refusing NaN/Infinity (the counterpart of `loads_strict`)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


@dataclass
class ScoreBatch:
    images: torch.Tensor            # uint8 [B, H, W, 3]
    prompts: list[str]
    metadata: list[dict[str, Any]]

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


def encode_request(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
    """The JSON object of a score request (images uint8 [B, H, W, 3])."""
    arr = images.detach().to("cpu", torch.uint8).contiguous()
    return {"images": {"dtype": "uint8", "shape": list(arr.shape),
                       "data": base64.b64encode(arr.numpy().tobytes()).decode("ascii")},
            "prompts": list(prompts), "metadata": [dict(m) for m in metadata]}


def _too_deep(entries: list, limit: int) -> bool:
    """Whether any of the JSON values in `entries` nests more than `limit` levels (level by level, no recursion)."""
    level = [v for v in entries if type(v) in (dict, list)]
    for _ in range(limit):
        if not level:
            return False
        level = [c for v in level for c in (v.values() if type(v) is dict else v) if type(c) in (dict, list)]
    return bool(level)


def _decode_base64(data: str, nbytes: int) -> torch.Tensor:
    """Decode `data` (base64 of exactly `nbytes` bytes) into a new writable uint8 tensor, a few MiB at a time, so
    the decoding never holds a second copy of the whole payload."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    view, pos = memoryview(out.numpy()), 0
    try:
        for i in range(0, len(data), _B64_CHUNK):
            raw = binascii.a2b_base64(data[i:i + _B64_CHUNK], strict_mode=True)
            if pos + len(raw) > nbytes:
                raise ProtocolError(f"images.data holds more than the {nbytes} bytes its shape needs")
            view[pos:pos + len(raw)] = raw
            pos += len(raw)
    except (binascii.Error, ValueError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"images.data is not valid base64: {clip(str(e), 80)}") from None
    if pos != nbytes:
        raise ProtocolError(f"images.data holds {pos} bytes but the shape needs {nbytes}")
    return out


def decode_request(obj: Any, max_images: int | None = None) -> ScoreBatch:
    """Validate and decode a score request; raises ProtocolError naming the field at fault (status 413 when the
    request has more than `max_images` images, else 422). The base64 string is taken out of `obj` once decoded
    (``obj["images"]["data"]`` becomes None), so the caller does not keep a second copy of the images alive."""
    if type(obj) is not dict:
        raise ProtocolError(f"the body must be a JSON object with images, prompts and metadata, not "
                            f"{type(obj).__name__}")
    missing = [k for k in ("images", "prompts", "metadata") if k not in obj]
    if missing:
        raise ProtocolError(f"the request lacks {missing} (give images, prompts and metadata, one entry per image)")
    img = obj["images"]
    if type(img) is not dict or not {"dtype", "shape", "data"} <= img.keys():
        raise ProtocolError("images must be an object {dtype, shape, data}")
    if img["dtype"] != "uint8" or type(img["dtype"]) is not str:
        raise ProtocolError(f"images.dtype must be 'uint8', got {short(img['dtype'])}")
    shape = img["shape"]
    # sizes are JSON integers (type() is int: True/False are bools, not sizes), B, H and W at least 1
    if not (type(shape) is list and len(shape) == 4 and set(map(type, shape)) == {int} and shape[3] == 3
            and min(shape) >= 1):
        raise ProtocolError(f"images.shape must be [B, H, W, 3] (integers; B, H and W at least 1), got "
                            f"{short(shape)}")
    b = shape[0]
    if max_images is not None and b > max_images:
        raise ProtocolError(f"{short(b)} images in one request; this server takes at most {max_images} "
                            f"(reward_server.max_request_images): send smaller requests (the remote reward's "
                            f"request_size)", 413)
    data = img["data"]
    if type(data) is not str:
        raise ProtocolError(f"images.data must be a base64 string, got {type(data).__name__}")
    want = math.prod(shape)
    pad = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    holds = len(data) // 4 * 3 - pad
    if len(data) % 4:
        raise ProtocolError(f"images.data is not valid base64 (its length {len(data)} is not a multiple of 4)")
    if holds != want:                            # checked before decoding: nothing is allocated for a lie
        raise ProtocolError(f"images.data holds {holds} bytes but shape {short(shape)} needs {short(want)}")
    prompts, metadata = obj["prompts"], obj["metadata"]
    if type(prompts) is not list or len(prompts) != b or (b and set(map(type, prompts)) != {str}):
        raise ProtocolError(f"prompts must be a list of {b} strings (one per image)")
    if type(metadata) is not list or len(metadata) != b or (b and set(map(type, metadata)) != {dict}):
        raise ProtocolError(f"metadata must be a list of {b} JSON objects (one per image; {{}} when there is none)")
    if _too_deep(metadata, MAX_METADATA_DEPTH):
        raise ProtocolError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    images = _decode_base64(data, want).view(*shape)
    img["data"] = None
    return ScoreBatch(images, prompts, metadata)


def encode_answer(scores: torch.Tensor, components: Mapping[str, torch.Tensor],
                  details: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> dict:
    return {"scores": scores.tolist(), "components": {k: v.tolist() for k, v in components.items()},
            "details": {k: v.tolist() for k, v in details.items()}, "weights": dict(weights)}


def _vector(name: str, value: Any, batch: int) -> torch.Tensor:
    if type(value) is not list or len(value) != batch or (batch and not set(map(type, value)) <= {int, float}):
        raise ProtocolError(f"{name} must be a list of {batch} numbers")
    try:
        out = torch.tensor(value, dtype=torch.float32)
    except (RuntimeError, OverflowError):        # an integer too large for a float
        raise ProtocolError(f"{name} holds a number out of range") from None
    if not torch.isfinite(out).all():
        raise ProtocolError(f"{name} holds non-finite values")
    return out


def decode_answer(obj: Any, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores [B], components {label: [B]}, details {key: [B]}) from a score answer; ProtocolError if malformed."""
    if type(obj) is not dict or "scores" not in obj:
        raise ProtocolError("the answer is not a JSON object with 'scores'")
    scores = _vector("scores", obj["scores"], batch)
    parts = []
    for key in ("components", "details"):
        value = obj.get(key, {})
        if type(value) is not dict:
            raise ProtocolError(f"{key} must be an object of per-sample lists")
        parts.append({k: _vector(f"{key}[{short(k)}]", v, batch) for k, v in value.items()})
    return scores, parts[0], parts[1]
