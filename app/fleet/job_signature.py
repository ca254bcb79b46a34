"""Job signatures: the parameters a job takes, as its workers advertise them in PodInfo and as
the orchestrator checks a submission against them, with no job code imported.

Parameters travel as strings, and a worker converts each to its annotation with
`msgspec.convert(raw, annotation, strict=False)`. The worker describes each annotation from
msgspec's own view of it (`msgspec.inspect`) as a `TypeDesc`; the orchestrator rebuilds that into
an annotation msgspec converts a string to in the same way, and both tiers run the one
`CallShape.convert`, so the orchestrator refuses what a worker would, in the same words. What a
description cannot carry (a class of the job's own, a flag enum, a type msgspec itself refuses)
is left unchecked: any value passes the orchestrator and the worker decides, as before.

A job's signature goes into PodInfo as its JSON, at most `MAX_SIGNATURE_BYTES` per job and
`MAX_SIGNATURES_BYTES` per worker (PodInfo is written every few seconds). A job past either is
advertised without one, and its parameters are checked by the worker only.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import inspect
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import msgspec.inspect as mi

from app.errors import InvalidJobRequest, shown

#: What one job's signature may take in PodInfo, as JSON.
MAX_SIGNATURE_BYTES = 1024
#: What all of one worker's signatures may take together; jobs past it (by name) go without.
MAX_SIGNATURES_BYTES = 8 * 1024
#: How much of a default value a signature shows.
MAX_DEFAULT_CHARACTERS = 40
#: How much of a refused value an error shows.
SHOWN_VALUE_CHARACTERS = 40


class TypeDesc(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An annotation as far as a string parameter's conversion depends on it.

    `kind` is one of: any, none, bool, int, float, str, bytes, datetime, date, time, timedelta,
    uuid, decimal, enum, literal, array, object, union. It is a plain string so that a kind an
    older reader does not know reads as unchecked, not as a PodInfo that does not decode. A
    string never converts to an array or an object, so their item types are not kept.
    """

    kind: str
    values: tuple[str | int | None, ...] = ()  # enum, literal
    of: tuple[TypeDesc, ...] = ()  # union
    gt: int | float | None = None
    ge: int | float | None = None
    lt: int | float | None = None
    le: int | float | None = None
    multiple_of: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    tz: bool | None = None


class ParamDesc(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One parameter: its name, its type (None: unchecked), whether it must be given, and its
    default as JSON (for people; cut short)."""

    name: str
    type_: TypeDesc | None = msgspec.field(default=None, name="type")
    required: bool = False
    default: str | None = None


class JobSignature(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The parameters a job takes by name; `any_params`: it has `**kwargs` and takes any other
    name too (as the string it was sent)."""

    params: tuple[ParamDesc, ...] = ()
    any_params: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobSignature)


def encode_signature(signature: JobSignature) -> bytes:
    """A signature as PodInfo carries it: compact JSON."""
    return _encoder.encode(signature)


def decode_signature(raw: bytes | str) -> JobSignature:
    """A signature from its JSON; `msgspec.DecodeError` when it is not one."""
    return _decoder.decode(raw)


# --- describing an annotation (the worker) --------------------------------------------------------


class _Unchecked(Exception):
    """A type a description cannot carry faithfully."""


_SCALARS: dict[type[mi.Type], str] = {
    mi.AnyType: "any", mi.NoneType: "none", mi.BoolType: "bool", mi.DateType: "date",
    mi.TimeDeltaType: "timedelta", mi.UUIDType: "uuid", mi.DecimalType: "decimal",
}  # fmt: skip
_ARRAYS = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType,
           mi.NamedTupleType)  # fmt: skip
_OBJECTS = (mi.DictType, mi.StructType, mi.TypedDictType, mi.DataclassType)


def describe(annotation: Any) -> TypeDesc | None:
    """`annotation` as a TypeDesc, or None when a description would not convert alike."""
    try:
        return _describe(mi.type_info(annotation))
    except (_Unchecked, TypeError, ValueError):  # TypeError: msgspec refuses the type itself
        return None


