"""The CNI plugin end to end: the real executable (host python3, stdlib only), the daemon,
Debian's host-local IPAM, network namespaces, and a pod client receiving frames."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_server.client import Client, HandshakeError, fetch_map_fd
from plugin import cni as cni_plugin
from tests.cni_runner import Runner
from tests.k8s_env import RESOURCE, K8s, cni_node, healthy, http_get
from tests.kernel import ROOT, ClientRuntime, NsFixture, make_netns, run, setpriv, wait_for

pytestmark = pytest.mark.kernel
PLUGIN = ROOT / "plugin" / "cni.py"


@dataclass
class Env:
    k8s: K8s
    pod: NsFixture
    cni: Runner
    conf: dict[str, Any]

    def add(self, **kw: Any) -> Any:
        return self.cni("ADD", self.conf, netns=str(self.pod.path), **kw)

    def admit(self, devices: list[str], pod: str = "pod-a") -> Any:
        """What kubelet does for a pod before its CNI ADD: Allocate, then the pod is
        listed by PodResources as holding the devices."""
        resp = self.k8s.kubelet.allocate(RESOURCE, devices)
        self.k8s.kubelet.add_pod("default", pod, RESOURCE, devices)
        return resp

    def addresses(self, ns: NsFixture, dev: str) -> list[str]:
        out = json.loads(run("ip", "-n", ns.name, "-j", "addr", "show", "dev", dev).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"]
                if a.get("scope") == "global"]

    def links(self, ns: NsFixture) -> set[str]:
        return {i["ifname"] for i in json.loads(run("ip", "-n", ns.name, "-j", "link").stdout)}


@pytest.fixture
def env(netns: NsFixture, workdir: Path, cni: Runner) -> Iterator[Env]:
    with cni_node(netns, workdir) as (k8s, pod):
        conf = {"cniVersion": "1.0.0", "name": "afxdp-net", "type": "afxdp", "deviceID": "p0",
                "daemonSocket": str(workdir / "cni.sock"),
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.55.0.0/24"}]],
                         "dataDir": str(workdir / "ipam")}}
        k8s.start()
        k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0", "p1"))
        yield Env(k8s, pod, cni, conf)


def ipam_leases(work: Path) -> list[str]:
    d = work / "ipam" / "afxdp-net"
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []


# -- the executable ------------------------------------------------------------------------------


def test_the_executable_needs_only_the_standard_library_and_python_3_8(cni: Runner) -> None:
    tree = ast.parse(PLUGIN.read_text(), feature_version=(3, 8))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    out = subprocess.run([str(cni.find("afxdp"))], env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"cniVersion": "1.1.0", "supportedVersions": [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def _version(exe: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin"},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0, reason="the plugin's files must be root's")
def test_install_cni_puts_a_launcher_and_the_plugin_whose_bytecode_is_cached(
        tmp_path: Path) -> None:
    res = run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(tmp_path))
    target, lib = tmp_path / "afxdp", tmp_path / "afxdp.d"
    assert "installed" in res.stdout and target.stat().st_mode & 0o777 == 0o755
    assert (lib / "afxdp_cni.py").read_text() == PLUGIN.read_text().split("\n", 1)[1]
    assert {p.name: p.stat().st_mode & 0o777 for p in (lib, lib / "afxdp_cni.py",
                                                       lib / "__pycache__")} == {
        "afxdp.d": 0o755, "afxdp_cni.py": 0o644, "__pycache__": 0o755}
    assert json.loads(_version(target).stdout)["supportedVersions"] == [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    # The first run compiled the plugin once; later runs load that.
    (pyc,) = (lib / "__pycache__").iterdir()
    assert pyc.name.startswith("afxdp_cni.") and pyc.stat().st_mode & 0o022 == 0
    first = pyc.stat().st_mtime_ns
    assert _version(target).returncode == 0 and pyc.stat().st_mtime_ns == first
    # A reinstall (an upgrade) leaves no bytecode of the old plugin behind.
    run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(tmp_path))
    assert list((lib / "__pycache__").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the plugin's files must be root's")
def test_the_installed_plugin_runs_through_symlinks_to_it(tmp_path: Path) -> None:
    """A runtime's CNI_PATH may hold a link to the installed file (relative, or a
    chain of them): the launcher finds afxdp.d beside the file itself."""
    run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(tmp_path / "bin"))
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "afxdp").symlink_to("../bin/afxdp")
    (tmp_path / "chained").mkdir()
    (tmp_path / "chained" / "afxdp").symlink_to(tmp_path / "relative" / "afxdp")
    for link in ("relative", "chained"):
        res = _version(tmp_path / link / "afxdp")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "1.1.0" in json.loads(res.stdout)["supportedVersions"]


def test_the_plugin_reads_its_environment_as_os_environ_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It reads posix.environ (os would cost its start-up 1.5 ms): same text,
    undecodable bytes included."""
    monkeypatch.setitem(os.environb, b"CNI_ARGS", b"K8S_POD_NAME=caf\xe9;IgnoreUnknown=1")
    monkeypatch.setitem(os.environb, b"CNI_IFNAME", b"net1")
    assert cni_plugin.environ() == dict(os.environ)
    assert cni_plugin.environ()["CNI_ARGS"] == "K8S_POD_NAME=caf\udce9;IgnoreUnknown=1"


