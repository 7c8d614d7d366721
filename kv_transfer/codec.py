"""Strict msgpack codec for the typed KV-transfer messages.

Every message is a msgpack map with string keys. Decoding checks the exact key set and
the type of every value, so a truncated, foreign or tampered payload fails with a
``ValueError`` instead of producing a half-valid object. Never pickle: these bytes cross
process boundaries (etcd values, gRPC fields, NIXL notifications).
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

# Largest payload accepted by ``unpack_message``; a transfer handle for a 128k-token prompt
# with 16-token blocks is ~40 KiB, a layout descriptor for 128 layers ~3 KiB.
MAX_MESSAGE_BYTES = 4 << 20

# Schema value kinds.
INT = "int"
STR = "str"
BYTES = "bytes"
INT_TUPLE = "int_tuple"


def pack_message(fields: dict[str, Any]) -> bytes:
    """Encode ``fields`` (str keys; int / str / bytes / tuple-of-int values) as msgpack."""
    payload = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return msgpack.packb(payload, use_bin_type=True)


def unpack_message(data: bytes, schema: dict[str, str], kind: str, version: int) -> dict[str, Any]:
    """Decode ``data`` into a dict that matches ``schema`` exactly.

    The ``version`` field is checked before the key set, so a payload from a newer or
    older writer fails with "unsupported version" rather than a field-mismatch message.

    Args:
        data: msgpack bytes produced by ``pack_message``.
        schema: field name -> value kind (``INT``, ``STR``, ``BYTES``, ``INT_TUPLE``);
            must contain ``"version"``.
        kind: message name used in error messages.
        version: the only accepted value of the ``version`` field.

    Returns:
        The decoded fields; ``INT_TUPLE`` values come back as ``tuple[int, ...]``.

    Raises:
        ValueError: ``data`` is not bytes, not msgpack, not a map, has another version,
            missing or unknown keys, or a value of the wrong type.
    """
    assert "version" in schema, f"{kind}: schema without a version field"
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{kind}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{kind}: payload of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except (msgpack.UnpackException, msgpack.ExtraData, ValueError, TypeError) as e:
        raise ValueError(f"{kind}: malformed msgpack payload ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{kind}: expected a msgpack map, got {type(raw).__name__}")
    got_version = raw.get("version")
    if not _is_int(got_version):
        raise ValueError(f"{kind}: missing or non-integer version field")
    if got_version != version:
        raise ValueError(f"{kind}: unsupported version {got_version} (this build speaks {version})")
    missing = sorted(set(schema) - set(raw))
    unknown = sorted(str(k) for k in set(raw) - set(schema))
    if missing or unknown:
        raise ValueError(f"{kind}: missing fields {missing}, unknown fields {unknown}")
    return {name: _check_value(kind, name, raw[name], vkind) for name, vkind in schema.items()}


def _check_value(kind: str, name: str, value: Any, vkind: str) -> Any:
    if vkind == INT:
        if not _is_int(value):
            raise ValueError(f"{kind}.{name}: expected int, got {type(value).__name__}")
        return value
    if vkind == STR:
        if not isinstance(value, str):
            raise ValueError(f"{kind}.{name}: expected str, got {type(value).__name__}")
        return value
    if vkind == BYTES:
        if not isinstance(value, bytes):
            raise ValueError(f"{kind}.{name}: expected bytes, got {type(value).__name__}")
        return value
    if vkind == INT_TUPLE:
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise ValueError(f"{kind}.{name}: expected a list of ints")
        return tuple(value)
    raise AssertionError(f"unknown schema kind {vkind!r} for {kind}.{name}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a bool in an int field is a producer bug.
    return isinstance(value, int) and not isinstance(value, bool)
