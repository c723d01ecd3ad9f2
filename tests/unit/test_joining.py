"""Joining at start (agent/joining.py): the config registered with comes from the agent's one listing."""

from __future__ import annotations

import logging

import pytest

from warren_mesh.agent.joining import config_in
from warren_mesh.trust.records import MeshConfig, encode_json
from warren_mesh.values.keyspace import KeySchema
from warren_mesh.values.watch import KeyValue, Snapshot

SCHEMA = KeySchema("/j")


def listing(config: bytes | None) -> Snapshot:
    items = [KeyValue(SCHEMA.node("a"), b"{}", 2, 2)]
    if config is not None:
        items.insert(0, KeyValue(SCHEMA.config, config, 1, 1))
    return Snapshot(tuple(items), 2)


def test_the_config_registered_with_is_the_listings_and_the_defaults_without_a_valid_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = MeshConfig(mtu=1380)
    assert config_in(listing(encode_json(config.to_json())), SCHEMA) == config
    assert config_in(listing(None), SCHEMA) == MeshConfig()
    with caplog.at_level(logging.WARNING):
        assert config_in(listing(b"{not json"), SCHEMA) == MeshConfig()
    assert [r.message for r in caplog.records if "mesh config is invalid" in r.message]
