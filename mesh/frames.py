"""The frame codec: the only format that crosses a mesh connection (inside TLS).

A frame is

    u32 header_length | u32 payload_length | header (msgpack map) | payload

with big-endian lengths. The header holds `k` (kind: req, res, err, hb), `t` (message type,
e.g. "mesh.hello"), `id` (request id; a response carries its request's id), `f` (fields: a map
of plain values) and `p` (payload format: "" none, "st" safetensors tensors, "raw" bytes).
Tensors travel as safetensors bytes. Nothing is ever unpickled or evaluated: msgpack extension
types are refused and every header value is checked here; anything else raises FrameError, and
the transport closes that connection only.

This module knows nothing about sockets; `transport.py` reads and writes frames.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import FrameError

PREFIX = struct.Struct(">II")
MAX_HEADER = 1 << 20            # a header is small; 1 MiB is generous
DEFAULT_MAX_FRAME = 64 << 20    # header + payload; the config's mesh.max_frame_mb overrides it
KINDS = ("req", "res", "err", "hb")
PAYLOADS = ("", "st", "raw")
MAX_DEPTH = 8                   # nesting of field values
_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_MAX_KEY = 128


@dataclass
class Frame:
    """One decoded frame. `tensors` and `data` are the payload (at most one of them is set)."""

    kind: str
    type: str
    id: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    data: bytes | None = None


def encode_frame(frame: Frame, max_frame: int = DEFAULT_MAX_FRAME) -> list[bytes]:
    """The frame as a list of byte strings to send in order (prefix+header, payload)."""
    check_header(frame.kind, frame.type, frame.id, frame.fields)
    if frame.tensors is not None and frame.data is not None:
        raise FrameError("a frame carries tensors or bytes, not both")
    if frame.tensors is not None:
        payload, fmt = encode_tensors(frame.tensors), "st"
    elif frame.data is not None:
        payload, fmt = bytes(frame.data), "raw"
    else:
        payload, fmt = b"", ""
    import msgpack

    header = msgpack.packb(
        {"k": frame.kind, "t": frame.type, "id": frame.id, "f": frame.fields, "p": fmt},
        use_bin_type=True,
    )
    if len(header) > MAX_HEADER:
        raise FrameError(f"frame header of {len(header)} bytes is over the {MAX_HEADER}-byte limit")
    if len(header) + len(payload) > max_frame:
        raise FrameError(f"frame of {len(header) + len(payload)} bytes is over the {max_frame}-byte limit")
    return [PREFIX.pack(len(header), len(payload)) + header, payload]


def frame_bytes(frame: Frame, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return b"".join(encode_frame(frame, max_frame))


def decode_prefix(prefix: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[int, int]:
    """(header_length, payload_length) from the 8-byte prefix, refusing oversized frames early."""
    if len(prefix) != PREFIX.size:
        raise FrameError("truncated frame prefix")
    header_len, payload_len = PREFIX.unpack(prefix)
    if header_len == 0 or header_len > MAX_HEADER:
        raise FrameError(f"frame header length {header_len} is outside 1..{MAX_HEADER}")
    if header_len + payload_len > max_frame:
        raise FrameError(f"frame of {header_len + payload_len} bytes is over the {max_frame}-byte limit")
    return header_len, payload_len


def decode_body(header: bytes, payload: bytes) -> Frame:
    """A frame from its header and payload bytes; FrameError on anything malformed."""
    import msgpack

    def no_ext(code: int, data: bytes) -> Any:
        raise FrameError(f"msgpack extension type {code} is not allowed")

    try:
        head = msgpack.unpackb(header, raw=False, strict_map_key=True, ext_hook=no_ext, use_list=True)
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several types for bad input; all mean "malformed"
        raise FrameError(f"malformed frame header ({type(exc).__name__})") from None
    if not isinstance(head, dict) or set(head) != {"k", "t", "id", "f", "p"}:
        raise FrameError("frame header must be a map with exactly k, t, id, f, p")
    kind, type_, id_, fields, fmt = head["k"], head["t"], head["id"], head["f"], head["p"]
    check_header(kind, type_, id_, fields)
    if fmt not in PAYLOADS:
        raise FrameError(f"unknown payload format {fmt!r}")
    if fmt == "" and payload:
        raise FrameError("payload present but format is empty")
    frame = Frame(kind, type_, id_, fields)
    if fmt == "st":
        frame.tensors = decode_tensors(payload)
    elif fmt == "raw":
        frame.data = bytes(payload)
    return frame


def decode_frame(buf: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """A frame from exactly one frame's bytes (tests and fuzzing use this)."""
    header_len, payload_len = decode_prefix(bytes(buf[: PREFIX.size]), max_frame)
    if len(buf) != PREFIX.size + header_len + payload_len:
        raise FrameError(f"frame length mismatch: prefix says {header_len + payload_len}, got {len(buf) - PREFIX.size}")
    body = memoryview(buf)[PREFIX.size:]
    return decode_body(bytes(body[:header_len]), bytes(body[header_len:]))


def check_header(kind: Any, type_: Any, id_: Any, fields: Any) -> None:
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    if not isinstance(type_, str) or not _TYPE_RE.match(type_):
        raise FrameError(f"bad message type {type_!r}")
    if not isinstance(id_, int) or isinstance(id_, bool) or not 0 <= id_ < 2**63:
        raise FrameError(f"bad request id {id_!r}")
    if not isinstance(fields, dict):
        raise FrameError("fields must be a map")
    _check_value(fields, 0, "fields")


def _check_value(value: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise FrameError(f"{where}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise FrameError(f"{where}: integer out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FrameError(f"{where}: number is not finite")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, depth + 1, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > _MAX_KEY:
                raise FrameError(f"{where}: keys must be strings of at most {_MAX_KEY} characters")
            _check_value(item, depth + 1, f"{where}.{key}")
        return
    raise FrameError(f"{where}: values of type {type(value).__name__} are not allowed")


def encode_tensors(tensors: dict[str, Any]) -> bytes:
    """Tensors as safetensors bytes (contiguous copies; names must be strings)."""
    from safetensors.torch import save

    if not tensors:
        raise FrameError("an empty tensor payload is not allowed; send no payload instead")
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or len(name) > 256:
            raise FrameError(f"bad tensor name {name!r}")
        prepared[name] = tensor.detach().contiguous()
    try:
        return save(prepared)
    except RuntimeError:
        # Tensors that share storage (views of one buffer) must be cloned for safetensors.
        return save({name: t.clone() for name, t in prepared.items()})


def decode_tensors(payload: bytes) -> dict[str, Any]:
    """Tensors from safetensors bytes; FrameError when the bytes are not valid safetensors."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(payload))
    except Exception as exc:  # SafetensorError and friends: the payload is malformed
        raise FrameError(f"malformed tensor payload ({type(exc).__name__})") from None
    if not tensors:
        raise FrameError("tensor payload holds no tensors")
    return tensors
