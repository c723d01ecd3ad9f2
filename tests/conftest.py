"""Fixtures shared by every test: real etcd processes, unique key prefixes, in-process and subprocess agents."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import AgentProcess
from warren_mesh import pki
from warren_mesh.lab.etcd_server import EtcdServer
from warren_mesh.store import runtime

# Before any test imports gRPC (directly, or through a store or etcd3): the process-wide settings it reads once.
runtime.prepare()

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the session, as users run it: TLS, client certificates, and etcd's auth with the mesh's roles
    (each agent a node certificate whose role may write only its own keys, under its test's prefix). Tests keep
    apart by prefix. Tests that stop, pause or compact etcd use `etcd`, a plain one of their own."""
    directory = tmp_path_factory.mktemp("pki")
    pki.init(directory, ["127.0.0.1"])
    with EtcdServer(pki=directory) as server:
        server.enable_auth()
        yield server


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, to restart, pause or compact at will."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"/test/{os.getpid()}-{next(_prefixes)}"


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(
        etcd: EtcdServer, prefix: str, name: str, *, port: int, ttl: int = 3, extra: tuple[str, ...] = ()
    ) -> AgentProcess:
        """Agent ``name`` of ``etcd``; with its own node certificate and role where etcd has auth on."""
        stem = "admin"
        if etcd.pki is not None:
            etcd.authorize_node(name, prefix=prefix)
            stem = pki.node_user(name)
        args = [
            "agent",
            "--backend=memory",
            *etcd.client_flags(stem),
            f"--prefix={prefix}",
            f"--node-name={name}",
            f"--endpoint=192.0.2.1:{port}",
            f"--key-file={tmp_path / (name + '.key')}",
            f"--lease-ttl={ttl}",
            "--metrics-address=",
            *extra,
        ]
        proc = AgentProcess(args, tmp_path / f"{name}.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


# Property-based tests: a bounded run in CI, a long one on request (HYPOTHESIS_PROFILE=long; see docs/security.md).
# CI's examples are the same on every run (derandomize), so a run is red only for a change of ours; the long run
# keeps exploring at random and is where new cases are found.
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("long", max_examples=50_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
