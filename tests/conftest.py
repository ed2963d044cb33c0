"""Shared fixtures.  Real-kernel tests are marked ``kernel`` and skip without root."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def netns() -> Iterator[NsFixture]:
    with make_netns() as ns:
        yield ns


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
        shutil.rmtree(d, ignore_errors=True)


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

    def start(*args: str, wait: bool = True) -> Daemon:
        d = Daemon(netns, workdir, *args, wait=False)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()
