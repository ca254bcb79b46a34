"""Job signatures: what a worker advertises of its jobs' params, and the orchestrator's check
against it, agree with what the worker's `JobSpec.bind` accepts (issue 11, point 12).

The same table of (annotation, raw value) runs through the worker's bind (the real job
function) and through the orchestrator's path (signature → JSON → PodInfo → call shape), and
both must give the same verdict in the same words. Where a description cannot carry a type, the
orchestrator must accept at least what the worker accepts (the worker decides).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidJobRequest
from app.fleet.job_signature import (
    MAX_SIGNATURE_BYTES,
    MAX_SIGNATURES_BYTES,
    CallShape,
    JobSignature,
    advertised,
    decode_signature,
    describe,
    expected,
    shape_from,
    shape_from_json,
    signature_of,
)
from app.fleet.pod_info import PodInfo, PodStatus, decode_pod_info, encode_pod_info
from app.worker.builtin_jobs import builtin_specs
from app.worker.job_registry import JobRegistry, JobSpec


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2


class Point(msgspec.Struct):
    x: int


@dataclasses.dataclass
class Box:
    size: int


class Mine:
    """A class of the job's own: no description carries it."""


# every annotation a description carries exactly: same verdict, same words
EXACT: list[Any] = [
    int, float, bool, str, bytes, datetime.datetime, datetime.date, datetime.time,
    datetime.timedelta, uuid.UUID, decimal.Decimal, Colour, Level, Any, object, None,
    Literal["a", "b"], Literal[1, 2], Literal[None, "a"],
    int | None, int | str, int | float, float | None, Colour | None, Level | str,
    Annotated[int, msgspec.Meta(ge=0)], Annotated[float, msgspec.Meta(gt=0, le=10)],
    Annotated[int, msgspec.Meta(multiple_of=5)],
    Annotated[str, msgspec.Meta(min_length=2, max_length=4)],
    Annotated[str, msgspec.Meta(pattern="^a")], Annotated[bytes, msgspec.Meta(max_length=2)],
    Annotated[datetime.datetime, msgspec.Meta(tz=True)],
    Annotated[datetime.datetime, msgspec.Meta(tz=False)],
    Annotated[datetime.time, msgspec.Meta(tz=True)], bytearray,
    Annotated[int, msgspec.Meta(ge=0, description="extra metadata is not a constraint")] | None,
    list[int], set[str], tuple[int, ...], tuple[int, str], dict[str, int], Point, Box,
    Point | None, list[int] | int,
]  # fmt: skip
# annotations a description leaves unchecked: the orchestrator accepts all, the worker decides
UNCHECKED: list[Any] = [Perm, Mine, Mine | None, Literal[True], list[int] | tuple[int, ...]]

RAWS = [
    "", "abc", "1", "0", "-1", "1.5", "1e3", "nan", "inf", "-inf", " 1", "1_000", "true",
    "false", "True", "null", "red", "RED", "a", "ab", "abcde", "2", "5", "10", "11", "[1]", "{}",
    "2020-01-01", "2020-01-01T00:00:00Z", "2020-01-01T00:00:00", "12:00:00", "12:00:00+01:00",
    "PT1S", "aGk=", "aGkh", "!!", "12345678-1234-5678-1234-567812345678",
    "99999999999999999999999", "x" * 300,
]  # fmt: skip


def job_with(annotation: Any, *, default: bool = False) -> JobSpec:
    """A job with one parameter `p` annotated `annotation`, registered as a worker would."""

    def fn(p: Any = None) -> None: ...

    fn.__annotations__ = {"p": annotation}
    if not default:
        fn.__defaults__ = None
    return JobRegistry().register(fn, name="job")


def worker_verdict(spec: JobSpec, params: dict[str, str]) -> str | None:
    try:
        spec.bind(params)
    except InvalidJobRequest as exc:
        return str(exc)
    return None


def orchestrator_shape(spec: JobSpec) -> CallShape:
    """The shape the orchestrator compiles from what the worker puts in PodInfo."""
    signatures, left_out = advertised([(spec.name, spec.signature())])
    assert left_out == []
    info = PodInfo(
        grpc_port=1, status=PodStatus.IDLE, update_datetime="", job_signatures=signatures
    )
    shape = shape_from_json(bytes(decode_pod_info(encode_pod_info(info)).job_signatures["job"]))
    assert shape is not None
    return shape


@pytest.mark.parametrize("annotation", EXACT, ids=repr)
def test_the_orchestrator_refuses_exactly_what_the_worker_refuses(annotation: Any) -> None:
    spec = job_with(annotation)
    assert describe(annotation) is not None or annotation is object
    shape = orchestrator_shape(spec)
    for raw in RAWS:
        params = {"p": raw}
        assert shape.problem("job", params) == worker_verdict(spec, params), (annotation, raw)


@pytest.mark.parametrize("annotation", UNCHECKED, ids=repr)
def test_what_a_description_cannot_carry_passes_the_orchestrator(annotation: Any) -> None:
    spec = job_with(annotation)
    assert describe(annotation) is None
    shape = orchestrator_shape(spec)
    refused = 0
    for raw in RAWS:
        assert shape.problem("job", {"p": raw}) is None
        refused += worker_verdict(spec, {"p": raw}) is not None
    assert refused  # the worker still judges (and refuses some)
    # the name and required-ness are still checked
    assert shape.problem("job", {}) == worker_verdict(spec, {}) == "params.p: required by job 'job'"


_shapes: dict[str, CallShape] = {}


