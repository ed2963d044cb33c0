"""The state file is input like any other: a record the configuration could not
have produced is refused, nothing of it is created, chowned or attached, and a
restore that fails says why and leaves no program behind (Kubernetes mode, real
kernel)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_env import RESOURCE, K8s, healthy

pytestmark = pytest.mark.kernel


def state_path(k8s: K8s) -> Path:
    return k8s.work / "state" / "state.json"


def write_records(k8s: K8s, records: list[dict[str, Any]]) -> None:
    path = state_path(k8s)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "allocations": records}))


def record(k8s: K8s, **over: Any) -> dict[str, Any]:
    alloc_id = "pool1-0123456789ab"
    doc = {"id": alloc_id, "netdevs": ["p0"], "hostnames": ["pod-a"],
           "socket_base": str(k8s.work / "sockets" / alloc_id), "own_socket_base": True,
           "pool": "pool1", "uid": 65534, "gid": 65534, "mode": 0o660}
    doc.update(over)
    return doc


def allocate_then_stop(k8s: K8s) -> tuple[str, Path]:
    """An allocation of p0 by a daemon that then stops (SIGTERM keeps state and program)."""
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    mount = k8s.kubelet.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    [alloc] = k8s.allocations()
    assert d.stop() == 0
    return alloc["id"], Path(mount.host_path)


@pytest.mark.parametrize(("field", "value", "why"), [
    ("socket_base", "VICTIM", "socket_base: '{victim}' is not {work}/sockets/pool1-0123456789ab"),
    ("netdevs", ["../../etc"], "netdevs[0]: '../../etc' is not a valid interface name"),
    ("pool", "other", "pool: 'other' is not a pool of this configuration"),
    ("id", "../../victim", "id: '../../victim' is not an allocation id of pool pool1"),
    ("uid", "0", "uid: '0' is not an integer"),
])
def test_a_record_the_configuration_could_not_produce_is_refused_and_nothing_is_touched(
        k8s: K8s, field: str, value: Any, why: str) -> None:
    victim = k8s.work / "victim"
    victim.mkdir(mode=0o700)
    write_records(k8s, [record(k8s, **{field: str(victim) if value == "VICTIM" else value})])
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    expected = why.format(victim=victim, work=k8s.work)
    assert "event=restore_refused record=0" in d.log() and expected in d.log(), d.log()
    st = os.lstat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), list(victim.iterdir())) == (0, 0o700, [])
    assert k8s.ns.xdp_prog_id("p0") == 0
    assert k8s.allocations() == []
    [aside] = state_path(k8s).parent.glob("state.json.refused-*")
    assert json.loads(aside.read_text())["allocations"][0][field] == (
        str(victim) if value == "VICTIM" else value)


def test_a_netns_path_no_runtime_gives_is_refused(k8s: K8s) -> None:
    write_records(k8s, [record(k8s, attached={"p0": {"netns": "/etc/passwd", "ifname": "net1",
                                                      "container_id": "c1"}})])
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    assert "attached.p0.netns: '/etc/passwd' is not a network namespace path" in d.log()
    assert k8s.ns.xdp_prog_id("p0") == 0


def test_access_comes_from_the_configuration_not_from_the_state_file(k8s: K8s) -> None:
    alloc_id, sock_dir = allocate_then_stop(k8s)
    doc = json.loads(state_path(k8s).read_text())
    doc["allocations"][0].update(uid=0, gid=0, mode=0o666)  # tampered
    state_path(k8s).write_text(json.dumps(doc))
    k8s.start()
    k8s.wait(lambda: [a["id"] for a in k8s.allocations()] == [alloc_id], what="the restore")
    st = os.stat(sock_dir / "afxdp.sock")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)


def test_a_restore_that_fails_says_why_and_leaves_no_program_attached(k8s: K8s) -> None:
    alloc_id, sock_dir = allocate_then_stop(k8s)
    assert k8s.ns.xdp_prog_id("p0") != 0  # kept for the pod over the stop
    (sock_dir / "afxdp.sock").unlink(missing_ok=True)  # removed at the stop, or not
    (sock_dir / "afxdp.sock").write_text("not a socket")
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    assert f"event=restore_failed id={alloc_id}" in d.log(), d.log()
    assert "exists and is not a socket" in d.log()
    assert "undo_failed" not in d.log()
    assert k8s.ns.xdp_prog_id("p0") == 0
    assert k8s.allocations() == []


def test_a_state_file_with_an_unknown_field_is_refused_by_name(k8s: K8s) -> None:
    write_records(k8s, [record(k8s, evil=True)])
    d = k8s.start()
    k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0"))
    assert "allocations[0].evil: unknown field" in d.log(), d.log()


def test_a_state_from_a_newer_release_stops_the_daemon_and_is_kept(k8s: K8s) -> None:
    """A downgrade: this daemon would drop what it does not understand, so it stops,
    says why and changes nothing."""
    path = state_path(k8s)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    text = json.dumps({"version": 99, "allocations": [record(k8s)]})
    path.write_text(text)
    d = k8s.start(wait=False)
    assert d.proc.wait(15) == 1
    assert "was written by a newer afxdp (state version 99" in d.log(), d.log()
    assert path.read_text() == text
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
