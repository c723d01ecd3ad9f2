"""The node key: created once with mode 0600, reused, and never replaced when unreadable."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from warren_mesh.identity.keys import KeyFileError, NodeKey, load_or_create, public_key_of


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "private.key"
    key, created = load_or_create(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create(path)
    assert not created_again
    assert again.public_key == key.public_key
    assert len(base64.b64decode(key.public_key)) == 32
    assert public_key_of(path.read_text().strip()) == key.public_key


def test_private_key_never_in_repr(tmp_path: Path) -> None:
    key = NodeKey.generate()
    assert key.private_base64() not in repr(key)
    assert key.private_base64() not in str(key)


def test_unreadable_key_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_text("garbage\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="does not hold a WireGuard private key"):
        load_or_create(path)
    assert path.read_text() == "garbage\n"


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(path)