@settings(max_examples=300, deadline=None)
@given(annotation=st.sampled_from(EXACT), raw=st.text(max_size=30))
def test_any_text_gets_the_same_verdict_on_both_tiers(annotation: Any, raw: str) -> None:
    spec = job_with(annotation)
    shape = _shapes.setdefault(repr(annotation), orchestrator_shape(spec))
    assert shape.problem("job", {"p": raw}) == worker_verdict(spec, {"p": raw})


@pytest.mark.parametrize(
    ("annotation", "raw", "message"),
    [
        (float, "abc", "params.p: expected a number, got 'abc'"),
        (int, "1.5", "params.p: expected an integer, got '1.5'"),
        (bool, "yes", "params.p: expected true or false, got 'yes'"),
        (Colour, "RED", "params.p: expected one of 'red', 'blue', got 'RED'"),
        (Level, "3", "params.p: expected one of 1, 2, got '3'"),
        (Literal["a", "b"], "c", "params.p: expected one of 'a', 'b', got 'c'"),
        (int | None, "x", "params.p: expected an integer or null, got 'x'"),
        (Annotated[int, msgspec.Meta(ge=0, le=9)], "-1",
         "params.p: expected an integer >= 0 and <= 9, got '-1'"),
        (Annotated[str, msgspec.Meta(max_length=2)], "abc",
         "params.p: expected text of at most 2 characters, got 'abc'"),
        (datetime.datetime, "soon", "params.p: expected an RFC 3339 date and time, got 'soon'"),
        (list[int], "1,2", "params.p: expected a list, got '1,2'"),
        (float, "x" * 100, f"params.p: expected a number, got {'x' * 40!r}… (100 characters)"),
    ],
)  # fmt: skip
def test_a_refusal_names_the_field_what_it_takes_and_what_came(
    annotation: Any, raw: str, message: str
) -> None:
    spec = job_with(annotation)
    assert worker_verdict(spec, {"p": raw}) == message
    assert orchestrator_shape(spec).problem("job", {"p": raw}) == message


def test_names_and_required_params_are_judged_alike() -> None:
    def resize(image: str, width: int = 640, *, mode: Colour = Colour.RED) -> None: ...

    def anything(n: int, /, size: int = 1, **rest: int) -> None: ...

    cases: list[tuple[Callable[..., Any], dict[str, str], str | None]] = [
        (resize, {"width": "10"}, "params.image: required by job 'job'"),
        (resize, {"image": "a", "height": "2"}, "params.height: job 'job' takes no such parameter"),
        (resize, {"image": "a", "mode": "red", "width": "3"}, None),
        (anything, {"whatever": "x", "n": "not converted: positional-only"}, None),
        (anything, {"size": "big"}, "params.size: expected an integer, got 'big'"),
    ]  # fmt: skip
    for fn, params, message in cases:
        spec = JobRegistry().register(fn, name="job")
        assert worker_verdict(spec, params) == message
        assert orchestrator_shape(spec).problem("job", params) == message


def test_the_builtin_jobs_signatures_are_small_and_say_what_they_take() -> None:
    registry = JobRegistry()
    registry.update(builtin_specs())
    signatures = registry.advertised_signatures()
    assert set(signatures) == set(registry.names())
    assert sum(len(bytes(s)) for s in signatures.values()) < 600
    sleep = decode_signature(bytes(signatures["sleep"]))
    (seconds,) = sleep.params
    assert (seconds.name, seconds.required, seconds.default) == ("seconds", False, "1.0")
    assert seconds.type_ is not None
    assert expected(seconds.type_) == "a number"
    assert decode_signature(bytes(signatures["echo"])) == JobSignature(any_params=True)


def test_signatures_past_the_caps_are_left_out_and_said() -> None:
    big = enum.Enum("Big", {f"V{i}": f"value-{i:04d}" for i in range(200)})  # type: ignore[misc]

    def huge(colour: Any) -> None: ...

    huge.__annotations__ = {"colour": big}

    def small(n: int) -> None: ...

    out = advertised([("huge", signature_of(huge)), ("small", signature_of(small))])
    assert list(out.signatures) == ["small"]
    ((name, why),) = out.left_out
    assert name == "huge"
    assert why.startswith("its signature takes")
    assert why.endswith("bytes, over 1024")
    many = advertised([(f"job{i:03d}", signature_of(small)) for i in range(400)])
    taken = sum(len(bytes(raw)) for raw in many.signatures.values())
    assert MAX_SIGNATURES_BYTES - 100 < taken <= MAX_SIGNATURES_BYTES
    assert len(many.signatures) + len(many.left_out) == 400
    assert many.left_out[0][0] == f"job{len(many.signatures):03d}"  # in the order given
    assert MAX_SIGNATURE_BYTES < MAX_SIGNATURES_BYTES


def test_an_unknown_kind_from_a_newer_worker_reads_as_unchecked() -> None:
    raw = b'{"params":[{"name":"p","type":{"kind":"quaternion"},"required":true}],"extra":1}'
    shape = shape_from_json(raw)
    assert shape is not None
    assert shape.problem("job", {"p": "anything"}) is None
    assert shape.problem("job", {}) == "params.p: required by job 'job'"
    assert shape.problem("job", {"q": "1"}) == "params.q: job 'job' takes no such parameter"
    assert shape_from_json(b"not json") is None
    union = b'{"params":[{"name":"p","type":{"kind":"union","of":[{"kind":"int"},{"kind":"?"}]}}]}'
    assert shape_from(decode_signature(union)).problem("job", {"p": "x"}) is None


def test_an_old_podinfo_without_signatures_still_reads() -> None:
    info = decode_pod_info(b'{"grpcPort":9091,"status":"IDLE","updateDatetime":"x"}')
    assert info.job_signatures == {}