def _describe(info: mi.Type) -> TypeDesc:
    if isinstance(info, mi.Metadata):
        return _describe(info.type)
    kind = _SCALARS.get(type(info))
    if kind is not None:
        return TypeDesc(kind=kind)
    if isinstance(info, mi.IntType | mi.FloatType):
        return TypeDesc(
            kind="int" if isinstance(info, mi.IntType) else "float",
            gt=info.gt, ge=info.ge, lt=info.lt, le=info.le, multiple_of=info.multiple_of,
        )  # fmt: skip
    if isinstance(info, mi.StrType):
        return TypeDesc(
            kind="str", min_length=info.min_length, max_length=info.max_length,
            pattern=info.pattern,
        )  # fmt: skip
    if isinstance(info, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
        return TypeDesc(kind="bytes", min_length=info.min_length, max_length=info.max_length)
    if isinstance(info, mi.DateTimeType | mi.TimeType):
        kind = "datetime" if isinstance(info, mi.DateTimeType) else "time"
        return TypeDesc(kind=kind, tz=info.tz)
    if isinstance(info, mi.EnumType):
        if issubclass(info.cls, enum.Flag):  # any combination of the flags converts
            raise _Unchecked
        return TypeDesc(kind="enum", values=_plain_values(m.value for m in info.cls))
    if isinstance(info, mi.LiteralType):
        return TypeDesc(kind="literal", values=_plain_values(info.values, none=True))
    if isinstance(info, _ARRAYS):
        return TypeDesc(kind="array")
    if isinstance(info, _OBJECTS):
        return TypeDesc(kind="object")
    if isinstance(info, mi.UnionType):
        return TypeDesc(kind="union", of=tuple(_describe(t) for t in info.types))
    raise _Unchecked  # a class of the job's own, Raw, Ext


def _plain_values(values: Iterable[object], *, none: bool = False) -> tuple[str | int | None, ...]:
    out: list[str | int | None] = []
    for value in values:
        if (value is None and none) or type(value) in (str, int):
            out.append(value)  # type: ignore[arg-type]
        else:  # bool (an int to Python, not to msgspec), float, ...: not carried
            raise _Unchecked
    return tuple(out)


# --- rebuilding it (the orchestrator) -------------------------------------------------------------

_PLAIN: dict[str, Any] = {
    "any": Any, "none": None, "bool": bool, "date": datetime.date,
    "timedelta": datetime.timedelta, "uuid": uuid.UUID, "decimal": decimal.Decimal,
    "array": list[Any], "object": dict[str, Any],
}  # fmt: skip
_CONSTRAINED: dict[str, Any] = {
    "int": int, "float": float, "str": str, "bytes": bytes, "datetime": datetime.datetime,
    "time": datetime.time,
}  # fmt: skip
_CONSTRAINTS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "pattern", "tz")


def rebuild(desc: TypeDesc) -> Any:
    """An annotation that msgspec converts a string to as it does the described one;
    `_Unchecked` for a kind this version does not know."""
    if desc.kind in _PLAIN:
        return _PLAIN[desc.kind]
    if desc.kind in _CONSTRAINED:
        base = _CONSTRAINED[desc.kind]
        meta = {k: getattr(desc, k) for k in _CONSTRAINTS if getattr(desc, k) is not None}
        return Annotated[base, msgspec.Meta(**meta)] if meta else base
    if desc.kind == "enum" and desc.values:
        kinds = {type(v) for v in desc.values}
        if kinds not in ({str}, {int}):  # as msgspec requires of an enum
            raise _Unchecked
        return enum.Enum("Choice", [(f"v{i}", v) for i, v in enumerate(desc.values)])
    if desc.kind == "literal" and desc.values:
        return Literal[desc.values]
    if desc.kind == "union" and desc.of:
        return functools.reduce(lambda a, b: a | b, [_optional(rebuild(d)) for d in desc.of])
    raise _Unchecked


def _optional(annotation: Any) -> Any:
    # `None | int` needs a type on each side of `|`
    return type(None) if annotation is None else annotation