@pytest.mark.skipif(os.geteuid() != 0, reason="the plugin's files must be root's")
@pytest.mark.parametrize("spoil", ["dir_group_writable", "module_world_writable",
                                   "cache_not_roots", "module_a_symlink", "module_missing"])
def test_the_launcher_runs_no_plugin_file_others_could_have_written(
        tmp_path: Path, spoil: str) -> None:
    run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(tmp_path))
    lib = tmp_path / "afxdp.d"
    module = lib / "afxdp_cni.py"
    evil = tmp_path / "evil.py"
    evil.write_text("import sys; print('evil code ran'); sys.exit(0)\n")
    if spoil == "dir_group_writable":
        lib.chmod(0o775)
    elif spoil == "module_world_writable":
        module.chmod(0o646)
    elif spoil == "cache_not_roots":
        os.chown(lib / "__pycache__", 65534, 65534)
    elif spoil == "module_a_symlink":
        module.unlink()
        module.symlink_to(evil)
    else:
        module.unlink()
    res = _version(tmp_path / "afxdp")
    assert res.returncode == 1 and "evil" not in res.stdout, res.stdout
    err = json.loads(res.stdout)
    assert err["code"] == 112 and "install-cni" in err["msg"]
    assert list((lib / "__pycache__").iterdir()) == []  # nothing was compiled


