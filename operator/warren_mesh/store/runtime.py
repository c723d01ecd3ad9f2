"""Process-wide settings that gRPC and protobuf read once, when they are first imported. Made explicit here and
applied by the store's connection module before it imports either; tests apply them first too."""

from __future__ import annotations

import os


def prepare() -> None:
    """Set what gRPC and protobuf must know before they are imported (an existing setting is kept)."""
    # etcd3 0.12's generated modules predate protobuf 4, which refuses them unless the pure-Python implementation
    # is selected before protobuf is first imported. pyproject pins protobuf<4; this keeps a newer one working too.
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    # gRPC's fork handlers restart its poller in a forked child; a child about to exec (the agent starting
    # wireguard-go, the lab starting agents) then had that poller hit the descriptors subprocess closes, and about
    # one fork in fifteen died of SIGSEGV before exec while a call was in flight. Nothing of ours uses gRPC across
    # a fork.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