# --- what a refusal says --------------------------------------------------------------------------

_WORDS = {
    "any": "anything", "none": "null", "bool": "true or false", "int": "an integer",
    "float": "a number", "str": "text", "bytes": "base64 text",
    "datetime": "an RFC 3339 date and time", "date": "a date (YYYY-MM-DD)",
    "time": "a time (HH:MM:SS)", "timedelta": "a duration (seconds, or ISO 8601 as PT1M)",
    "uuid": "a UUID", "decimal": "a decimal number", "array": "a list", "object": "an object",
}  # fmt: skip


def expected(desc: TypeDesc) -> str:
    """What `desc` takes, in words: "a number", "an integer >= 0", "one of 'a', 'b'"."""
    if desc.kind == "union":
        words = list(dict.fromkeys(expected(d) for d in desc.of))
        return " or ".join(words)
    if desc.kind in ("enum", "literal"):
        values = ["null" if v is None else repr(v) for v in desc.values]
        more = f", … ({len(values)} in all)" if len(values) > 8 else ""
        return f"one of {', '.join(values[:8])}{more}"
    text = _WORDS.get(desc.kind, desc.kind)
    bounds = [f"{op} {v}" for op, v in (("<", desc.lt), ("<=", desc.le), (">", desc.gt),
              (">=", desc.ge)) if v is not None]  # fmt: skip
    if bounds:
        text += " " + " and ".join(reversed(bounds))
    if desc.multiple_of is not None:
        text += f", a multiple of {desc.multiple_of}"
    unit = "byte" if desc.kind == "bytes" else "character"
    if desc.min_length is not None:
        text += f" of at least {desc.min_length} {unit}{'s' * (desc.min_length != 1)}"
    if desc.max_length is not None:
        joint = " and" if desc.min_length is not None else " of"
        text += f"{joint} at most {desc.max_length} {unit}{'s' * (desc.max_length != 1)}"
    if desc.pattern is not None:
        text += f" matching {desc.pattern!r}"
    if desc.tz is not None:
        text += " with a time zone" if desc.tz else " without a time zone"
    return text


# --- converting parameters: the one function both tiers run ---------------------------------------


class ParamRule(NamedTuple):
    """How one named parameter converts: `annotation` (None with `passthrough`: the string as
    sent) and its description for the words of a refusal (None: msgspec's own words)."""

    annotation: Any
    desc: TypeDesc | None
    passthrough: bool

    def convert(self, key: str, raw: str) -> Any:
        """`raw` converted; InvalidJobRequest naming `params.<key>`."""
        if self.passthrough:
            return raw
        try:
            return msgspec.convert(raw, self.annotation, strict=False)
        except (msgspec.ValidationError, TypeError) as exc:
            if self.desc is None or isinstance(exc, TypeError):
                problem = str(exc).split(" - at ")[0]
            else:
                got = shown(raw, SHOWN_VALUE_CHARACTERS)
                problem = f"expected {expected(self.desc)}, got {got}"
            raise InvalidJobRequest(f"params.{key}: {problem}") from None


_UNCHECKED = ParamRule(None, None, passthrough=True)


class CallShape:
    """How a job takes its parameters by name. The worker builds it from the job function
    (`shape_of`), the orchestrator from an advertised signature (`shape_from`)."""

    __slots__ = ("params", "required", "takes_any")

    def __init__(
        self, params: Mapping[str, ParamRule], required: tuple[str, ...], takes_any: bool
    ) -> None:
        self.params = params
        self.required = required
        self.takes_any = takes_any

    def __repr__(self) -> str:
        extra = ", **" if self.takes_any else ""
        return f"<CallShape ({', '.join(self.params)}{extra}) required={list(self.required)}>"

    def convert(self, job: str, params: Mapping[str, str]) -> dict[str, Any]:
        """The keyword arguments for `params`; InvalidJobRequest naming the first bad one."""
        kwargs: dict[str, Any] = {}
        for key, raw in params.items():
            rule = self.params.get(key)
            if rule is None:
                if not self.takes_any:
                    raise InvalidJobRequest(f"params.{key}: job {job!r} takes no such parameter")
                kwargs[key] = raw
                continue
            kwargs[key] = rule.convert(key, raw)
        for name in self.required:
            if name not in kwargs:
                raise InvalidJobRequest(f"params.{name}: required by job {job!r}")
        return kwargs

    def problem(self, job: str, params: Mapping[str, str]) -> str | None:
        """Why `convert` would refuse `params` (one line), or None when it would not."""
        try:
            self.convert(job, params)
        except InvalidJobRequest as exc:
            return str(exc)
        return None