def test_the_installed_plugin_starts_the_system_python_isolated_whatever_the_path(
        tmp_path: Path) -> None:
    """As a runtime runs it: found by name in a CNI_PATH directory and exec'd with the
    runtime's environment, here a PATH with no python and a PYTHONPATH that would
    break any non-isolated interpreter."""
    cni_bin = tmp_path / "bin"
    run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(cni_bin))
    assert (cni_bin / "afxdp").read_text().splitlines()[0] == "#!/usr/bin/python3 -IS"
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "json.py").write_text("raise SystemExit('a non-isolated python loaded this')\n")
    found = next(Path(d) / "afxdp" for d in f"/nonexistent:{cni_bin}".split(":")
                 if (Path(d) / "afxdp").exists())  # libcni's lookup by type
    res = subprocess.run([str(found)], input=b'{"cniVersion": "1.0.0"}',
                         env={"CNI_COMMAND": "VERSION", "CNI_PATH": f"/nonexistent:{cni_bin}",
                              "PATH": "/nonexistent", "PYTHONPATH": str(poison)},
                         capture_output=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cniVersion"] == "1.0.0"


def test_install_cni_refuses_a_relative_interpreter(tmp_path: Path) -> None:
    res = run(sys.executable, "-m", "cni_server.cli", "install-cni", "--dest", str(tmp_path),
              "--python", "python3", check=False)
    assert res.returncode == 2 and "--python 'python3' must be an absolute path" in res.stderr
    assert not (tmp_path / "afxdp").exists()


# -- ADD / DEL --------------------------------------------------------------------------------------


def test_add_moves_the_device_into_the_pod_with_an_address_and_del_brings_it_back(
        env: Env) -> None:
    k8s, pod = env.k8s, env.pod
    prog = 0
    env.admit(["p0"])
    prog = k8s.ns.xdp_prog_id("p0")
    lists_before = len(k8s.kubelet.plugins[RESOURCE].lists)
    res = env.add()
    assert res.code == 0, res.out
    # The pod sees it as CNI_IFNAME, as the spec asks (and chained plugins expect).
    assert res.out["interfaces"][0]["name"] == "net1" and res.out["interfaces"][0]["sandbox"]
    [ip] = res.out["ips"]
    assert ip["address"].startswith("10.55.0.") and ip["interface"] == 0
    assert "net1" in env.links(pod) and "p0" not in env.links(k8s.ns)
    assert env.addresses(pod, "net1") == [ip["address"]]
    assert pod.xdp_prog_id("net1") == prog  # the program went with it
    assert ipam_leases(k8s.work)
    # The device plugin reports it healthy while it is in the pod, and never otherwise
    # while CNI moved it (it is in neither netns's view for a moment).
    time.sleep(0.1)  # longer than the inventory's debounce
    seen = [{d.ID: d.health for d in lst}.get("p0")
            for lst in k8s.kubelet.plugins[RESOURCE].lists[lists_before:]]
    assert all(health == "Healthy" for health in seen), seen
    assert k8s.kubelet.devices(RESOURCE)["p0"].health == "Healthy"
    assert env.cni("CHECK", env.conf, netns=str(pod.path)).code == 0
    assert env.cni("DEL", env.conf, netns=str(pod.path)).code == 0
    assert "p0" in env.links(k8s.ns) and "net1" not in env.links(pod)
    assert env.addresses(k8s.ns, "p0") == [] and ipam_leases(k8s.work) == []
    assert env.cni("DEL", env.conf, netns=str(pod.path)).code == 0  # twice
    assert env.cni("DEL", env.conf).code == 0  # no netns, no prevResult
    with k8s.ns.entered():
        metrics = http_get(str(k8s.status()["http"]), "/metrics")[1]
    for line in ('afxdp_cni_operations_total{command="add",result="ok"} 1.0',
                 'afxdp_cni_operations_total{command="check",result="ok"} 1.0',
                 'afxdp_cni_operations_total{command="del",result="ok"} 3.0'):
        assert line in metrics, line


def test_add_applies_mtu_and_the_ipam_routes(env: Env) -> None:
    env.admit(["p0"])
    env.conf["mtu"] = 1400
    env.conf["ipam"]["routes"] = [{"dst": "10.66.0.0/16", "gw": "10.55.0.1"}]
    res = env.add()
    assert res.code == 0 and res.out["routes"] == [{"dst": "10.66.0.0/16", "gw": "10.55.0.1"}]
    link = json.loads(run("ip", "-n", env.pod.name, "-j", "link", "show", "net1").stdout)[0]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    routes = json.loads(run("ip", "-n", env.pod.name, "-j", "route").stdout)
    assert {"dst": "10.66.0.0/16", "gateway": "10.55.0.1"}.items() <= next(
        r for r in routes if r["dst"] == "10.66.0.0/16").items()


def test_rename_false_keeps_the_devices_own_name_in_the_pod(env: Env) -> None:
    """The opt-out, for clients that cannot be told another name (docs/cni.md)."""
    env.admit(["p0"])
    env.conf["rename"] = False
    res = env.add(ifname="net1")
    assert res.code == 0 and res.out["interfaces"][0]["name"] == "p0"
    assert "p0" in env.links(env.pod) and "net1" not in env.links(env.pod)
    assert env.cni("DEL", env.conf, netns=str(env.pod.path), ifname="net1").code == 0
    assert "p0" in env.links(env.k8s.ns)


def test_pod_client_gets_its_fd_only_from_inside_the_pod_netns(
        env: Env, client_runtime: ClientRuntime) -> None:
    k8s, pod = env.k8s, env.pod
    mount = env.admit(["p0"]).container_responses[0].mounts[0]
    sock = Path(mount.host_path) / "afxdp.sock"
    k8s.kubelet.add_pod("default", "pod-a", RESOURCE, ["p0"])
    assert env.add().code == 0
    with k8s.ns.entered(), Client(sock) as c, pytest.raises(HandshakeError, match="/host_nak"):
        c.connect("pod-a")  # the host netns: refused now that p0 is in the pod
    ready = k8s.work / "out" / "ready"
    proc = subprocess.Popen(
        pod.cmd(*setpriv("net_raw", "ipc_lock"), *client_runtime.argv(
            # the pod's name for it, as DPDK's iface= gives it
            "receive", "--socket", str(sock), "--netdev", "net1", "--hostname", "pod-a",
            "--count", "1000", "--timeout", "15", "--json", "--ready-file", str(ready))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_runtime.env(),
        cwd=client_runtime.dir)
    try:
        wait_for(ready, 15, proc)
        run(*k8s.ns.cmd(sys.executable, "-m", "cni_server.cli", "send", "--netdev", "q0",
                        "--count", "1000"))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["received"] == 1000


def test_del_with_the_daemon_down_succeeds(env: Env) -> None:
    env.admit(["p0"])
    assert env.add().code == 0
    assert env.k8s.daemons[-1].stop() == 0
    res = env.cni("DEL", env.conf, netns=str(env.pod.path))
    assert res.code == 0 and "del_daemon_skipped" in res.stderr
    assert ipam_leases(env.k8s.work) == []


def test_del_while_the_daemon_was_down_is_reconciled_when_the_pod_is_gone(env: Env) -> None:
    """DEL could not reach the daemon, so the device stayed in the (still existing) pod
    netns; after a restart, GC of the vanished pod brings it home."""
    env.admit(["p0"])
    env.k8s.kubelet.add_pod("default", "pod-a", RESOURCE, ["p0"])
    assert env.add().code == 0
    env.k8s.wait(lambda: bool(env.k8s.allocations()[0]["owner"]), what="owner known")
    assert env.k8s.daemons[-1].stop() == 0
    assert env.cni("DEL", env.conf, netns=str(env.pod.path)).code == 0
    assert "net1" in env.links(env.pod)  # nobody could move it
    env.k8s.start()
    env.k8s.kubelet.remove_pod("default", "pod-a")
    env.k8s.wait(lambda: env.k8s.allocations() == [], what="GC of the vanished pod")
    assert "p0" in env.links(env.k8s.ns) and "net1" not in env.links(env.pod)
    assert env.k8s.ns.xdp_prog_id("p0") == 0


def test_concurrent_adds_and_dels_for_different_pods(env: Env) -> None:
    env.admit(["p0"], "pod-a")
    env.admit(["p1"], "pod-b")
    with make_netns() as pod2:
        jobs = [("c1", env.pod, "p0", "pod-a"), ("c2", pod2, "p1", "pod-b")]
        for command in ("ADD", "DEL"):
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda j, c=command: env.cni(
                    c, dict(env.conf, deviceID=j[2]), container=j[0],
                    netns=str(j[1].path), pod=("default", j[3])), jobs))
            assert [r.code for r in results] == [0, 0], [r.out for r in results]
            if command == "ADD":
                assert "net1" in env.links(env.pod) and "net1" in env.links(pod2)
        assert {"p0", "p1"} <= env.links(env.k8s.ns)


