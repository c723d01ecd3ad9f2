"""Fixtures shared by every test: real etcd processes, unique key prefixes, in-process and subprocess agents."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import AgentProcess
from warren_mesh.identity import pki
from warren_mesh.store import runtime
from warren_mesh.testkit.etcd_server import EtcdServer, EtcdServerError, find_etcd
from warren_mesh.wireguard.choice import kernel_wireguard_available

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


# --- A run that cannot be green by accident -------------------------------------------------------------------
# Every skip is a part of the product that was not tested. A full run fails on any skip (its last line says which
# and why); `--allow-skips` accepts them, for a developer's partial run. Tests of kernel WireGuard on the host
# (marked kernel_wireguard) are deselected, not skipped, where the host's kernel has no WireGuard: the QEMU VM of
# test_kernel_vm.py runs exactly those (-k kernel), and that test fails if it cannot.


def pytest_report_header(config: pytest.Config) -> str:
    """Which etcd this run tests against (hack/test runs the store tests twice: Debian 12's 3.4, Debian 13's 3.5)."""
    try:
        binary = find_etcd()
    except EtcdServerError as exc:
        return f"etcd: {exc}"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return f"etcd: {binary}: {out.splitlines()[0] if out else 'no version'}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-skips",
        action="store_true",
        help="exit 0 even if tests were skipped (a partial run; CI and ./hack/test never pass it)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel = [item for item in items if item.get_closest_marker("kernel_wireguard") is not None]
    if not kernel:
        return
    available, why = kernel_wireguard_available() if os.geteuid() == 0 else (False, "not root")
    if available:
        return
    config.hook.pytest_deselected(items=kernel)
    items[:] = [item for item in items if item.get_closest_marker("kernel_wireguard") is None]
    _notes.append(f"{len(kernel)} kernel WireGuard tests deselected on this host ({why}); the QEMU VM runs them")


_notes: list[str] = []
_skipped: list[str] = []
_tier_seconds: dict[str, float] = {}  # tests/<tier>/...: setup, call and teardown, for the run's summary


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    parts = report.nodeid.split("/")
    tier = parts[1] if len(parts) > 2 else parts[0]
    _tier_seconds[tier] = _tier_seconds.get(tier, 0.0) + report.duration
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and not session.config.getoption("--allow-skips") and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's own summary, so that the run's last line says what it did not test."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if _tier_seconds:
        tiers = ", ".join(f"{tier} {seconds:.0f} s" for tier, seconds in sorted(_tier_seconds.items()))
        reporter.write_line(f"time per tier: {tiers}")
    for note in _notes:
        reporter.write_line(note)
    if _skipped:
        first = "; ".join(_skipped[:3]) + (f"; and {len(_skipped) - 3} more" if len(_skipped) > 3 else "")
        verdict = (
            "accepted (--allow-skips)" if config.getoption("--allow-skips") else "FAILED: a full run skips nothing"
        )
        reporter.write_line(f"{verdict}: {len(_skipped)} skipped (not tested): {first}")


# Property-based tests: a bounded run in CI, a long one on request (HYPOTHESIS_PROFILE=long; see docs/security.md).
# CI's examples are the same on every run (derandomize), so a run is red only for a change of ours; the long run
# keeps exploring at random and is where new cases are found.
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("long", max_examples=50_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
