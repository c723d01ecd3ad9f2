"""store.wire decodes etcd's answers exactly as protobuf's own generated messages do."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

from etcd3.etcdrpc import kv_pb2, rpc_pb2

from warren_mesh.store.wire import WireError, decode_range_response, decode_watch_response
from warren_mesh.trust.decode import MAX_VALUE_BYTES
from warren_mesh.values.watch import Event, KeyValue


def _random_kv(rng: random.Random) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(
        key=f"/mesh/v1/nodes/n{rng.randrange(10**6)}-é".encode(),
        value=bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 200, 3000]))),
        create_revision=rng.choice([0, 1, 127, 128, 2**31, 2**62]),
        mod_revision=rng.randrange(2**40),
        version=rng.randrange(1000),
        lease=rng.choice([0, 0x694D9A2B1C3F0A11, 2**63 - 1, -5]),
    )


def _ours(kv: kv_pb2.KeyValue) -> KeyValue:
    return KeyValue(kv.key.decode(), kv.value, kv.create_revision, kv.mod_revision, kv.lease)


@pytest.mark.parametrize("seed", range(30))
def test_watch_answers_decode_as_protobuf_does(seed: int) -> None:
    rng = random.Random(seed)
    events = [
        kv_pb2.Event(type=rng.choice([kv_pb2.Event.PUT, kv_pb2.Event.DELETE]), kv=_random_kv(rng))
        for _ in range(rng.choice([0, 1, 5, 50]))
    ]
    for event in events:
        if rng.random() < 0.3:
            event.prev_kv.CopyFrom(_random_kv(rng))  # a field we skip
    message = rpc_pb2.WatchResponse(
        header=rpc_pb2.ResponseHeader(cluster_id=2**64 - 1, member_id=7, revision=rng.randrange(2**40), raft_term=3),
        watch_id=rng.choice([0, 1, -1]),
        created=rng.random() < 0.5,
        canceled=rng.random() < 0.2,
        compact_revision=rng.choice([0, 12345]),
        cancel_reason=rng.choice(["", "mvcc: required revision has been compacted"]),
        events=events,
    )
    answer = decode_watch_response(message.SerializeToString())
    assert answer.revision == message.header.revision
    assert (answer.watch_id, answer.created, answer.canceled) == (message.watch_id, message.created, message.canceled)
    assert (answer.compact_revision, answer.cancel_reason) == (message.compact_revision, message.cancel_reason)
    assert answer.events == tuple(
        Event("delete" if e.type == kv_pb2.Event.DELETE else "put", _ours(e.kv)) for e in events
    )


@pytest.mark.parametrize("seed", range(10))
def test_range_answers_decode_as_protobuf_does(seed: int) -> None:
    rng = random.Random(seed)
    kvs = [_random_kv(rng) for _ in range(rng.choice([0, 1, 100]))]
    message = rpc_pb2.RangeResponse(
        header=rpc_pb2.ResponseHeader(revision=rng.randrange(1, 2**40)), kvs=kvs, more=True, count=len(kvs)
    )
    answer = decode_range_response(message.SerializeToString())
    assert answer.revision == message.header.revision
    assert answer.kvs == tuple(_ours(kv) for kv in kvs)
    assert (answer.more, answer.count) == (True, len(kvs))


def test_unknown_fields_of_a_newer_etcd_are_skipped() -> None:
    known = rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=9), watch_id=3).SerializeToString()
    # field 15 as a varint, field 16 as bytes, field 17 as fixed64, field 18 as fixed32
    unknown = b"\x78\x2a" + b"\x82\x01\x03abc" + b"\x89\x01" + bytes(8) + b"\x95\x01" + bytes(4)
    answer = decode_watch_response(unknown + known)
    assert (answer.revision, answer.watch_id) == (9, 3)


def test_truncated_answers_are_refused() -> None:
    data = rpc_pb2.WatchResponse(
        header=rpc_pb2.ResponseHeader(revision=9),
        events=[kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"/k", value=b"v" * 40, mod_revision=300))],
    ).SerializeToString()
    for cut in (1, 3, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError):
            decode_watch_response(data[:cut])


def test_a_value_over_the_record_limit_is_dropped_with_its_size() -> None:
    """No record is over MAX_VALUE_BYTES: such a value's bytes are not copied, the key-value says how large it was
    (the view rejects it as too large), and the key-values beside it decode as before."""
    kvs = [
        kv_pb2.KeyValue(key=b"/m/a", value=b"a" * MAX_VALUE_BYTES, mod_revision=5),
        kv_pb2.KeyValue(key=b"/m/b", value=b"b" * (MAX_VALUE_BYTES + 1), mod_revision=6, lease=9),
        kv_pb2.KeyValue(key=b"/m/c", value=b"c", mod_revision=7),
    ]
    range_answer = decode_range_response(rpc_pb2.RangeResponse(kvs=kvs).SerializeToString())
    watch_answer = decode_watch_response(
        rpc_pb2.WatchResponse(events=[kv_pb2.Event(kv=kv) for kv in kvs]).SerializeToString()
    )
    dropped = KeyValue("/m/b", b"", 0, 6, 9, oversize=MAX_VALUE_BYTES + 1)
    assert range_answer.kvs == (_ours(kvs[0]), dropped, _ours(kvs[2]))
    assert tuple(e.kv for e in watch_answer.events) == range_answer.kvs