@functools.cache
def shape_of(fn: Callable[..., Any]) -> CallShape:
    """The call shape of a job function (worked out once: inspect.signature and get_type_hints
    cost more than the rest of a submission together).

    Parameters are taken by name: positional-only ones and `*args` are not among them. An
    annotation that does not resolve is taken as `str` (the string as sent).
    """
    parameters = inspect.signature(fn).parameters
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable annotations: pass strings through
        hints = {}
    rules: dict[str, ParamRule] = {}
    required: list[str] = []
    for name, p in parameters.items():
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        annotation = hints.get(name, str)
        rules[name] = ParamRule(annotation, describe(annotation), annotation in (str, Any))
        if p.default is p.empty:
            required.append(name)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return CallShape(rules, tuple(required), takes_any)


@functools.cache
def signature_of(fn: Callable[..., Any]) -> JobSignature:
    """The signature a worker advertises for a job function."""
    shape = shape_of(fn)
    parameters = inspect.signature(fn).parameters
    return JobSignature(
        params=tuple(
            ParamDesc(
                name=name,
                type_=rule.desc,
                required=name in shape.required,
                default=_default_text(parameters[name].default),
            )
            for name, rule in shape.params.items()
        ),
        any_params=shape.takes_any,
    )


def _default_text(value: object) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > MAX_DEFAULT_CHARACTERS:
        text = text[: MAX_DEFAULT_CHARACTERS - 1] + "…"
    return text


def shape_from(signature: JobSignature) -> CallShape:
    """The call shape an advertised signature describes; what it cannot describe passes."""
    rules: dict[str, ParamRule] = {}
    for param in signature.params:
        rules[param.name] = _rule(param.type_)
    required = tuple(p.name for p in signature.params if p.required)
    return CallShape(rules, required, signature.any_params)


def _rule(desc: TypeDesc | None) -> ParamRule:
    if desc is None:
        return _UNCHECKED
    try:
        annotation = rebuild(desc)
    except (_Unchecked, TypeError, ValueError):
        return _UNCHECKED
    return ParamRule(annotation, desc, annotation in (str, Any))


def shape_from_json(raw: bytes) -> CallShape | None:
    """The call shape of an advertised signature's JSON; None when it does not read."""
    try:
        return shape_from(decode_signature(raw))
    except msgspec.DecodeError:
        return None


class Advertised(NamedTuple):
    """What a worker puts in PodInfo (signatures as JSON, by job name), and the jobs left
    without one, each with why."""

    signatures: dict[str, msgspec.Raw]
    left_out: list[tuple[str, str]]


def advertised(signatures: Iterable[tuple[str, JobSignature]]) -> Advertised:
    """The signatures within the caps (see the module doc), in the order given."""
    kept: dict[str, msgspec.Raw] = {}
    left_out: list[tuple[str, str]] = []
    total = 0
    for name, signature in signatures:
        raw = encode_signature(signature)
        if len(raw) > MAX_SIGNATURE_BYTES:
            why = f"its signature takes {len(raw)} bytes, over {MAX_SIGNATURE_BYTES}"
            left_out.append((name, why))
            continue
        if total + len(raw) > MAX_SIGNATURES_BYTES:
            why = f"the worker's signatures take over {MAX_SIGNATURES_BYTES} bytes"
            left_out.append((name, why))
            continue
        total += len(raw)
        kept[name] = msgspec.Raw(raw)
    return Advertised(kept, left_out)
