"""The daemon as the DaemonSet runs it: root, but only the manifest's capabilities.

Every test here reads the capability list from ``deploy/base/daemonset.yaml`` and
starts the daemon with exactly that set (``setpriv``: bounding set, no inheritable
capabilities, no_new_privs), a read-only root with writable mounts only where the
DaemonSet has volumes, and a container runtime's RLIMIT_MEMLOCK (64 KiB).  Then it
does what a node does with it: standalone handouts in all three client modes, and
Kubernetes Allocate, CNI ADD, a pod's handshake and frames, CNI DEL.

The second half drops one capability at a time and shows what fails without it, by
name, so the manifest can list nothing it does not use.

With ``AFXDP_TEST_IMAGE`` set (``make image-test`` does), the daemon runs from that
image under podman instead, as the DaemonSet runs it: the same capabilities,
``--read-only``, no_new_privs, the runtime's default seccomp profile, its own pid
namespace (no hostPID), the node's network namespace, and the DaemonSet's volumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.cni_runner import Runner
from tests.k8s_env import RESOURCE, K8s, cni_node, healthy
from tests.kernel import (
    ROOT,
    ClientRuntime,
    Daemon,
    NsFixture,
    run,
    setpriv,
    unique,
    wait_for,
)

pytestmark = pytest.mark.kernel

MEMLOCK = 64 * 1024  # what container runtimes have long given a container
BPFFS = Path("/sys/fs/bpf")


def manifest_caps() -> list[str]:
    doc = yaml.safe_load((ROOT / "deploy/base/daemonset.yaml").read_text())
    [c] = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "afxdp"]
    caps: list[str] = c["securityContext"]["capabilities"]["add"]
    return caps


IMAGE = os.environ.get("AFXDP_TEST_IMAGE", "")
# The runtime's default seccomp profile refuses bpf() without CAP_SYS_ADMIN (podman's
# here does; newer profiles also allow it with CAP_BPF).
SECCOMP_BPF_NEEDS_SYS_ADMIN = os.environ.get("AFXDP_TEST_SECCOMP_BPF", "sys_admin") == "sys_admin"


def as_daemonset(caps: list[str], writable: list[Path]) -> tuple[str, ...]:
    """Command prefix that runs ``afxdp`` as the DaemonSet would (see the module
    docstring); ``program()`` is what follows it."""
    return in_image(caps, writable) if IMAGE else as_root_with(caps, writable)


def program() -> tuple[str, ...] | None:
    return () if IMAGE else None  # the image's entrypoint is afxdp


def in_image(caps: list[str], writable: list[Path]) -> tuple[str, ...]:
    mounts = [f"{p}:{p}" for p in writable]
    mounts += ["/sys/fs/bpf:/sys/fs/bpf:rslave", "/run/netns:/run/netns:rslave"]
    return ("podman", "--runtime", "runc", "run", "--rm", "--network", "host",
            "--cap-drop", "ALL", *[a for c in caps for a in ("--cap-add", c)],
            "--read-only", "--security-opt", "no-new-privileges",
            "--security-opt", "apparmor=unconfined",
            "--ulimit", f"memlock={MEMLOCK}:{MEMLOCK}",
            # (this host's hard limits are lower than podman's defaults)
            "--ulimit", "nofile=8192:8192", "--ulimit", "nproc=4096:4096",
            *[a for m in mounts for a in ("-v", m)], "--entrypoint", "afxdp", IMAGE)


def as_root_with(caps: list[str], writable: list[Path]) -> tuple[str, ...]:
    """Command prefix: a mount namespace whose root is read-only but for ``writable``
    (bind-mounted over themselves, as the DaemonSet's volumes are), a 64 KiB
    RLIMIT_MEMLOCK, then uid 0 with only ``caps``."""
    binds = "".join(f'mount --bind "{p}" "{p}" && ' for p in writable)
    keep = ",".join(f"+{c.lower()}" for c in caps)
    bounding = f"-all,{keep}" if keep else "-all"
    return ("unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", binds + 'mount -o remount,bind,ro / && exec "$@"', "sh",
            "prlimit", f"--memlock={MEMLOCK}:{MEMLOCK}", "--",
            "setpriv", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}",
            "--no-new-privs", "--")


@pytest.fixture
def host_dirs() -> Iterator[dict[str, Path]]:
    """The host directories the DaemonSet mounts that live outside a test's workdir:
    the run directory and a bpffs directory of its own on the host's bpffs."""
    from cni_server.ownership import run_dir
    run_dir().mkdir(parents=True, exist_ok=True)
    pins = BPFFS / unique("afxdp-cap")
    try:
        yield {"run": run_dir(), "pins": pins}
    finally:
        shutil.rmtree(pins, ignore_errors=True)


def receive_in(ns: NsFixture, rt: ClientRuntime, workdir: Path, socket: Path, netdev: str,
               peer: str, mode: str, *, sender_ns: NsFixture | None = None,
               hostname: str | None = None, timeout: float = 15
               ) -> subprocess.CompletedProcess[str]:
    """An unprivileged client (uid 65534) in ``ns`` receiving 1000 frames through the
    handout in ``mode``, sent on ``peer`` from ``sender_ns`` (default: ``ns``)."""
    sender = sender_ns or ns
    caps = ("net_raw", "ipc_lock") if mode in ("map", "xsk-unbound") else ()
    ready = workdir / "out" / f"ready-{unique('r')}"
    host = ["--hostname", hostname] if hostname else []
    proc = subprocess.Popen(
        ns.cmd(*setpriv(*caps), *rt.argv(
            "receive", "--socket", str(socket), "--netdev", netdev, "--mode", mode, *host,
            "--frames", "4096", "--count", "1000", "--timeout", str(timeout), "--json",
            "--ready-file", str(ready))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rt.env(), cwd=rt.dir)
    try:
        try:
            wait_for(ready, timeout + 5, proc)
        except RuntimeError as e:  # the receiver gave up: that is the result
            return subprocess.CompletedProcess(proc.args, 1, "", str(e))
        run(*sender.cmd(sys.executable, "-m", "cni_server.cli", "send", "--netdev", peer,
                        "--count", "1000"))
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def received(res: subprocess.CompletedProcess[str]) -> int:
    assert res.returncode == 0, res.stderr
    got: int = json.loads(res.stdout)["received"]
    return got


# -- standalone ---------------------------------------------------------------------------------


@pytest.fixture
def standalone(netns: NsFixture, workdir: Path, host_dirs: dict[str, Path],
               start_daemon: Callable[..., Daemon]) -> Callable[[list[str]], Daemon]:
    """Starts ``afxdp serve`` on va as the DaemonSet would, with the given capabilities."""
    netns.veth("va", "vb")

    def start(caps: list[str]) -> Daemon:
        return start_daemon(
            "--netdev", "va", "--socket-dir", str(workdir / "sock"), "--socket-owner",
            "65534:65534", "--allow-unbound-xsk", "--pin-dir", str(host_dirs["pins"]),
            wait=False, wrap=as_daemonset(caps, [workdir, host_dirs["run"]]), program=program())

    return start


@pytest.mark.parametrize("mode", ["map", "xsk", "xsk-unbound"])
def test_standalone_serves_every_client_mode_with_the_manifests_capabilities(
        standalone: Any, netns: NsFixture, workdir: Path, client_runtime: ClientRuntime,
        mode: str) -> None:
    d = standalone(manifest_caps())
    d.wait_ready()
    assert received(standalone_client(netns, client_runtime, workdir, mode)) == 1000
    assert (workdir / "sock" / "va" / "afxdp.sock").stat().st_uid == 65534


def standalone_client(ns: NsFixture, rt: ClientRuntime, workdir: Path, mode: str,
                      timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return receive_in(ns, rt, workdir, workdir / "sock" / "va" / "afxdp.sock", "va", "vb", mode,
                      timeout=timeout)


# -- Kubernetes ---------------------------------------------------------------------------------


class Node:
    """A Kubernetes node: the daemon's (host) netns with p0/p1, a fake kubelet, a pod netns
    and the CNI executable run as a runtime runs it."""

    def __init__(self, k8s: K8s, pod: NsFixture, writable: list[Path], cni: Runner) -> None:
        self.k8s, self.pod, self.writable, self.cni = k8s, pod, writable, cni
        self.conf = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp",
                     "deviceID": "p0", "daemonSocket": str(k8s.work / "cni.sock"),
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.56.0.0/24"}]],
                              "dataDir": str(k8s.work / "ipam")}}

    def start(self, caps: list[str]) -> Daemon:
        d = self.k8s.start(wait=False, wrap=as_daemonset(caps, self.writable),
                           program=program())
        d.wait_ready()
        self.k8s.kubelet.wait_devices(RESOURCE, lambda devs: healthy(devs, "p0", "p1"))
        return d

    def admit(self) -> Path:
        """Allocate p0 for pod-a (as kubelet does before CNI ADD); its socket path."""
        resp = self.k8s.kubelet.allocate(RESOURCE, ["p0"])
        self.k8s.kubelet.add_pod("default", "pod-a", RESOURCE, ["p0"])
        return Path(resp.container_responses[0].mounts[0].host_path) / "afxdp.sock"

    def client(self, rt: ClientRuntime, socket: Path, mode: str
               ) -> subprocess.CompletedProcess[str]:
        # in the pod, p0 is CNI_IFNAME: net1
        return receive_in(self.pod, rt, self.k8s.work, socket, "net1", "q0", mode,
                          sender_ns=self.k8s.ns, hostname="pod-a")


@pytest.fixture
def node(netns: NsFixture, workdir: Path, host_dirs: dict[str, Path], cni: Runner
         ) -> Iterator[Node]:
    # bpffsRoot on the host's bpffs, as deployed
    with cni_node(netns, workdir, bpffsRoot=str(host_dirs["pins"])) as (k8s, pod):
        yield Node(k8s, pod, [workdir, host_dirs["run"]], cni)


def test_kubernetes_mode_allocates_moves_and_serves_with_the_manifests_capabilities(
        node: Node, client_runtime: ClientRuntime) -> None:
    d = node.start(manifest_caps())
    sock = node.admit()
    assert sock.stat().st_uid == 65534
    add = node.cni("ADD", node.conf, netns=str(node.pod.path))
    assert add.code == 0, add.out
    # Its warm programs too: a netns of its own, placeholders, attaches there.
    node.k8s.wait(lambda: "event=xdp_warmed" in d.log(), what="a program warmed")
    node.k8s.kubelet.allocate(RESOURCE, ["p1"])
    assert re.search(r"event=xdp_attached netdev=p1 .* warm=yes", d.log())
    assert "xdp_warm_off" not in d.log() and "xdp_warm_failed" not in d.log()
    for mode in ("map", "xsk"):
        assert received(node.client(client_runtime, sock, mode)) == 1000, mode
    assert node.cni("DEL", node.conf, netns=str(node.pod.path)).code == 0
    links = {i["ifname"] for i in json.loads(run("ip", "-n", node.k8s.ns.name, "-j",
                                                   "link").stdout)}
    assert "p0" in links


# -- each capability, dropped ---------------------------------------------------------------------


def without(cap: str) -> list[str]:
    return [c for c in manifest_caps() if c != cap]


def standalone_refuses(standalone: Any, netns: NsFixture, workdir: Path, rt: ClientRuntime,
                       cap: str, mode: str) -> str:
    """The daemon starts, a client in ``mode`` gets nothing; the daemon's log."""
    d = standalone(without(cap))
    d.wait_ready()
    res = standalone_client(netns, rt, workdir, mode, timeout=1)
    assert res.returncode != 0, f"without {cap} a {mode} client still worked"
    out: str = d.log()
    return out


def standalone_does_not_start(standalone: Any, cap: str) -> str:
    d = standalone(without(cap))
    with pytest.raises(RuntimeError, match="daemon exited with 1") as e:
        d.wait_ready()
    return str(e.value)


# What each capability of the manifest is for: the failure a daemon without it shows.
# CAP_BPF is not in the manifest: CAP_SYS_ADMIN, needed anyway, also passes the kernel's
# bpf_capable() check and RuntimeDefault seccomp's rule for bpf(); CAP_FOWNER is not
# either: modes are set while the daemon still owns a file, before handing it over.
NEEDED_FOR = {
    "NET_ADMIN": "attaching XDP program to va in native mode: Operation not permitted",
    "NET_RAW": "creating an AF_XDP socket: Operation not permitted (this process needs "
               "CAP_NET_RAW)",
    "IPC_LOCK": "registering UMEM (RLIMIT_MEMLOCK too low without CAP_IPC_LOCK?): "
                "No buffer space available",
    # the handshake log line (its steps field has spaces escaped)
    "SYS_PTRACE": "=peer_netns_unknown_(PIDFD_GET_NET_NAMESPACE:_Permission_denied_(the_daemon_"
                  "needs_CAP_SYS_PTRACE_to_see_another_user's_namespaces))",
    "CHOWN": "to 65534:65534 with mode 0660: Operation not permitted",
    "SYS_ADMIN": "setns(CLONE_NEWNET) failed: Operation not permitted (the daemon needs "
                 "CAP_SYS_ADMIN to enter it)",
}


@pytest.mark.parametrize("cap", manifest_caps())
def test_each_capability_in_the_manifest_is_needed(
        cap: str, standalone: Any, netns: NsFixture, workdir: Path,
        client_runtime: ClientRuntime, request: pytest.FixtureRequest) -> None:
    assert cap in NEEDED_FOR, f"nothing shows CAP_{cap} is needed: drop it from the manifest"
    if cap in ("NET_ADMIN", "CHOWN"):
        text = standalone_does_not_start(standalone, cap)
    elif cap in ("NET_RAW", "IPC_LOCK"):
        text = standalone_refuses(standalone, netns, workdir, client_runtime, cap, "xsk")
    elif cap == "SYS_PTRACE":
        text = standalone_refuses(standalone, netns, workdir, client_runtime, cap, "map")
    else:
        # Without it, nothing loads a program (no CAP_BPF either); and CAP_BPF in its
        # place is not enough: CNI cannot enter the pod's network namespace.
        assert "Operation not permitted" in standalone_does_not_start(standalone, cap)
        node: Node = request.getfixturevalue("node")
        node.start([*without(cap), "BPF"])
        if IMAGE and SECCOMP_BPF_NEEDS_SYS_ADMIN:
            # Older default seccomp profiles (podman 4's among them) allow bpf()
            # only with CAP_SYS_ADMIN: with CAP_BPF alone, nothing loads.
            with pytest.raises(grpc.RpcError) as e:
                node.admit()
            assert "loading BPF object" in str(e.value)
            assert "Operation not permitted" in str(e.value)
            return
        node.admit()
        res = node.cni("ADD", node.conf, netns=str(node.pod.path))
        assert res.code != 0 and res.out["code"] == 111, res.out
        text = res.out["details"]
        # Nothing is left half done: the device is back home, still allocatable.
        links = {i["ifname"] for i in json.loads(run("ip", "-n", node.k8s.ns.name, "-j",
                                                       "link").stdout)}
        assert "p0" in links
    assert NEEDED_FOR[cap] in text


def test_the_manifest_lists_each_capability_once_with_its_reason() -> None:
    text = (ROOT / "deploy/base/daemonset.yaml").read_text()
    caps = manifest_caps()
    assert len(caps) == len(set(caps)) and set(caps) == set(NEEDED_FOR)
    for cap in caps:
        [line] = [ln for ln in text.splitlines() if ln.strip().startswith(f"- {cap} ")]
        assert "#" in line, f"{cap} has no comment saying what it is for"