def test_daemon_restart_finds_the_device_in_the_pod(env: Env) -> None:
    mount = env.admit(["p0"]).container_responses[0].mounts[0]
    env.k8s.kubelet.add_pod("default", "pod-a", RESOURCE, ["p0"])
    assert env.add().code == 0
    assert env.k8s.daemons[-1].stop() == 0
    second = env.k8s.start()
    assert "allocations=1 dropped=0" in second.log()
    with env.pod.entered():
        fetch_map_fd(Path(mount.host_path) / "afxdp.sock", "p0", hostname="pod-a").close()
    assert env.cni("DEL", env.conf, netns=str(env.pod.path)).code == 0
    assert "p0" in env.links(env.k8s.ns)


# -- refusals leave nothing half-done ------------------------------------------------------------------


@pytest.mark.parametrize("change,omit,code", [
    ({"cniVersion": "0.2.0"}, (), 1),  # older than any we speak
    ({"deviceID": None}, (), 7),
    ({"mtu": 10}, (), 7),
    ({"deviceID": "p1"}, (), 101),  # not allocated
    ({}, ("CNI_NETNS",), 4),
    ({}, ("CNI_PATH",), 4),
])
def test_add_refusals_have_the_spec_code_and_leave_nothing(
        env: Env, change: dict[str, Any], omit: tuple[str, ...], code: int) -> None:
    env.admit(["p0"])
    conf = {k: v for k, v in {**env.conf, **change}.items() if v is not None}
    res = env.cni("ADD", conf, netns=str(env.pod.path), omit=omit)
    assert res.code == 1 and res.out["code"] == code, res.out
    assert set(res.out) >= {"cniVersion", "code", "msg"}
    assert "p0" in env.links(env.k8s.ns) and ipam_leases(env.k8s.work) == []


def test_undecodable_config_is_error_6(env: Env) -> None:
    res = env.cni("ADD", {}, netns=str(env.pod.path), raw=b"{not json")
    assert res.code == 1 and res.out["code"] == 6


def test_add_refuses_a_name_taken_in_the_pod(env: Env) -> None:
    env.admit(["p0"])
    run("ip", "-n", env.pod.name, "link", "add", "net1", "type", "bridge")
    res = env.add(ifname="net1")
    assert res.code == 1 and res.out["code"] == 103
    assert "p0" in env.links(env.k8s.ns) and ipam_leases(env.k8s.work) == []


@pytest.mark.parametrize("ifname", ["a-name-past-15-bytes", "net/1", "net 1", ".."])
def test_add_refuses_a_cni_ifname_no_interface_can_have(env: Env, ifname: str) -> None:
    """CNI_IFNAME comes from the pod's network selection (a tenant writes it): the
    spec's "bad environment", said before anything moves (here without IPAM, whose
    own check would answer first)."""
    env.admit(["p0"])
    conf = {k: v for k, v in env.conf.items() if k != "ipam"}
    res = env.cni("ADD", conf, netns=str(env.pod.path), ifname=ifname)
    assert res.code == 1 and res.out["code"] == 4, res.out
    assert "CNI_IFNAME" in res.out["msg"], res.out
    assert "p0" in env.links(env.k8s.ns)
    assert env.add().code == 0


