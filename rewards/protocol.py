"""The reward server's wire format (docs/reward_server.md), shared by the server and the `remote` reward.

A score request is one JSON object; images travel as their raw bytes, base64-encoded, with their shape:

    {"images": {"dtype": "uint8", "shape": [B, H, W, 3], "data": "<base64 of the B·H·W·3 bytes, C order>"},
     "prompts": ["...", ...],                 # B strings
     "metadata": [{...}, ...]}                # B JSON objects (GenEval clauses, self_certainty, ...)

and the answer is ``{"scores": [B floats], "components": {label: [B]}, "details": {key: [B]},
"weights": {label: w}}``. JSON and base64 only: nothing is ever unpickled, and any language can speak it.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

PROTOCOL_VERSION = 1
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 128


class ProtocolError(ValueError):
    """A request or answer that does not follow the protocol; the message says which field and why."""


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


def decode_request(obj: Any, max_images: int | None = None) -> ScoreBatch:
    """Validate and decode a score request; raises ProtocolError naming the field at fault."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"the body must be a JSON object with images, prompts and metadata, not "
                            f"{type(obj).__name__}")
    missing = [k for k in ("images", "prompts", "metadata") if k not in obj]
    if missing:
        raise ProtocolError(f"the request lacks {missing} (give images, prompts and metadata, one entry per image)")
    img = obj["images"]
    if not isinstance(img, dict) or not {"dtype", "shape", "data"} <= set(img):
        raise ProtocolError("images must be an object {dtype, shape, data}")
    if img["dtype"] != "uint8":
        raise ProtocolError(f"images.dtype must be 'uint8', got {img['dtype']!r}")
    shape = img["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s >= 0 for s in shape)
            and shape[3] == 3 and shape[1] > 0 and shape[2] > 0):
        raise ProtocolError(f"images.shape must be [B, H, W, 3] (non-negative integers, H and W > 0), got {shape!r}")
    b = shape[0]
    if max_images is not None and b > max_images:
        raise ProtocolError(f"{b} images in one request; this server takes at most {max_images}")
    if not isinstance(img["data"], str):
        raise ProtocolError("images.data must be a base64 string")
    try:
        raw = base64.b64decode(img["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"images.data is not valid base64: {e}") from None
    want = math.prod(shape)
    if len(raw) != want:
        raise ProtocolError(f"images.data holds {len(raw)} bytes but shape {shape} needs {want}")
    prompts, metadata = obj["prompts"], obj["metadata"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != b:
        raise ProtocolError(f"prompts must be a list of {b} strings (one per image)")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata) or len(metadata) != b:
        raise ProtocolError(f"metadata must be a list of {b} JSON objects (one per image; {{}} when there is none)")
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*shape) if want else \
        torch.zeros(shape, dtype=torch.uint8)
    return ScoreBatch(images, prompts, metadata)


def encode_answer(scores: torch.Tensor, components: Mapping[str, torch.Tensor],
                  details: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> dict:
    return {"scores": scores.tolist(), "components": {k: v.tolist() for k, v in components.items()},
            "details": {k: v.tolist() for k, v in details.items()}, "weights": dict(weights)}


def _vector(name: str, value: Any, batch: int) -> torch.Tensor:
    if not isinstance(value, list) or len(value) != batch or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ProtocolError(f"{name} must be a list of {batch} numbers")
    out = torch.tensor(value, dtype=torch.float32)
    if not torch.isfinite(out).all():
        raise ProtocolError(f"{name} holds non-finite values")
    return out


def decode_answer(obj: Any, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores [B], components {label: [B]}, details {key: [B]}) from a score answer; ProtocolError if malformed."""
    if not isinstance(obj, dict) or "scores" not in obj:
        raise ProtocolError("the answer is not a JSON object with 'scores'")
    scores = _vector("scores", obj["scores"], batch)
    parts = []
    for key in ("components", "details"):
        value = obj.get(key, {})
        if not isinstance(value, dict):
            raise ProtocolError(f"{key} must be an object of per-sample lists")
        parts.append({k: _vector(f"{key}[{k!r}]", v, batch) for k, v in value.items()})
    return scores, parts[0], parts[1]
