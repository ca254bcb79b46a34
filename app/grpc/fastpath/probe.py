"""The start-up probe: every grpclib, h2, hpack and betterproto2 internal the fast path relies on.

`INTERNALS` lists them once, each with the shape the fast path needs (a method, an int, a dict,
an enum member, a keyword a constructor takes…). Class and module attributes are looked up where
they live; attributes that only instances have are looked up on objects built exactly the way
the fast server builds them (`_Specimens`: grpclib's Server, its Handler, an H2Protocol made
over a stand-in transport, its Connection, H2Connection and EventsProcessor, and an h2 stream).

`missing_internals()` imports nothing of the fast path itself and never raises: a newer grpclib
or h2 that moved something makes the server fall back to grpclib's own, with one warning
(install.py). The version pins in pyproject.toml say which releases were checked by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterator
from typing import Any

Shape = Callable[[Any], bool]


def _method(value: Any) -> bool:
    return callable(value)


def _class(value: Any) -> bool:
    return inspect.isclass(value)


def _present(value: Any) -> bool:
    return True


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(*names: str) -> Shape:
    """An instance of a class with one of these names (the probe imports nothing to compare)."""
    return lambda value: any(cls.__name__ in names for cls in type(value).__mro__)


def _has(*attributes: str) -> Shape:
    return lambda value: all(hasattr(value, a) for a in attributes)


def _equals(expected: object) -> Shape:
    return lambda value: bool(value == expected)


def _takes(*parameters: str) -> Shape:
    """A callable whose signature names these parameters."""

    def check(value: Any) -> bool:
        names = inspect.signature(value).parameters
        return all(p in names for p in parameters)

    return check


def _reads_global(name: str) -> Shape:
    """A function that looks `name` up in its module's globals (what a module-level tweak hits)."""
    return lambda value: name in value.__code__.co_names


def _size_limited(value: Any) -> bool:
    """h2's SizeLimitDict: built with `size_limit=`, it forgets the oldest entries past it."""
    d = value(size_limit=1)
    d[1] = d[2] = None
    return list(d) == [2]


def _hpack_integer(value: Any) -> bool:
    """RFC 7541 5.1 integers: 5 fits a 7-bit prefix; 31 overflows a 4-bit one."""
    return bytes(value(5, 7)) == b"\x05" and bytes(value(31, 4)) == b"\x0f\x10"


def _field_metadata(value: Any) -> bool:
    """betterproto2's metadata by field name, with what the codec plans a message from."""
    import betterproto2

    items, name = value["items"], value["name"]
    key, item = items.map_meta
    kinds = (items.number, items.proto_type, name.proto_type, key.proto_type, item.proto_type)
    plain = [(m.group, m.unwrap, m.optional, m.repeated) for m in (items, name, item)]
    string, map_ = betterproto2.TYPE_STRING, betterproto2.TYPE_MAP
    return kinds == (1, map_, string, string, string) and plain == [(None, None, False, False)] * 3


def _map_entry_class(value: Any) -> bool:
    """A map field's class: an entry message with metadata of its own."""
    return isinstance(value["items"]._betterproto.cls_by_field, dict)


def _dispatch_table(value: Any) -> bool:
    """EventsProcessor.processors: the h2 events it handles, bound to its own methods (so a
    subclass's overrides are the ones called)."""
    wanted = {
        "RequestReceived": "process_request_received",
        "DataReceived": "process_data_received",
        "StreamEnded": "process_stream_ended",
        "StreamReset": "process_stream_reset",
        "WindowUpdated": "process_window_updated",
        "RemoteSettingsChanged": "process_remote_settings_changed",
    }
    found = {event.__name__: handler for event, handler in value.items()}
    return all(
        getattr(found.get(event), "__name__", None) == method for event, method in wanted.items()
    )


_PROCESSOR_METHODS = (
    "process_request_received",
    "process_data_received",
    "process_stream_ended",
    "process_stream_reset",
    "process_window_updated",
    "process_remote_settings_changed",
    "close",
)
_CONNECTION_COUNTERS = (
    "streams_started",
    "streams_succeeded",
    "streams_failed",
    "data_sent",
    "data_received",
    "messages_sent",
    "messages_received",
    "ping_count_in_sequence",
)
_CONNECTION_TIMES = (
    "last_stream_created",
    "last_data_sent",
    "last_data_received",
    "last_message_sent",
    "last_message_received",
)
_BETTERPROTO_TYPES = (
    *(
        f"TYPE_{t}"
        for t in ("BOOL", "FLOAT", "DOUBLE", "STRING", "BYTES", "ENUM", "MESSAGE", "MAP")
    ),
    *(f"TYPE_{s}{t}" for s in ("", "U", "S") for t in ("INT32", "INT64")),
    *(f"TYPE_{s}{t}" for s in ("", "S") for t in ("FIXED32", "FIXED64")),
)

