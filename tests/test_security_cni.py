"""The CNI config is tenant input: a NetworkAttachmentDefinition author attacks (real
kernel, our CNI executable run as a runtime runs it, Debian's host-local)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_server.client import Client, HandshakeError, fetch_map_fd
from plugin import cni as cni_plugin
from tests.cni_runner import Outcome
from tests.k8s_env import RESOURCE, healthy
from tests.kernel import setpriv
from tests.test_cni import Env, env, ipam_leases  # noqa: F401 - the fixture

pytestmark = pytest.mark.kernel


def test_a_nad_naming_another_pods_device_cannot_move_it(env: Env) -> None:  # noqa: F811
    env.admit(["p0"], "pod-a")
    env.admit(["p1"], "pod-b")
    # pod-a's NAD names p1, which kubelet allocated to pod-b.
    res = env.cni("ADD", dict(env.conf, deviceID="p1"), netns=str(env.pod.path),
                  pod=("default", "pod-a"))
    assert res.code == 1 and res.out["code"] == 109, res.out
    assert res.out["msg"] == "device 'p1' is not allocated to pod default/pod-a"
    assert "kubelet lists it for pod default/pod-b" in res.out["details"]
    assert "p1" in env.links(env.k8s.ns) and "p1" not in env.links(env.pod)
    assert ipam_leases(env.k8s.work) == []  # the address went back


def test_a_pod_that_may_not_have_the_device_learns_nothing_about_its_netns(
        env: Env) -> None:  # noqa: F811
    """Who owns the device is asked while the pod's netns is looked into: whatever
    the look found, a pod that may not have the device is told only that."""
    env.admit(["p0"], "pod-a")
    env.admit(["p1"], "pod-b")
    env.pod.veth("net1", "peer1")  # the name ADD would give is taken in pod-a's netns
    res = env.cni("ADD", dict(env.conf, deviceID="p1"), netns=str(env.pod.path),
                  pod=("default", "pod-a"))
    assert res.code == 1 and res.out["code"] == 109, res.out
    assert "p1" in env.links(env.k8s.ns)
    res = env.cni("ADD", dict(env.conf, deviceID="p0"), netns=str(env.pod.path),
                  pod=("default", "pod-a"))
    assert res.code == 1 and res.out["code"] == 103, res.out  # its own device: the name
    assert "p0" in env.links(env.k8s.ns)


def test_a_pod_cannot_have_a_link_of_its_own_sent_to_the_node_by_del(
        env: Env) -> None:  # noqa: F811
    """A pod that may change its links (NET_ADMIN) renames our device and gives a
    veth of its own our name.  DEL must not move that veth to the node (where it
    would come up with its other end in the pod): it is left alone, and so is ours,
    still recorded in the pod for the next DEL."""
    env.admit(["p0"])
    assert env.add().code == 0
    pod = env.pod.name
    run_ip = ["ip", "-n", pod, "link"]
    subprocess.run([*run_ip, "set", "net1", "name", "ours0"], check=True)
    subprocess.run([*run_ip, "add", "net1", "type", "veth", "peer", "name", "evil1"], check=True)
    res = env.cni("DEL", env.conf, netns=str(env.pod.path))
    assert res.code == 0 and "event=del_daemon_skipped code=105" in res.stderr, res.stderr
    assert {"net1", "evil1", "ours0"} <= env.links(env.pod)
    assert not {"net1", "p0"} & env.links(env.k8s.ns)
    # The pod puts things back: the next DEL brings ours home.
    subprocess.run([*run_ip, "del", "net1"], check=True)
    subprocess.run([*run_ip, "set", "ours0", "name", "net1"], check=True)
    assert env.cni("DEL", env.conf, netns=str(env.pod.path)).code == 0
    assert "p0" in env.links(env.k8s.ns) and not {"net1", "ours0"} & env.links(env.pod)


def test_a_config_device_id_may_not_contradict_the_runtimes(env: Env) -> None:  # noqa: F811
    """The runtime passes the device plugin's choice as a capability arg (Multus'
    ``deviceID``), which reaches a plugin that declares it as runtimeConfig."""
    env.admit(["p0"], "pod-a")
    conf = dict(env.conf, deviceID="p1", capabilities={"deviceID": True})
    res = env.cni("ADD", conf, netns=str(env.pod.path), runtime={"deviceID": "p0"})
    assert res.code == 1 and res.out["code"] == 7, res.out
    assert "contradicts runtimeConfig.deviceID 'p0'" in res.out["msg"]
    # The runtime's alone is enough.
    conf = dict(env.conf, capabilities={"deviceID": True})
    del conf["deviceID"]
    assert env.cni("ADD", conf, netns=str(env.pod.path), runtime={"deviceID": "p0"}).code == 0


def test_an_add_without_the_pod_in_cni_args_is_refused(env: Env) -> None:  # noqa: F811
    env.admit(["p0"], "pod-a")
    res = env.cni("ADD", env.conf, netns=str(env.pod.path), env={"CNI_ARGS": "IgnoreUnknown=1"})
    assert res.out["code"] == 109 and "CNI_ARGS names no pod" in res.out["msg"], res.out
    assert "p0" in env.links(env.k8s.ns)


@contextlib.contextmanager
def log_dir() -> Iterator[Path]:
    """The installation's log directory; removed afterwards if the test made it."""
    d = Path(cni_plugin.LOG_DIR)
    existed = d.exists()
    try:
        yield d
    finally:
        for p in d.glob("afxdp-test*"):
            p.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                d.rmdir()


