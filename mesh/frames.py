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
    """The frame as buffers to send in order: prefix+header, then the payload's pieces."""
    check_header(frame.kind, frame.type, frame.id, frame.fields)
    if frame.tensors is not None and frame.data is not None:
        raise FrameError("a frame carries tensors or bytes, not both")
    if frame.tensors is not None:
        parts, fmt = tensor_parts(frame.tensors), "st"
    elif frame.data is not None:
        parts, fmt = [bytes(frame.data)], "raw"
    else:
        parts, fmt = [], ""
    payload_len = sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts)
    import msgpack

    header = msgpack.packb(
        {"k": frame.kind, "t": frame.type, "id": frame.id, "f": frame.fields, "p": fmt},
        use_bin_type=True,
    )
    if len(header) > MAX_HEADER:
        raise FrameError(f"frame header of {len(header)} bytes is over the {MAX_HEADER}-byte limit")
    if len(header) + payload_len > max_frame:
        raise FrameError(f"frame of {len(header) + payload_len} bytes is over the {max_frame}-byte limit")
    first = PREFIX.pack(len(header), payload_len) + header
    if parts and isinstance(parts[0], bytes):  # the safetensors header rides with ours: one TLS record, not two
        first += parts.pop(0)
    return [first, *parts]


def frame_bytes(frame: Frame, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(frame, max_frame))


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


def decode_body(header: bytes, payload: bytes | bytearray | memoryview) -> Frame:
    """A frame from its header and payload bytes; FrameError on anything malformed."""
    frame, fmt = decode_header(header)
    attach_payload(frame, fmt, payload)
    return frame


def decode_header(header: bytes) -> tuple[Frame, str]:
    """The frame a header describes (no payload yet) and its payload format; FrameError if malformed.

    The transport reads the header before the payload so that it can choose where the payload
    lands (Connection.payload_buffers) before a byte of it is read.
    """
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
    return Frame(kind, type_, id_, fields), fmt


def attach_payload(frame: Frame, fmt: str, payload: bytes | bytearray | memoryview) -> None:
    """Decode `payload` (format `fmt` from the header) into `frame`; tensors share a writable payload."""
    if fmt == "" and len(payload):
        raise FrameError("payload present but format is empty")
    if fmt == "st":
        frame.tensors = decode_tensors(payload)
    elif fmt == "raw":
        frame.data = bytes(payload)


def decode_frame(buf: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """A frame from exactly one frame's bytes (tests and fuzzing use this)."""
    header_len, payload_len = decode_prefix(bytes(buf[: PREFIX.size]), max_frame)
    if len(buf) != PREFIX.size + header_len + payload_len:
        raise FrameError(f"frame length mismatch: prefix says {header_len + payload_len}, got {len(buf) - PREFIX.size}")
    body = memoryview(buf)[PREFIX.size:]
    return decode_body(bytes(body[:header_len]), bytearray(body[header_len:]))


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


# safetensors dtype names <-> torch dtypes (the format: u64 little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}}, then the raw little-endian data).
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_MAX_ST_HEADER = 1 << 20


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _ST_DTYPES[name])


def encode_tensors(tensors: dict[str, Any]) -> bytes:
    """Tensors as one safetensors byte string (tests and small payloads; frames use the parts)."""
    return b"".join(bytes(part) for part in tensor_parts(tensors))


def tensor_parts(tensors: dict[str, Any]) -> list:
    """Tensors as safetensors, in pieces: the header, then a zero-copy view of each tensor's bytes.

    Written by hand rather than with safetensors.torch.save so a 40 MB tensor is not copied on
    the way to the socket; the bytes are standard safetensors (a test loads them with the
    safetensors library, and the library's output decodes here).
    """
    import json

    import torch

    if not tensors:
        raise FrameError("an empty tensor payload is not allowed; send no payload instead")
    names = {dtype: name for name, dtype in _ST_DTYPES.items()}
    entries, views, offset = {}, [], 0
    # Largest elements first keeps every tensor aligned to its element size.
    order = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    for name, tensor in order:
        if not isinstance(name, str) or not name or len(name) > 256 or name == "__metadata__":
            raise FrameError(f"bad tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or str(tensor.dtype).removeprefix("torch.") not in names:
            raise FrameError(f"tensor {name!r}: unsupported type {getattr(tensor, 'dtype', type(tensor))}")
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": names[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        if size:
            views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # pad so the data starts 8-byte aligned
    return [len(header).to_bytes(8, "little") + header, *views]


def decode_tensors(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Tensors from safetensors bytes, sharing `payload`'s memory when it is writable (a bytearray,
    or a writable memoryview such as a receive buffer the caller reuses).

    Every header entry is checked (known dtype, shape matches its byte range, ranges in order,
    contiguous and inside the payload); FrameError otherwise.
    """
    import json

    import torch

    if len(payload) < 8:
        raise FrameError("tensor payload shorter than its header length")
    header_len = int.from_bytes(payload[:8], "little")
    if not 2 <= header_len <= min(_MAX_ST_HEADER, len(payload) - 8):
        raise FrameError("tensor payload header length out of range")
    try:
        header = json.loads(bytes(payload[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("tensor payload header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("tensor payload header must be a map")
    header.pop("__metadata__", None)
    if not header:
        raise FrameError("tensor payload holds no tensors")
    base, data_len = 8 + header_len, len(payload) - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FrameError(f"tensor {name[:40]!r}: bad header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise FrameError(f"tensor {name[:40]!r}: unsupported dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise FrameError(f"tensor {name[:40]!r}: bad shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FrameError(f"tensor {name[:40]!r}: bad data offsets")
        numel = math.prod(shape)
        itemsize = _torch_dtype(dtype).itemsize
        if offsets[1] - offsets[0] != numel * itemsize:
            raise FrameError(f"tensor {name[:40]!r}: shape does not match its byte range")
        spans.append((offsets[0], offsets[1], name, dtype, shape, numel))
    spans.sort()
    position = 0
    for begin, end, name, *_ in spans:
        if begin != position:
            raise FrameError(f"tensor {name[:40]!r}: byte ranges overlap or leave gaps")
        position = end
    if position != data_len:
        raise FrameError("tensor byte ranges do not cover the payload exactly")
    writable = isinstance(payload, bytearray) or (isinstance(payload, memoryview) and not payload.readonly)
    buffer = payload if writable else bytearray(payload)
    tensors = {}
    for begin, end, name, dtype, shape, numel in spans:
        torch_dtype = _torch_dtype(dtype)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
        elif (base + begin) % torch_dtype.itemsize == 0:
            tensors[name] = torch.frombuffer(buffer, dtype=torch_dtype, count=numel, offset=base + begin).reshape(shape)
        else:  # unaligned (another writer's layout): copy instead of sharing
            tensors[name] = torch.frombuffer(bytearray(buffer[base + begin : base + end]), dtype=torch_dtype).reshape(shape)
    return tensors
