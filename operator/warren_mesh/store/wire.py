"""etcd's watch and range answers, decoded from protobuf's wire format straight into our values.

Every agent decodes every change in the mesh, and with a Python 3.11 wheel the etcd3 package's generated
messages run on protobuf's pure-Python implementation: building a message object per event and per key-value,
then copying it into ours, was a fifth of an agent's CPU in a 400-node start-up storm. These two answers are the
hot path, so they are read here field by field (a one-event answer: 8 us instead of 18 us); every other call
keeps the generated messages. The field numbers are etcd's ``rpc.proto`` and ``kv.proto`` (API v3, stable since
etcd 3.0); fields we do not know are skipped, as protobuf requires, so newer etcd versions decode too.
"""

from __future__ import annotations

from dataclasses import dataclass

from warren_mesh.trust.decode import MAX_VALUE_BYTES
from warren_mesh.values.watch import Event, KeyValue

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_INT64_WRAP = 1 << 64
_INT64_SIGN = 1 << 63


class WireError(ValueError):
    """Bytes that are not the message they should be."""


@dataclass(frozen=True, slots=True)
class WatchAnswer:
    """One WatchResponse: a confirmation, a cancellation, a progress report or a batch of events."""

    revision: int  # the header's: the store's revision when etcd sent it
    watch_id: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class RangeAnswer:
    revision: int
    kvs: tuple[KeyValue, ...] = ()
    more: bool = False
    count: int = 0


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        byte = buf[pos]
        pos += 1
        if byte < 0x80:
            return byte, pos
        result, shift = byte & 0x7F, 7
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise WireError("varint longer than 10 bytes")
    except IndexError:
        raise WireError("message ends inside a varint") from None


def _int64(value: int) -> int:
    """A varint read as protobuf's int64 (negative numbers are sent as 10-byte two's complement)."""
    return value - _INT64_WRAP if value >= _INT64_SIGN else value


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    size, pos = _varint(buf, pos)
    if pos + size > end:
        raise WireError("field runs past the end of its message")
    return pos, pos + size


def _skip(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(buf, pos)[1]
    if wire_type == _LENGTH:
        return _length(buf, pos, end)[1]
    if wire_type in (_FIXED64, _FIXED32):
        pos += 8 if wire_type == _FIXED64 else 4
        if pos > end:
            raise WireError("fixed-size field runs past the end of its message")
        return pos
    raise WireError(f"unsupported wire type {wire_type}")


def _header_revision(buf: bytes, pos: int, end: int) -> int:
    revision = 0
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag == (3 << 3 | _VARINT):
            value, pos = _varint(buf, pos)
            revision = _int64(value)
        else:
            pos = _skip(buf, pos, end, tag & 7)
    return revision


def _key_value(buf: bytes, pos: int, end: int) -> KeyValue:
    key = value = b""
    create_revision = mod_revision = lease = oversize = 0
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _LENGTH and field in (1, 5):
            start, pos = _length(buf, pos, end)
            if field == 1:
                key = buf[start:pos]
            elif pos - start > MAX_VALUE_BYTES:
                # No record is this large: the view rejects it by its size alone, so its bytes are never copied
                # (a node may write values of up to etcd's 1.5 MiB request limit under its own keys).
                oversize = pos - start
            else:
                value = buf[start:pos]
        elif wire_type == _VARINT and field in (2, 3, 6):
            number, pos = _varint(buf, pos)
            if field == 2:
                create_revision = _int64(number)
            elif field == 3:
                mod_revision = _int64(number)
            else:
                lease = _int64(number)
        else:
            pos = _skip(buf, pos, end, wire_type)
    # Keys are decoded losslessly whatever their bytes: a key that is not UTF-8 is a bad record for the view to
    # reject (and its deletion must reach the same string), never an error here, where gRPC would swallow it
    # and end the whole call.
    return KeyValue(key.decode("utf-8", "surrogateescape"), value, create_revision, mod_revision, lease, oversize)


def _event(buf: bytes, pos: int, end: int) -> Event:
    deleted = False
    kv: KeyValue | None = None
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag == (1 << 3 | _VARINT):
            kind, pos = _varint(buf, pos)
            deleted = kind == 1  # mvccpb.Event.EventType: PUT = 0, DELETE = 1
        elif tag == (2 << 3 | _LENGTH):
            start, pos = _length(buf, pos, end)
            kv = _key_value(buf, start, pos)
        else:
            pos = _skip(buf, pos, end, tag & 7)
    if kv is None:
        raise WireError("event without a key-value")
    return Event("delete" if deleted else "put", kv)


def decode_watch_response(data: bytes) -> WatchAnswer:
    """A WatchResponse (etcdserverpb, rpc.proto) from its serialized bytes."""
    buf, pos, end = bytes(data), 0, len(data)
    revision = watch_id = compact_revision = 0
    created = canceled = False
    cancel_reason = ""
    events: list[Event] = []
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _LENGTH and field in (1, 6, 11):
            start, pos = _length(buf, pos, end)
            if field == 11:
                events.append(_event(buf, start, pos))
            elif field == 1:
                revision = _header_revision(buf, start, pos)
            else:
                cancel_reason = buf[start:pos].decode(errors="replace")
        elif wire_type == _VARINT and field in (2, 3, 4, 5):
            number, pos = _varint(buf, pos)
            if field == 2:
                watch_id = _int64(number)
            elif field == 3:
                created = bool(number)
            elif field == 4:
                canceled = bool(number)
            else:
                compact_revision = _int64(number)
        else:
            pos = _skip(buf, pos, end, wire_type)
    return WatchAnswer(revision, watch_id, created, canceled, compact_revision, cancel_reason, tuple(events))


def decode_range_response(data: bytes) -> RangeAnswer:
    """A RangeResponse (etcdserverpb, rpc.proto) from its serialized bytes."""
    buf, pos, end = bytes(data), 0, len(data)
    revision = count = 0
    more = False
    kvs: list[KeyValue] = []
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _LENGTH and field in (1, 2):
            start, pos = _length(buf, pos, end)
            if field == 2:
                kvs.append(_key_value(buf, start, pos))
            else:
                revision = _header_revision(buf, start, pos)
        elif wire_type == _VARINT and field in (3, 4):
            number, pos = _varint(buf, pos)
            if field == 3:
                more = bool(number)
            else:
                count = _int64(number)
        else:
            pos = _skip(buf, pos, end, wire_type)
    return RangeAnswer(revision, tuple(kvs), more, count)