def test_log_file_only_in_the_installations_directory_and_never_through_a_symlink(
        env: Env, tmp_path: Path) -> None:  # noqa: F811
    env.admit(["p0"], "pod-a")
    victim = tmp_path / "crontab"
    victim.write_text("root-only\n")
    res = env.cni("ADD", dict(env.conf, logFile=str(victim)), netns=str(env.pod.path))
    assert res.out["code"] == 7 and "must be a file name in /var/log/afxdp" in res.out["msg"]
    assert victim.read_text() == "root-only\n"
    with log_dir() as d:
        link = d / "afxdp-test-link.log"
        d.mkdir(mode=0o750, exist_ok=True)
        link.symlink_to(victim)
        res = env.cni("ADD", dict(env.conf, logFile=link.name), netns=str(env.pod.path))
        assert res.out["code"] == 7 and "cannot open logFile" in res.out["msg"], res.out
        assert victim.read_text() == "root-only\n"
        # A plain name works, and what the NAD puts in it cannot forge a line.
        forged = "p9\n* * * * * root /tmp/x"
        conf = {k: v for k, v in env.conf.items() if k != "ipam"}
        res = env.cni("ADD", dict(conf, logFile="afxdp-test.log", deviceID=forged),
                      netns=str(env.pod.path))
        assert res.out["code"] == 101, res.out  # not allocated, and logged as such
        lines = (d / "afxdp-test.log").read_text().splitlines()
        assert lines and all(line.startswith("ts=") for line in lines), lines
        assert any(r"* * * * * root /tmp/x" in line and r"\n" in line for line in lines), lines


def test_a_daemon_socket_served_by_someone_else_gets_no_netns(env: Env) -> None:  # noqa: F811
    env.admit(["p0"], "pod-a")
    d = env.k8s.work / "out" / "evil"  # out/ is 1777: the attacker's uid can reach it
    d.mkdir()
    d.chmod(0o777)
    path = d / "cni.sock"
    got: list[str] = []
    server = subprocess.Popen([*setpriv(), "/usr/bin/python3", "-c", _FAKE_DAEMON, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        res = env.cni("ADD", dict(env.conf, daemonSocket=str(path)), netns=str(env.pod.path))
        server.kill()
        out, _ = server.communicate()
        got = out.split()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert res.out["code"] == 110 and "runs as uid 65534, not root" in res.out["msg"], res.out
    assert got == ["0:0"], f"the fake daemon received something: {got}"  # only the EOF


_FAKE_DAEMON = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1]); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    data, anc, _, _ = c.recvmsg(65536, 64)
    print(f"{len(data)}:{len(anc)}", flush=True)
    c.send(b'{"ok": true, "result": {"interface": {"name": "x", "mac": "00:00:00:00:00:00"}}}')
"""


def test_a_netns_path_that_is_a_fifo_fails_at_once(env: Env, tmp_path: Path) -> None:  # noqa: F811
    env.admit(["p0"], "pod-a")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done: list[Outcome] = []
    t = threading.Thread(target=lambda: done.append(env.cni("ADD", env.conf, netns=str(fifo))))
    t.start()
    t.join(20)
    if t.is_alive():  # unblock a hung plugin before failing
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("the plugin hung on a FIFO as CNI_NETNS")
    [res] = done
    assert res.out["code"] == 4 and "is not a network namespace" in res.out["msg"], res.out
    assert ipam_leases(env.k8s.work) == []
    assert "p0" in env.links(env.k8s.ns)


def test_the_plugin_passes_the_pods_identity_it_got_from_the_runtime() -> None:
    env_ = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0;"
                        "K8S_POD_INFRA_CONTAINER_ID=abc"}
    assert cni_plugin.pod_from_args(env_) == {"namespace": "ns1", "name": "web-0"}
    assert cni_plugin.pod_from_args({}) == {"namespace": "", "name": ""}


@pytest.fixture
def env_cni_pool(env: Env) -> Env:  # noqa: F811
    """The same environment with pool1 marked moveWithCni and pinning its maps."""
    cfg = json.loads(env.k8s.config.read_text())
    cfg["pools"][0].update(moveWithCni=True, pinMap="both")
    env.k8s.config.write_text(json.dumps(cfg))
    env.k8s.daemons[-1].stop()
    env.k8s.start()
    env.k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    return env


def test_nothing_is_handed_out_before_cni_add_puts_the_netdev_in_its_pod(
        env_cni_pool: Env) -> None:
    e = env_cni_pool
    resp = e.admit(["p0"], "pod-a")
    sock = Path(resp.container_responses[0].mounts[0].host_path) / "afxdp.sock"
    pin = Path(resp.container_responses[0].mounts[1].host_path)
    # A host process with the pool's uid that knows the pod's name, before ADD:
    with e.k8s.ns.entered(), Client(sock) as c:
        c.connect("pod-a")
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("p0")
    assert not pin.exists()  # nothing to bpf_obj_get either
    # (the handshake line is written once the server has seen the connection close)
    e.k8s.wait(lambda: "waiting_for_CNI_ADD" in e.k8s.daemons[-1].log(),
               what="the refusal logged with its reason")
    # After ADD, the pod (in its netns) gets it, and the pin is where it looks.
    assert e.add().code == 0
    with e.pod.entered():
        fetch_map_fd(sock, "p0", hostname="pod-a").close()
    assert pin.exists()
    # After DEL the netdev is home again: nothing for anyone until the next ADD.
    assert e.cni("DEL", e.conf, netns=str(e.pod.path)).code == 0
    assert not pin.exists()
    with e.k8s.ns.entered(), Client(sock) as c:
        c.connect("pod-a")
        with pytest.raises(HandshakeError, match="/fd_nak"):
            c.xsk_map_fd("p0")
