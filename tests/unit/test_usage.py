"""mesh/usage.py: what each node holds under its own keys, folded from a watch, against its quota."""

from __future__ import annotations

from warren_mesh.mesh.usage import NodeUsage, Quota, Usage
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import Event, Events, KeyValue, Snapshot

SCHEMA = KeySchema("/m")
QUOTA = Quota(soft_keys=3, soft_bytes=1000, hard_keys=5, hard_bytes=5000)


def _kv(key: str, size: int = 10, oversize: int = 0) -> KeyValue:
    return KeyValue(key, b"x" * size, 1, 1, oversize=oversize)


def test_only_the_keys_a_node_may_write_count_as_its_own() -> None:
    usage = NodeUsage(SCHEMA)
    owned = [SCHEMA.node("a"), SCHEMA.claim("a", "10.0.0.1"), SCHEMA.claim("a", "10.1.0.0/24", "pods")]
    others = [
        SCHEMA.config,
        SCHEMA.peer("laptop"),
        SCHEMA.nodes + "a/deeper",
        SCHEMA.claims + "a",
        SCHEMA.suspension("a"),
    ]
    invalid = [SCHEMA.claims + "Not_A_Name/overlay/1", SCHEMA.node("UPPER")]
    touched = usage.apply(Snapshot(tuple(_kv(k) for k in owned + others + invalid), 5))
    assert touched == {"a"}
    assert usage.by_node == {"a": Usage(3, sum(len(k) + 10 for k in owned))}


def test_usage_follows_puts_and_deletes_and_counts_values_never_fetched() -> None:
    usage = NodeUsage(SCHEMA)
    usage.apply(Snapshot((_kv(SCHEMA.node("a")),), 1))
    claim = SCHEMA.claim("a", "10.0.0.2")
    assert usage.apply(Events((Event("put", _kv(claim, oversize=300_000)),), 2)) == {"a"}
    assert usage.by_node["a"].bytes == len(SCHEMA.node("a")) + 10 + len(claim) + 300_000
    usage.apply(Events((Event("put", _kv(claim, size=1)),), 3))  # rewritten smaller: counted once, at its size
    assert usage.by_node["a"] == Usage(2, len(SCHEMA.node("a")) + 10 + len(claim) + 1)
    usage.apply(Events((Event("delete", _kv(claim, 0)), Event("delete", _kv(SCHEMA.node("a"), 0))), 4))
    assert usage.by_node == {}
    # A new snapshot replaces everything, and names every node it changed, those now gone included.
    usage.apply(Snapshot((_kv(SCHEMA.node("b")),), 5))
    assert usage.apply(Snapshot((), 6)) == {"b"} and usage.by_node == {}


def test_verdicts_name_the_limit_passed() -> None:
    usage = NodeUsage(SCHEMA)
    claims = [
        _kv(SCHEMA.claim(n, f"10.0.0.{i}")) for n, count in (("few", 3), ("some", 4), ("many", 6)) for i in range(count)
    ]
    touched = usage.apply(Snapshot((*claims, _kv(SCHEMA.node("big"), oversize=6000)), 1))
    verdicts = usage.verdicts(touched | {"gone"}, QUOTA)
    assert verdicts["few"] is None and verdicts["gone"] is None
    assert {n: v[0] for n, v in verdicts.items() if v} == {"some": "soft", "many": "hard", "big": "hard"}
    assert (
        verdicts["many"] is not None
        and "6 keys" in verdicts["many"][1]
        and "hard quota of 5 keys" in verdicts["many"][1]
    )
    assert usage.over(QUOTA).keys() == {"some", "many", "big"}