def test_add_of_a_device_in_another_pod_is_refused(env: Env) -> None:
    env.admit(["p0"])
    assert env.add().code == 0
    with make_netns() as other:
        res = env.cni("ADD", env.conf, netns=str(other.path), container="c2")
    assert res.code == 1 and res.out["code"] == 102
    assert "net1" in env.links(env.pod)


# -- CHECK, STATUS, GC ----------------------------------------------------------------------------------


def test_check_fails_after_tampering(env: Env) -> None:
    env.admit(["p0"])
    ip = env.add().out["ips"][0]["address"]
    run("ip", "-n", env.pod.name, "addr", "del", ip, "dev", "net1")
    res = env.cni("CHECK", env.conf, netns=str(env.pod.path))
    assert res.code == 1 and res.out["code"] == 104 and ip in res.out["msg"]


def test_status_reports_whether_the_daemon_is_reachable(env: Env) -> None:
    conf = dict(env.conf, cniVersion="1.1.0")  # STATUS came with 1.1.0
    assert env.cni("STATUS", conf).code == 0
    env.k8s.daemons[-1].stop()
    res = env.cni("STATUS", conf)
    assert res.code == 1 and res.out["code"] == 50


def test_gc_releases_attachments_not_listed_as_valid(env: Env) -> None:
    env.admit(["p0"])
    assert env.add(container="c1").code == 0
    gc = dict(env.conf, **{"cni.dev/valid-attachments": [{"containerID": "c9",
                                                          "ifname": "net1"}]})
    gc["cniVersion"] = "1.1.0"
    assert env.cni("GC", gc).code == 0
    assert "p0" in env.links(env.k8s.ns)


def link(ns: NsFixture, dev: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run("ip", "-n", ns.name, "-j", "link", "show", dev).stdout)[0]
    return doc


def test_add_without_ipam_reports_what_the_pod_sees_and_del_finds_it_there(
        env: Env) -> None:
    """No IPAM (a DPDK pod needs no address): no netlink in the pod for set-up, yet
    the result's MAC is the device's there, CHECK agrees, the pod gets its fd, and
    DEL finds the device by the ifindex it has there and brings it home."""
    mount = env.admit(["p0"]).container_responses[0].mounts[0]
    conf = {k: v for k, v in env.conf.items() if k != "ipam"}
    res = env.cni("ADD", conf, netns=str(env.pod.path))
    assert res.code == 0, res.out
    (iface,) = res.out["interfaces"]
    assert (iface["name"], iface["mac"]) == ("net1", link(env.pod, "net1")["address"])
    assert env.cni("CHECK", dict(conf, prevResult=res.out), netns=str(env.pod.path)).code == 0
    with env.pod.entered():
        fetch_map_fd(Path(mount.host_path) / "afxdp.sock", "net1", hostname="pod-a",
                     timeout=10).close()
    assert env.cni("DEL", conf, netns=str(env.pod.path)).code == 0
    assert "p0" in env.links(env.k8s.ns) and "net1" not in env.links(env.pod)


def test_del_gives_the_device_back_as_it_was_and_it_is_allocatable_again(env: Env) -> None:
    before = link(env.k8s.ns, "p0")
    assert "UP" in before["flags"]
    env.admit(["p0"])
    assert env.cni("ADD", dict(env.conf, mtu=1400), netns=str(env.pod.path)).code == 0
    assert link(env.pod, "net1")["mtu"] == 1400
    assert "p0" in _attached_on_disk(env)  # on disk once ADD answers
    assert env.cni("DEL", env.conf, netns=str(env.pod.path)).code == 0
    env.k8s.wait(lambda: _attached_on_disk(env) == {}, what="DEL recorded")  # soon after
    after = link(env.k8s.ns, "p0")
    assert ("UP" in after["flags"], after["mtu"], after["address"]) == (
        True, before["mtu"], before["address"])
    # Healthy again, and the pool hands it out to the next pod.
    env.k8s.kubelet.remove_pod("default", "pod-a")
    env.k8s.wait(lambda: env.k8s.allocations() == [], what="the allocation released")
    env.k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    env.admit(["p0"], "pod-b")
    assert env.cni("ADD", env.conf, netns=str(env.pod.path), pod=("default", "pod-b"),
                   container="c2").code == 0


