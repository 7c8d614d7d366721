"""Typed, versioned msgpack records: the values scission keeps in etcd.

A record is a frozen dataclass subclassing ``Record``; ``to_bytes`` writes
``{"kind", "version", <fields>}`` with enums by value, and ``from_bytes`` checks kind, version
and every field's type (``bool``, ``int``, ``float``, ``str``, ``bytes``, an ``enum.Enum``,
or ``list[...]`` / ``dict[str, ...]`` of those), raising ``ValueError`` on anything else.
A field with a default may be missing (written by an older writer of the same version).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing

import msgpack

FORMAT_VERSION = 1
_MISSING = object()


class Record:
    """msgpack codec for a frozen dataclass (see the module docstring)."""

    KIND: typing.ClassVar[str]

    def to_bytes(self) -> bytes:
        fields = {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        assert "kind" not in fields and "version" not in fields, \
            f"{self.KIND}: 'kind' and 'version' are the envelope's keys, not field names"
        return msgpack.packb({"kind": self.KIND, "version": FORMAT_VERSION, **fields})

    @classmethod
    def from_bytes(cls, data: bytes) -> typing.Self:
        """Decode; raises ValueError on anything but a valid record of this kind and version."""
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (TypeError, ValueError, msgpack.UnpackException) as exc:  # incl. bad UTF-8
            raise ValueError(f"{cls.KIND}: not valid msgpack ({exc!r})") from exc
        if not isinstance(obj, dict) or obj.get("kind") != cls.KIND:
            raise ValueError(f"{cls.KIND}: not a {cls.KIND} record")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"{cls.KIND}: unsupported version {obj.get('version')!r}")
        kwargs = {}
        defaults = _defaults(cls)
        for name, typ in _field_types(cls).items():
            if name not in obj:
                if name in defaults:
                    continue
                raise ValueError(f"{cls.KIND}: missing field {name!r}")
            value = _decode_value(obj[name], typ)
            if value is _MISSING:
                raise ValueError(f"{cls.KIND}.{name}: bad {_type_name(typ)} {obj[name]!r}")
            kwargs[name] = value
        try:
            return cls(**kwargs)  # unknown extra fields of the same version are ignored
        except ValueError as exc:  # __post_init__ range checks
            raise ValueError(f"{cls.KIND}: {exc}") from exc


_R = typing.TypeVar("_R", bound=Record)


def _encode(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode_value(value: object, typ: typing.Any) -> object:
    """``value`` as ``typ``, or ``_MISSING`` if it is not one."""
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1] or (object,)
        if not isinstance(value, list):
            return _MISSING
        items = [_decode_value(v, item) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else origin(items)
    if origin is dict:
        _, item = typing.get_args(typ)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return _MISSING
        out = {k: _decode_value(v, item) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in out.values()) else out
    if typ is object:
        return value
    if typ is float and type(value) is int:
        return float(value)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        members = {member.value: member for member in typ}
        return members.get(value, _MISSING) if isinstance(value, (str, int)) else _MISSING
    return value if type(value) is typ else _MISSING


def _type_name(typ: typing.Any) -> str:
    return getattr(typ, "__name__", None) or str(typ)


@functools.cache
def _field_types(cls: type) -> dict[str, typing.Any]:
    """Dataclass field name -> resolved type (annotations are strings under __future__)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _defaults(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING
                     or f.default_factory is not dataclasses.MISSING)
