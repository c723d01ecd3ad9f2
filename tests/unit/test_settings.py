"""Agent flags that are parsed by hand: one clear error for a bad value."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from warren_mesh.settings import AgentSettings, SettingsError, parse_duration


def _agent(*flags: str) -> AgentSettings:
    parser = argparse.ArgumentParser()
    AgentSettings.add_arguments(parser)
    return AgentSettings.from_args(parser.parse_args(["--node-name=a", *flags]))


def test_rotate_key_every_takes_a_duration_of_at_least_a_minute() -> None:
    assert parse_duration("--rotate-key-every", "24h") == 86400.0
    assert parse_duration("--rotate-key-every", "90s") == 90.0 and parse_duration("-", "7d") == 604800.0
    assert _agent("--rotate-key-every=30m").device.rotate_key_every == 1800.0
    assert _agent().device.rotate_key_every is None
    for bad in ("10s", "1h30m", "h", "-5m", "24", "1w"):
        with pytest.raises(SettingsError, match="not a duration"):
            _agent(f"--rotate-key-every={bad}")


def test_wireguard_go_must_be_an_executable(tmp_path: Path) -> None:
    assert _agent("--wireguard-go=/bin/true").device.wireguard_go == "/bin/true"
    plain = tmp_path / "wireguard-go"
    plain.write_text("not a program")
    for bad in (plain, tmp_path / "missing"):
        with pytest.raises(SettingsError, match="not an executable"):
            _agent(f"--wireguard-go={bad}")