def test_a_release_without_del_also_gives_the_device_back_up(env: Env) -> None:
    env.admit(["p0"])
    assert env.add().code == 0
    env.k8s.kubelet.remove_pod("default", "pod-a")  # the pod went; its DEL never came
    env.k8s.wait(lambda: env.k8s.allocations() == [], what="the allocation released")
    assert "UP" in link(env.k8s.ns, "p0")["flags"]
    env.k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))


def test_gc_of_one_network_leaves_another_networks_attachment_alone(env: Env) -> None:
    env.admit(["p0"], "pod-a")
    env.admit(["p1"], "pod-b")
    with make_netns() as pod2:
        assert env.add(container="c1").code == 0  # network afxdp-net
        other = dict(env.conf, name="other-net", deviceID="p1")
        other["ipam"] = dict(env.conf["ipam"], dataDir=str(env.k8s.work / "ipam2"))
        assert env.cni("ADD", other, netns=str(pod2.path), container="c2",
                       pod=("default", "pod-b")).code == 0
        gc = dict(env.conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
        res = env.cni("GC", gc)
        assert res.code == 0, res.out
        assert "p0" in env.links(env.k8s.ns)  # afxdp-net's, not valid: released
        assert "net1" in env.links(pod2)  # other-net's: untouched
        assert "ipam_gc_skipped" in res.stderr  # Debian's host-local speaks no 1.1.0


_STUB_IPAM = """#!/bin/sh
# An IPAM plugin that speaks CNI 1.1.0 and records the GC it is given.
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}' ;;
GC) cat > "$(dirname "$0")/gc-received.json" ;;
*) echo '{"cniVersion":"1.1.0","code":4,"msg":"stub"}'; exit 1 ;;
esac
"""


def test_gc_is_forwarded_to_an_ipam_plugin_that_speaks_1_1(env: Env, tmp_path: Path) -> None:
    stub = tmp_path / "stub-ipam"
    stub.write_text(_STUB_IPAM)
    stub.chmod(0o755)
    valid = [{"containerID": "c1", "ifname": "net1"}]
    gc = {"cniVersion": "1.1.0", "name": "afxdp-net", "type": "afxdp",
          "daemonSocket": env.conf["daemonSocket"], "ipam": {"type": "stub-ipam"},
          "cni.dev/valid-attachments": valid}
    res = env.cni("GC", gc, env={"CNI_PATH": f"{tmp_path}:/usr/lib/cni"})
    assert res.code == 0, (res.out, res.stderr)
    received = json.loads((tmp_path / "gc-received.json").read_text())
    assert received["cni.dev/valid-attachments"] == valid


def test_version_answers_with_the_cni_version_it_was_given(env: Env) -> None:
    for asked in ("1.0.0", "1.1.0"):
        res = env.cni("VERSION", {"cniVersion": asked})
        assert res.code == 0 and res.out["cniVersion"] == asked, res.out


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_each_cni_version_passes_add_check_where_defined_and_del(env: Env, version: str
                                                                 ) -> None:
    env.admit(["p0"])
    conf = dict(env.conf, cniVersion=version)
    if version == "1.1.0":
        del conf["ipam"]  # Debian 12's host-local speaks CNI up to 1.0.0
    res = env.cni("ADD", conf, netns=str(env.pod.path))
    assert res.code == 0, res.out
    assert res.out["cniVersion"] == version
    for ip in res.out.get("ips", []):  # each version's result shape
        assert ("version" in ip) is (version < "1.0.0"), ip
    if version in ("0.3.1",):
        check = env.cni("CHECK", conf, netns=str(env.pod.path))
        assert check.out["code"] == 1 and "CHECK is not defined before CNI 0.4.0" \
            in check.out["msg"], check.out
    else:
        assert env.cni("CHECK", conf, netns=str(env.pod.path)).code == 0
    assert env.cni("DEL", conf, netns=str(env.pod.path)).code == 0
    assert "p0" in env.links(env.k8s.ns)


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_need_a_1_1_config(env: Env, command: str) -> None:
    res = env.cni(command, env.conf)  # cniVersion 1.0.0
    assert res.out["code"] == 1 and f"{command} is not defined before CNI 1.1.0" \
        in res.out["msg"], res.out


# -- chained plugins, as a conflist -----------------------------------------------------------


def chain(env: Env, *more: dict[str, Any]) -> dict[str, Any]:
    """A conflist: ours (with host-local), then ``more``, as a NAD or /etc/cni/net.d has it."""
    ours = {k: v for k, v in env.conf.items() if k not in ("cniVersion", "name")}
    return {"cniVersion": env.conf["cniVersion"], "name": env.conf["name"],
            "plugins": [ours, *more]}


def sysctl(ns: NsFixture, key: str) -> str:
    return run("ip", "netns", "exec", ns.name, "sysctl", "-n", key).stdout.strip()


@pytest.mark.parametrize("tuning", [
    {},  # its defaults: it must find CNI_IFNAME
    {"mac": "02:aa:bb:cc:dd:01", "mtu": 1400,
     "sysctl": {"net.ipv4.conf.net1.arp_notify": "1"}},
], ids=["defaults", "mac-mtu-sysctl"])
def test_tuning_chained_after_us_finds_cni_ifname_checks_and_dels(
        env: Env, tuning: dict[str, Any]) -> None:
    before = link(env.k8s.ns, "p0")
    env.admit(["p0"])
    conflist = chain(env, {"type": "tuning", "dataDir": str(env.k8s.work / "tuning"),
                           **tuning})
    res = env.cni("ADD", conflist, netns=str(env.pod.path))
    assert res.code == 0, (res.out, res.stderr)
    assert res.out["interfaces"][0]["name"] == "net1"  # tuning's result: ours, passed on
    inside = link(env.pod, "net1")
    if tuning:
        assert (inside["address"], inside["mtu"]) == ("02:aa:bb:cc:dd:01", 1400)
        assert sysctl(env.pod, "net.ipv4.conf.net1.arp_notify") == "1"
    check = env.cni("CHECK", conflist, netns=str(env.pod.path))
    assert check.code == 0, (check.out, check.stderr)
    res = env.cni("DEL", conflist, netns=str(env.pod.path))  # tuning first, then us
    assert res.code == 0, (res.out, res.stderr)
    after = link(env.k8s.ns, "p0")
    assert ("UP" in after["flags"], after["mtu"], after["address"]) == (
        True, before["mtu"], before["address"])
    assert ipam_leases(env.k8s.work) == []


def test_del_brings_back_the_mac_a_chained_plugin_changed_even_if_its_del_did_not(
        env: Env) -> None:
    """tuning restores what it changed on its own DEL; should that DEL not run (a
    runtime that lost its cache, a tuning that failed), ours still gives the device
    back with the MAC and MTU it had before ADD."""
    before = link(env.k8s.ns, "p0")
    env.admit(["p0"])
    conflist = chain(env, {"type": "tuning", "dataDir": str(env.k8s.work / "tuning"),
                           "mac": "02:aa:bb:cc:dd:02", "mtu": 1300})
    assert env.cni("ADD", conflist, netns=str(env.pod.path)).code == 0
    res = env.cni("DEL", env.conf, netns=str(env.pod.path))  # ours alone
    assert res.code == 0, res.out
    after = link(env.k8s.ns, "p0")
    assert (after["mtu"], after["address"]) == (before["mtu"], before["address"])


def test_runtime_config_reaches_the_plugin_only_for_declared_capabilities(env: Env) -> None:
    """Multus passes deviceID as a capability arg: a config that does not declare the
    capability does not get it, and then needs its own deviceID."""
    env.admit(["p0"])
    conf = {k: v for k, v in env.conf.items() if k != "deviceID"}
    res = env.cni("ADD", conf, netns=str(env.pod.path), runtime={"deviceID": "p0"})
    assert res.code == 1 and res.out["code"] == 7 and "deviceID" in res.out["msg"], res.out
    declared = dict(conf, capabilities={"deviceID": True})
    res = env.cni("ADD", declared, netns=str(env.pod.path), runtime={"deviceID": "p0"})
    assert res.code == 0, res.out


def test_an_mtu_the_device_refuses_leaves_it_home_under_its_own_name(env: Env) -> None:
    """One request moves, renames and sizes the device; the kernel may move it and
    then refuse the MTU (a macvlan's may not exceed its lower device's).  ADD fails and the
    device is back on the node under its own name, up as it was, and can be attached
    again."""
    run("ip", "-n", env.k8s.ns.name, "link", "add", "link", "q1", "name", "p5", "type",
        "macvlan", "mode", "bridge")
    run("ip", "-n", env.k8s.ns.name, "link", "set", "p5", "up")
    env.k8s.kubelet.wait_devices(RESOURCE, lambda d: healthy(d, "p5"))
    before = link(env.k8s.ns, "p5")
    env.admit(["p5"])
    conf = dict(env.conf, deviceID="p5")
    res = env.cni("ADD", dict(conf, mtu=9000), netns=str(env.pod.path))
    assert res.code == 1 and res.out["code"] == 105, res.out
    assert not {"net1", "p5"} & env.links(env.pod)
    after = link(env.k8s.ns, "p5")
    assert (after["mtu"], after["address"], "UP" in after["flags"]) == (
        before["mtu"], before["address"], True)
    assert ipam_leases(env.k8s.work) == []
    assert _attached_on_disk(env) == {}  # nor is it recorded in the pod on disk
    assert env.cni("ADD", conf, netns=str(env.pod.path)).code == 0


def test_a_del_that_cannot_bring_the_device_home_keeps_its_record_for_the_next_one(
        env: Env) -> None:
    """The node's name for it was taken meanwhile: the kernel moves it home and then
    refuses the name, and the daemon sends it back into the pod under the pod's name.
    DEL itself succeeds (the plugin's rule: the daemon reconciles), but the daemon
    still records where the device is, not that it is home, so the next DEL (or the
    release when the pod is gone) brings it home."""
    env.admit(["p0"])
    assert env.add().code == 0
    run("ip", "-n", env.k8s.ns.name, "link", "add", "p0", "type", "bridge")
    res = env.cni("DEL", env.conf, netns=str(env.pod.path))
    assert res.code == 0 and "event=del_daemon_skipped code=105" in res.stderr, res.stderr
    assert "net1" in env.links(env.pod) and "net1" not in env.links(env.k8s.ns)
    run("ip", "-n", env.k8s.ns.name, "link", "del", "p0")
    assert env.cni("DEL", env.conf, netns=str(env.pod.path)).code == 0
    assert "p0" in env.links(env.k8s.ns) and not {"net1", "p0"} & env.links(env.pod)
    [back] = json.loads(run("ip", "-n", env.k8s.ns.name, "-j", "-d", "link", "show", "p0").stdout)
    assert back["linkinfo"]["info_kind"] == "veth"  # ours, not the bridge


# -- IPAM alongside the move ---------------------------------------------------------------

_FAILING_IPAM = """#!/bin/sh
# An IPAM plugin that waits until the device is in the pod (the daemon moves it while
# IPAM runs), notes that it saw it there, and fails.
for i in $(seq 100); do
    if nsenter --net="$CNI_NETNS" ip link show net1 >/dev/null 2>&1; then
        touch "$(dirname "$0")/saw-the-device-in-the-pod"; break
    fi
    sleep 0.05
done
echo '{"cniVersion":"1.0.0","code":11,"msg":"no addresses left (stub)"}'; exit 1
"""


def test_ipam_runs_while_the_device_moves_and_its_failure_brings_the_device_home(
        env: Env, tmp_path: Path) -> None:
    env.admit(["p0"])
    stub = tmp_path / "failing-ipam"
    stub.write_text(_FAILING_IPAM)
    stub.chmod(0o755)
    conf = {**env.conf, "ipam": {"type": "failing-ipam"}}
    res = env.cni("ADD", conf, netns=str(env.pod.path),
                  env={"CNI_PATH": f"{tmp_path}:/usr/lib/cni"})
    assert res.code == 1 and res.out["code"] == 11, res.out
    assert "no addresses left (stub)" in res.out["msg"]
    assert (tmp_path / "saw-the-device-in-the-pod").exists()  # the two overlapped
    assert "p0" in env.links(env.k8s.ns) and "net1" not in env.links(env.pod)
    assert _attached_on_disk(env) == {}  # home, on disk too
    res = env.add()  # and nothing of the failed ADD is left in the way
    assert res.code == 0 and "net1" in env.links(env.pod), res.out
    assert _attached_on_disk(env)["p0"]["ifname"] == "net1"  # on disk once ADD answers


def _attached_on_disk(env: Env) -> dict[str, Any]:
    """The attachment records in the daemon's state file, all allocations together."""
    doc = json.loads((env.k8s.work / "state" / "state.json").read_text())
    return {k: v for a in doc["allocations"] for k, v in a.get("attached", {}).items()}


def test_a_plugin_gone_before_its_ipam_result_leaves_the_device_home(env: Env) -> None:
    import socket
    import struct
    env.admit(["p0"])
    netns = os.open(env.pod.path, os.O_RDONLY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(env.conf["daemonSocket"])
        request = {"op": "add", "deviceID": "p0", "containerID": "c1", "ifname": "net1",
                   "netns": str(env.pod.path), "network": "afxdp-net", "rename": True,
                   "pod": {"namespace": "default", "name": "pod-a"}, "ipam": "follows"}
        sock.sendmsg([json.dumps(request).encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", netns))])
        env.k8s.wait(lambda: "net1" in env.links(env.pod), what="the device in the pod")
    finally:
        sock.close()  # as a plugin killed while its IPAM ran
        os.close(netns)
    env.k8s.wait(lambda: "p0" in env.links(env.k8s.ns) and "net1" not in env.links(env.pod),
                 what="the device back on the node")
    res = env.add()
    assert res.code == 0 and "net1" in env.links(env.pod), res.out