# (where, attribute, shape). `where` is an importable dotted path, or `<name>` for an object that
# `_Specimens` builds the way the fast server does.
INTERNALS: tuple[tuple[str, str, Shape], ...] = (
    # grpclib: FastServer subclasses Server, Handler, H2Protocol and EventsProcessor and reads
    # what they keep
    ("grpclib.server.Server", "_protocol_factory", _method),
    ("grpclib.server.Server", "__gc_step__", _method),
    ("grpclib.server.Handler", "__init__", _takes("mapping", "codec", "status_details_codec")),
    ("grpclib.protocol.H2Protocol", "connection_made", _method),
    ("grpclib.protocol.H2Protocol", "connection_lost", _method),
    *(("grpclib.protocol.EventsProcessor", m, _method) for m in _PROCESSOR_METHODS),
    ("grpclib.protocol.Connection", "flush", _method),
    ("grpclib.protocol.Connection", "is_closing", _method),
    ("grpclib.protocol.Connection", "get_peer", _method),
    *(("grpclib.protocol.Connection", c, _int) for c in _CONNECTION_COUNTERS),
    *(("grpclib.protocol.Connection", t, _present) for t in _CONNECTION_TIMES),
    ("grpclib.protocol", "Peer", _class),
    ("grpclib.stream", "StreamIterator", _class),
    ("grpclib.metadata", "Deadline", _takes("_timestamp")),
    ("grpclib.metadata", "decode_metadata", _method),
    ("grpclib.metadata", "decode_timeout", _method),
    ("grpclib.metadata", "encode_bin_value", _method),
    ("grpclib.metadata", "encode_grpc_message", _method),
    ("grpclib.metadata", "encode_metadata", _method),
    ("grpclib.metadata", "_STATUS_DETAILS_KEY", _equals("grpc-status-details-bin")),
    ("grpclib.encoding.base", "GRPC_CONTENT_TYPE", _equals("application/grpc")),
    ("<Server>", "_mapping", _kind("dict")),
    ("<Server>", "_codec", _present),
    ("<Server>", "_status_details_codec", _present),
    ("<Server>", "_config", _present),
    ("<Server>", "_h2_config", _kind("H2Configuration")),
    ("<Server>", "_handlers", _kind("set")),
    ("<Server>", "__dispatch__", _has("add_listener", "_listeners")),
    ("<Handler>", "_tasks", _kind("dict")),
    ("<Handler>", "mapping", _kind("dict")),
    ("<Handler>", "codec", _present),
    ("<Handler>", "status_details_codec", _present),
    ("<Handler>", "dispatch", _has("_listeners")),
    ("<Handler.dispatch>", "_listeners", _kind("dict")),
    ("<H2Protocol>", "handler", _present),
    ("<H2Protocol>", "connection", _kind("Connection")),
    ("<H2Protocol>", "processor", _kind("EventsProcessor")),
    ("<EventsProcessor>", "processors", _dispatch_table),
    ("<Connection>", "_connection", _kind("H2Connection")),
    ("<Connection>", "_transport", _present),
    ("<Connection>", "write_ready", _kind("Event")),
    ("<Connection>", "stream_close_waiter", _kind("Event")),
    # h2: the one-write reply drives its state machines and windows and appends to its buffer;
    # the closed-streams limit is set per connection; the frame-trace tweak replaces `repr`
    ("h2.connection.H2Connection", "MAX_CLOSED_STREAMS", _int),
    ("h2.connection.H2Connection", "_receive_frame", _reads_global("repr")),
    ("h2.connection.H2Connection", "send_headers", _method),
    ("h2.connection.H2Connection", "send_data", _method),
    ("h2.connection.H2Connection", "reset_stream", _method),
    ("h2.connection.H2Connection", "acknowledge_received_data", _method),
    # the limits: settings sent on each server connection, hpack's header list limit at once
    ("h2.connection.H2Connection", "update_settings", _method),
    ("<H2Connection>", "decoder", _has("max_header_list_size")),
    ("<H2Connection>", "incoming_buffer", _kind("FrameBuffer")),
    ("h2.frame_buffer.FrameBuffer", "__init__", _takes("server")),
    ("h2.frame_buffer.FrameBuffer", "_update_header_buffer", _method),
    ("<FrameBuffer>", "_headers_buffer", _kind("list")),
    ("hyperframe.frame", "HeadersFrame", _class),
    ("h2.connection.H2Connection", "local_flow_control_window", _method),
    ("h2.connection.ConnectionInputs", "SEND_HEADERS", _present),
    ("h2.connection.ConnectionInputs", "SEND_DATA", _present),
    ("h2.connection.ConnectionState", "CLOSED", _present),
    ("h2.stream.StreamInputs", "SEND_HEADERS", _present),
    ("h2.stream.StreamInputs", "SEND_DATA", _present),
    ("h2.stream.StreamInputs", "SEND_END_STREAM", _present),
    ("h2.utilities", "SizeLimitDict", _size_limited),
    ("<H2Connection>", "_data_to_send", _kind("bytearray")),
    ("<H2Connection>", "_closed_streams", _kind("SizeLimitDict")),
    ("<H2Connection>", "state_machine", _has("process_input")),
    ("<H2Connection>", "streams", _kind("dict")),
    ("<H2Connection>", "outbound_flow_control_window", _int),
    ("<H2Connection>", "max_outbound_frame_size", _int),
    ("<H2Stream>", "state_machine", _has("process_input")),
    ("<H2Stream>", "outbound_flow_control_window", _int),
    ("<H2Stream>", "closed", _kind("bool")),
    # hpack: the fixed header blocks of the one-write reply
    ("hpack.hpack", "encode_integer", _hpack_integer),
    # betterproto2: the upb codec reads each message class's field metadata
    ("<betterproto2 message>", "_unknown_fields", _equals(b"")),
    ("<betterproto2 metadata>", "meta_by_field_name", _field_metadata),
    ("<betterproto2 metadata>", "cls_by_field", _map_entry_class),
    ("betterproto2", "Enum", _class),
    *(("betterproto2", t, _present) for t in _BETTERPROTO_TYPES),
    ("google.protobuf.message_factory", "GetMessageClass", _method),
)

