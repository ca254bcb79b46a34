"""grpclib's ProtoCodec, with betterproto2 messages (de)serialised by protobuf's C library (upb).

betterproto2 reads and writes the wire format in pure Python; for the worker's small messages
that is most of a call's codec time. `UpbProtoCodec` parses a request with the upb message class
of the same descriptor and builds the betterproto2 object from its fields, and serialises a
reply the other way round. The objects the service sees, and the bytes a client gets, are the
same (proto3 fields in number order, default values left out).

A message type goes the upb way only when every field is a plain one: scalars, strings, bytes,
enums, nested messages of the same kind, repeated fields and maps of them. Oneofs, proto3
`optional`, unwrapped well-known types, or a recursive type keep betterproto2's own code (after
`CheckedProtoCodec`'s checks), as does a reply that carries unknown fields. A request with unknown
or non-canonically encoded fields is read by upb all the same, its unknown fields dropped (no
service reads them; betterproto2 would keep them, in quadratic time). Non-betterproto2 messages
(grpclib's health and reflection services) use their own `FromString`/`SerializeToString`.

Every time a message leaves the upb way it is counted by kind (`CodecStatistics`); a request that
is not valid protobuf is answered INTERNAL, one over the size limit RESOURCE_EXHAUSTED, and one
with a list or map past `MAX_ELEMENTS` INVALID_ARGUMENT, on either path.

It reads betterproto2's class metadata (`_betterproto`, `FieldMetadata`, `_unknown_fields`): the
start-up probe (`probe.py`) checks those before a server uses this codec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import betterproto2
from google.protobuf import message_factory  # type: ignore[import-untyped]
from grpclib.exceptions import GRPCError

from app.grpc.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CheckedProtoCodec,
    check_elements,
    check_field_count,
)
from app.grpc.statistics import CodecCounters

_SCALARS = frozenset(
    {
        betterproto2.TYPE_BOOL,
        betterproto2.TYPE_INT32,
        betterproto2.TYPE_INT64,
        betterproto2.TYPE_UINT32,
        betterproto2.TYPE_UINT64,
        betterproto2.TYPE_SINT32,
        betterproto2.TYPE_SINT64,
        betterproto2.TYPE_FLOAT,
        betterproto2.TYPE_DOUBLE,
        betterproto2.TYPE_FIXED32,
        betterproto2.TYPE_SFIXED32,
        betterproto2.TYPE_FIXED64,
        betterproto2.TYPE_SFIXED64,
        betterproto2.TYPE_STRING,
        betterproto2.TYPE_BYTES,
    }
)


class _Fallback(Exception):
    """This value has to take betterproto2's own path."""


def _same(value: Any) -> Any:
    return value


class _Value:
    """How one value of a field (or a map's value) goes between betterproto2 and upb."""

    __slots__ = ("from_upb", "to_upb")

    def __init__(self, from_upb: Callable[[Any], Any], to_upb: Callable[[Any], Any]) -> None:
        self.from_upb = from_upb
        self.to_upb = to_upb


class _Field:
    __slots__ = ("kind", "name", "upb_name", "value")

    def __init__(self, name: str, upb_name: str, kind: str, value: _Value) -> None:
        self.name = name
        self.upb_name = upb_name
        self.kind = kind  # "single", "message", "repeated" or "map"
        self.value = value


class _MessagePlan:
    """A betterproto2 message class and its upb twin, field by field."""

    def __init__(self, cls: type[betterproto2.Message], upb_cls: Any) -> None:
        self.cls = cls
        self.upb_cls = upb_cls
        self.fields: list[_Field] = []

    def decode(self, data: bytes) -> tuple[Any, bool]:
        """The message, and whether it had unknown or non-canonically encoded fields.

        Raises what upb raises for bytes that are not this message, and GRPCError for a list or
        map past MAX_ELEMENTS.
        """
        upb = self.upb_cls.FromString(data)
        upb.DiscardUnknownFields()
        check_elements(upb)
        return self.from_upb(upb), upb.ByteSize() != len(data)

    def from_upb(self, upb: Any) -> Any:
        kwargs: dict[str, Any] = {}
        for f in self.fields:
            value = getattr(upb, f.upb_name)
            convert = f.value.from_upb
            if f.kind == "single":
                kwargs[f.name] = convert(value)
            elif f.kind == "message":
                kwargs[f.name] = convert(value) if upb.HasField(f.upb_name) else None
            elif f.kind == "repeated":
                kwargs[f.name] = [convert(v) for v in value]
            else:
                kwargs[f.name] = {k: convert(v) for k, v in value.items()}
        return self.cls(**kwargs)

    def encode(self, message: Any) -> bytes:
        result: bytes = self.to_upb(message).SerializeToString()
        return result

    def to_upb(self, message: Any) -> Any:
        if message._unknown_fields:
            raise _Fallback  # betterproto2 writes them back
        kwargs: dict[str, Any] = {}
        for f in self.fields:
            value = getattr(message, f.name)
            convert = f.value.to_upb
            if f.kind == "single":
                kwargs[f.upb_name] = convert(value)
            elif f.kind == "message":
                if value is not None:
                    kwargs[f.upb_name] = convert(value)
            elif f.kind == "repeated":
                if value:
                    kwargs[f.upb_name] = [convert(v) for v in value]
            elif value:
                kwargs[f.upb_name] = {k: convert(v) for k, v in value.items()}
        return self.upb_cls(**kwargs)


