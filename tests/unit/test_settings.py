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


def test_who_runs_wireguard_go_and_the_restart_grace_are_checked() -> None:
    assert _agent().device.start_wireguard_go and _agent("--wireguard-go-runner=agent").device.start_wireguard_go
    assert not _agent("--wireguard-go-runner=external").device.start_wireguard_go
    with pytest.raises(SettingsError, match="not agent or external"):
        _agent("--wireguard-go-runner=pod")
    assert _agent().registration.restart_grace == 0  # outside Kubernetes a stopped agent leaves at once
    assert _agent("--restart-grace=60").registration.restart_grace == 60
    for bad in ("1", "3601", "-5", "1m"):
        with pytest.raises(SettingsError, match="--restart-grace"):
            _agent(f"--restart-grace={bad}")
