"""The node's WireGuard identity: an X25519 key pair whose private half never leaves this file.

The key file uses the format of ``wg genkey`` (one line of base64) so an operator can inspect a node with the
usual tools. It is created once with mode 0600 and reused on every restart: a node that kept its key keeps its
peers' sessions, and a key file that exists but cannot be read is an error, never a reason to make a new key
(that would silently change the node's identity).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


class KeyFileError(RuntimeError):
    """The key file exists but cannot be used as it is."""


@dataclass(frozen=True, slots=True)
class NodeKey:
    """A private key and its public half; ``repr`` never shows the private half."""

    private_bytes: bytes
    public_key: str  # base64, as peers and etcd see it

    def __repr__(self) -> str:
        return f"NodeKey(public_key={self.public_key!r})"

    def private_base64(self) -> str:
        """Only for handing the key to the device; never log or publish this."""
        return base64.b64encode(self.private_bytes).decode()

    @classmethod
    def generate(cls) -> NodeKey:
        return cls.from_private_bytes(
            X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeKey:
        public = X25519PrivateKey.from_private_bytes(raw).public_key()
        public_raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(raw, base64.b64encode(public_raw).decode())


def public_key_of(private_base64: str) -> str:
    return NodeKey.from_private_bytes(base64.b64decode(private_base64)).public_key


def load_or_create(path: Path) -> tuple[NodeKey, bool]:
    """Return the node key from ``path``, creating it (mode 0600) when absent; the flag says it was created."""
    try:
        return _load(path), False
    except FileNotFoundError:
        pass
    key = NodeKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: two agents racing on one file must not both write; the loser reads the winner's key.
    try:
        _write_new(path, key)
    except FileExistsError:
        return _load(path), False
    return key, True


def _write_new(path: Path, key: NodeKey) -> None:
    """``key`` into a new file (0600, on disk before this returns); FileExistsError if ``path`` exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.private_base64() + "\n")
        out.flush()
        os.fsync(out.fileno())


def load(path: Path) -> NodeKey:
    """The key in ``path`` (which must be private to its owner); KeyFileError says what is wrong with it."""
    try:
        return _load(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None


def _load(path: Path) -> NodeKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
        )
    text = path.read_text().strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(
            f"key file {path} does not hold a WireGuard private key (32 bytes of base64); "
            "fix or move it away to create a new identity"
        )
    return NodeKey.from_private_bytes(raw)


# --- key rotation (docs/key-rotation.md) ----------------------------------------------------------------------


def pending_path(path: Path) -> Path:
    """Where the key a rotation switches to waits until it is installed."""
    return path.with_name(path.name + ".next")


def write_pending(path: Path, key: NodeKey) -> None:
    """Keep ``key`` beside the key file (0600) while peers are told about it."""
    pending = pending_path(path)
    pending.unlink(missing_ok=True)
    _write_new(pending, key)


def install_pending(path: Path) -> NodeKey:
    """Make the pending key the key file's, atomically, and overwrite the old key's bytes on disk: after this
    the old private key exists nowhere on this node (the device is switched next)."""
    pending = pending_path(path)
    key = _load(pending)
    if not path.exists():  # an identity that never had a file (tests' simulated nodes)
        os.rename(pending, path)
        return key
    with open(path, "r+b") as old:  # the old inode, still open once the rename has unlinked it
        size = os.fstat(old.fileno()).st_size
        os.rename(pending, path)
        _fsync_directory(path.parent)
        old.write(b"\0" * size)
        old.flush()
        os.fsync(old.fileno())
    return key


def discard_pending(path: Path) -> bool:
    """At start: a rotation that stopped before installing its key is abandoned (the old key is still in use
    everywhere); whether there was one."""
    pending = pending_path(path)
    if not pending.exists():
        return False
    pending.unlink()
    return True


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