class _Planner:
    """Works out (once per class) whether and how a betterproto2 class goes the upb way."""

    def __init__(self) -> None:
        self.plans: dict[type, _MessagePlan | None] = {}
        self._building: set[type] = set()

    def plan(self, cls: type) -> _MessagePlan | None:
        try:
            return self.plans[cls]
        except KeyError:
            pass
        plan: _MessagePlan | None = None
        if isinstance(cls, type) and issubclass(cls, betterproto2.Message):
            self._building.add(cls)
            try:
                plan = self._build(cls)
            except _Fallback:
                plan = None
            finally:
                self._building.discard(cls)
        self.plans[cls] = plan
        return plan

    def _build(self, cls: type[betterproto2.Message]) -> _MessagePlan:
        try:
            descriptor = cls.DESCRIPTOR  # type: ignore[attr-defined]
            upb_cls = message_factory.GetMessageClass(descriptor)
        except Exception as exc:
            raise _Fallback from exc
        meta = cast(Any, cls)._betterproto
        plan = _MessagePlan(cls, upb_cls)
        for name, field_meta in meta.meta_by_field_name.items():
            if field_meta.group or field_meta.optional or field_meta.unwrap:
                raise _Fallback
            fd = descriptor.fields_by_number.get(field_meta.number)
            if fd is None:
                raise _Fallback
            field_cls = meta.cls_by_field.get(name)
            if field_meta.proto_type == betterproto2.TYPE_MAP:
                assert field_meta.map_meta is not None
                key_meta, value_meta = field_meta.map_meta
                if key_meta.proto_type not in _SCALARS or value_meta.unwrap:
                    raise _Fallback
                entry_cls = field_cls
                value_cls = entry_cls._betterproto.cls_by_field.get("value")
                value = self._value(value_meta.proto_type, value_cls)
                plan.fields.append(_Field(name, fd.name, "map", value))
                continue
            value = self._value(field_meta.proto_type, field_cls)
            if field_meta.repeated:
                kind = "repeated"
            elif field_meta.proto_type == betterproto2.TYPE_MESSAGE:
                kind = "message"
            else:
                kind = "single"
            plan.fields.append(_Field(name, fd.name, kind, value))
        return plan

    def _value(self, proto_type: str, cls: Any) -> _Value:
        if proto_type in _SCALARS:
            return _Value(_same, _same)
        if proto_type == betterproto2.TYPE_ENUM:
            if not (isinstance(cls, type) and issubclass(cls, betterproto2.Enum)):
                raise _Fallback
            return _Value(cls, int)
        if proto_type == betterproto2.TYPE_MESSAGE:
            if cls in self._building:  # a recursive type
                raise _Fallback
            nested = self.plan(cls)
            if nested is None:
                raise _Fallback
            return _Value(nested.from_upb, nested.to_upb)
        raise _Fallback


class UpbProtoCodec(CheckedProtoCodec):
    """ProtoCodec (`application/grpc+proto`) that (de)serialises betterproto2 messages with upb."""

    def __init__(
        self,
        counters: CodecCounters | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(counters, max_message_bytes=max_message_bytes)
        self._planner = _Planner()

    def encode(self, message: Any, message_type: Any) -> bytes:
        """The reply's bytes: upb's when it can, else betterproto2's (counted)."""
        if not isinstance(message, message_type):
            raise TypeError(f"Message must be of type {message_type!r}, not {type(message)!r}")
        plan = self._planner.plan(message_type)
        if plan is not None:
            try:
                return plan.encode(message)
            except _Fallback:
                self.counters.encode_fallback += 1
            except Exception:
                # betterproto2 either encodes it or raises what it raises with the fast path off
                self.counters.encode_upb_error += 1
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        """The request, read by upb when it can; else CheckedProtoCodec's way."""
        plan = self._planner.plan(message_type)
        if plan is None:
            return super().decode(data, message_type)
        self.check_size(data)
        check_field_count(data)
        try:
            message, normalised = plan.decode(data)
        except GRPCError:
            raise
        except Exception as exc:
            raise self.cannot_decode(message_type) from exc
        if normalised:
            self.counters.decode_fallback += 1
        return message
