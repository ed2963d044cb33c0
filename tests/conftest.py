"""Shared fixtures.  Real-kernel tests are marked ``kernel`` and skip without root."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bpf import bpffs
from tests.cni_runner import CNI_PATH, Runner, install_plugin
from tests.k8s_env import k8s  # noqa: F401 - the Kubernetes-mode fixture, for every module
from tests.kernel import ClientRuntime, Daemon, NsFixture, make_netns

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root: creates netns/veth, loads and attaches XDP programs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def neighbour() -> Iterator[None]:
    """Another copy of the product, serving on this host for the whole run.

    Developer and CI machines may run the product too, so the suite must judge
    only what each test created.  This daemon serves a netdev named like the
    tests' own (``va``, in its own netns) with a pinned map under /sys/fs/bpf;
    a test that counts host-wide, or that touches what it did not create, fails
    or breaks it, and the check at the end of the run says so.
    """
    if not IS_ROOT or os.environ.get("AFXDP_TEST_NEIGHBOUR", "1") == "0":
        yield
        return
    import socket

    from cni_server.client import fetch_map_fd

    host = socket.gethostname()
    with make_netns() as ns, tempfile.TemporaryDirectory(prefix="afxdp-neighbour-") as tmp:
        ns.veth("va", "vb")
        pins = Path(f"/sys/fs/bpf/afxdp-neighbour-{os.getpid()}")
        d = Daemon(ns, Path(tmp), "--netdev", "va", "--socket-dir", f"{tmp}/sock",
                   "--pin-dir", str(pins), "--allow-host", host)
        prog = ns.xdp_prog_id("va")
        try:
            yield
        finally:
            problems = []
            if d.proc.poll() is not None:
                problems.append(f"it exited with {d.proc.returncode}")
            elif ns.xdp_prog_id("va") != prog:
                problems.append(f"its program {prog} was replaced by {ns.xdp_prog_id('va')}")
            else:
                try:
                    with ns.entered():
                        fetch_map_fd(Path(tmp) / "sock" / "va" / "afxdp.sock", "va",
                                     hostname=host).close()
                except Exception as e:
                    problems.append(f"its handshake failed: {e}")
            if not (pins / "va" / "xsks_map").exists():
                problems.append(f"its pin {pins}/va/xsks_map is gone")
            d.stop()
            assert not problems, ("the suite disturbed another afxdp daemon on this host: "
                                  + "; ".join(problems) + f"\n{d.log()}")


@pytest.fixture
def netns() -> Iterator[NsFixture]:
    with make_netns() as ns:
        yield ns


def mounts_under(d: Path) -> list[Path]:
    """Mount points at or below ``d`` in our mount namespace, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [Path(line.split()[4].replace("\\040", " ")) for line in f]
    return sorted((m for m in points if m == d or d in m.parents),
                  key=lambda m: len(m.parts), reverse=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is 0700 under /tmp/pytest-of-root)."""
    d = Path(tempfile.mkdtemp(prefix="afxdp-test-", dir="/tmp"))
    d.chmod(0o755)
    (d / "out").mkdir(mode=0o777)
    (d / "out").chmod(0o1777)
    try:
        yield d
    finally:
        # A Kubernetes-mode daemon mounts a bpffs at its bpffsRoot and leaves it
        # mounted (pods' pins live there): take down whatever is mounted in here.
        for mount in mounts_under(d):
            bpffs.unmount(mount)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cni_runner() -> Iterator[Runner]:
    """A runtime's view of CNI: our executable installed by ``afxdp install-cni`` in
    a CNI_PATH directory, ahead of Debian's plugins, found by ``type`` (libcni's rules:
    tests/cni_runner.py).  Each test gets its own runner (``cni``): its own result cache."""
    d = Path(tempfile.mkdtemp(prefix="afxdp-cni-bin-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield Runner([install_plugin(d), Path(CNI_PATH)])
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cni(cni_runner: Runner) -> Runner:
    return Runner(list(cni_runner.path))


@pytest.fixture(scope="session")
def client_runtime() -> Iterator[ClientRuntime]:
    rt = ClientRuntime()
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def start_daemon(netns: NsFixture, workdir: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, wait: bool = True, **kw: Any) -> Daemon:
        d = Daemon(netns, workdir, *args, wait=False, **kw)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()
