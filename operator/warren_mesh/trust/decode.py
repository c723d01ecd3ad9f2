"""JSON from etcd, decoded only once bounded: values are limited in size and nesting before they are parsed, and
numbers must be JSON numbers of the right type and range.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from warren_mesh.trust.reasons import (
    REASON_INVALID_FIELD,
    REASON_INVALID_JSON,
    REASON_SCHEMA_VERSION,
    REASON_TOO_LARGE,
    RecordError,
)
from warren_mesh.trust.text import printable, shown
from warren_mesh.values.keyspace import SCHEMA_VERSION

# Bounds on what a record may be before it is parsed at all. A node record is ~300 bytes and an external peer
# with every network it may route a few kB; nothing of ours nests deeper than an object holding a list.
MAX_ALLOWED_IPS: Final = 64
MAX_VALUE_BYTES: Final = 16 * 1024


MAX_KEY_BYTES: Final = 512


MAX_NESTING: Final = 4


def _reject_constant(name: str) -> object:
    raise RecordError(REASON_INVALID_JSON, f"value is not JSON: {name} is not a number JSON allows")


def decode_json(raw: bytes) -> object:
    """Parse a value from etcd, within the size and nesting bounds; any failure is a RecordError."""
    if len(raw) > MAX_VALUE_BYTES:
        raise RecordError(REASON_TOO_LARGE, f"value of {len(raw)} bytes is larger than {MAX_VALUE_BYTES}")
    # Counting brackets is cheap and bounds the nesting from above; only a value with many of them (inside
    # strings, or a hostile one) is measured exactly, before the recursive parser can be driven to its limit.
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nesting(raw) > MAX_NESTING:
        raise RecordError(REASON_TOO_LARGE, f"value nests deeper than {MAX_NESTING} levels")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecordError:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, a number of thousands of digits
        raise RecordError(REASON_INVALID_JSON, f"value is not JSON: {printable(str(exc), 120)}") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw``, brackets inside strings not counted."""
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def json_object(data: object, *, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(REASON_INVALID_FIELD, f"{what} is not a JSON object")
    return data


def check_schema(doc: dict[str, Any]) -> None:
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise RecordError(
            REASON_SCHEMA_VERSION,
            f"schema version {shown(schema)} is not {SCHEMA_VERSION} (written by another version?)",
        )


def bounded_list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise RecordError(REASON_INVALID_FIELD, f"{key} is not a list")
    if len(value) > MAX_ALLOWED_IPS:
        raise RecordError(REASON_TOO_LARGE, f"{key} has {len(value)} entries, more than {MAX_ALLOWED_IPS}")
    return value


def optional_int(doc: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise RecordError(REASON_INVALID_FIELD, f"{key} {shown(value)} is not a whole number {low}-{high}")
    return value


def bool_of(doc: dict[str, Any], key: str, default: bool) -> bool:
    """A JSON true or false (not 0, 1 or "true"), or ``default`` when absent."""
    value = doc.get(key, default)
    if type(value) is not bool:
        raise RecordError(REASON_INVALID_FIELD, f"{key} {shown(value)} is not true or false")
    return value


def int_in(doc: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = optional_int(doc, key, low, high)
    return default if value is None else value