_VERSIONS = ("grpclib", "h2", "hpack", "betterproto2")


def _resolve(dotted: str) -> Any:
    """The object at `dotted`: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _betterproto_specimen() -> type[Any]:
    """A betterproto2 message class the way the compiler writes one: a map and a string."""
    import betterproto2

    @dataclasses.dataclass(eq=False, repr=False)
    class ProbeMessage(betterproto2.Message):
        items: dict[str, str] = betterproto2.field(  # noqa: RUF009 (betterproto2's own idiom)
            1,
            betterproto2.TYPE_MAP,
            map_meta=betterproto2.map_meta(betterproto2.TYPE_STRING, betterproto2.TYPE_STRING),
        )
        name: str = betterproto2.field(2, betterproto2.TYPE_STRING)

    return ProbeMessage


class _ProbeTransport(asyncio.Transport):
    """A transport that takes what it is given and goes nowhere."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True


class _Specimens:
    """grpclib and h2 objects built the way FastServer builds them, to look at their instances."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.errors: list[str] = []

    def get(self, where: str) -> Any:
        """The object named `where`; LookupError (saying why) when it could not be built."""
        try:
            return self.objects[where]
        except KeyError:
            raise LookupError(f"cannot build it: {'; '.join(self.errors)}") from None

    @contextlib.contextmanager
    def built(self) -> Iterator[_Specimens]:
        """Build them (a failure is kept in `error`), and close the connection afterwards."""
        protocol: Any = None
        try:
            self.objects["<betterproto2 message>"] = message = _betterproto_specimen()()
            self.objects["<betterproto2 metadata>"] = type(message)._betterproto
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        try:
            from grpclib.protocol import H2Protocol
            from grpclib.server import Handler, Server
            from h2.config import H2Configuration
            from h2.connection import H2Connection

            o = self.objects
            o["<Server>"] = server = Server([])
            o["<Handler>"] = handler = Handler(
                server._mapping, server._codec, server._status_details_codec, server.__dispatch__
            )
            o["<Handler.dispatch>"] = handler.dispatch
            client = H2Connection(H2Configuration(client_side=True))
            client.initiate_connection()
            request = [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "x"),
                (":path", "/"),
            ]
            client.send_headers(1, request)
            o["<H2Stream>"] = client.streams[1]
            # what FastServer's protocol factory makes, over a transport that goes nowhere
            protocol = H2Protocol(handler, server._config, server._h2_config)
            protocol.connection_made(_ProbeTransport())
            o["<H2Protocol>"] = protocol
            o["<Connection>"] = connection = protocol.connection
            o["<EventsProcessor>"] = protocol.processor
            o["<H2Connection>"] = connection._connection
            o["<FrameBuffer>"] = connection._connection.incoming_buffer
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        try:
            yield self
        finally:
            if protocol is not None:
                with contextlib.suppress(Exception):
                    protocol.connection_lost(None)


def missing_internals() -> list[str]:
    """What the fast path needs and this process lacks or has in another shape; empty: all there.

    One entry per `INTERNALS` row that fails, as `where.attribute` (with the reason when it is
    not plain absence). Never raises; call it with an event loop running (grpclib's Server and
    Handler ask for one).
    """
    missing: list[str] = []
    with _Specimens().built() as specimens:
        for where, attribute, shape in INTERNALS:
            name = f"{where}.{attribute}"
            try:
                owner = specimens.get(where) if where.startswith("<") else _resolve(where)
                value = getattr(owner, attribute)
            except AttributeError:
                missing.append(name)
                continue
            except Exception as exc:
                missing.append(f"{name} ({exc})")
                continue
            try:
                fits = shape(value)
            except Exception as exc:
                fits, why = False, f"{type(exc).__name__}: {exc}"
            else:
                why = "not the shape the fast path needs"
            if not fits:
                missing.append(f"{name} ({why})")
    return missing


def versions() -> str:
    """The versions of the libraries the probe looked at, for the fallback's warning."""
    found = []
    for dist in _VERSIONS:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)
