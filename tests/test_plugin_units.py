"""Pure parts of the Kubernetes front end: configuration, pool classification, preferences."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bpf.program import ProgramSpec
from cni_server.config import ConfigError
from cni_server.rtread import link_facts
from cni_server.spec import AllocationSpec
from plugin.api import deviceplugin_v1beta1_pb2 as pb
from plugin.config import PoolConfig, load, validate
from plugin.devhealth import DeviceState
from plugin.discovery import Classifier, Netdev, classify
from plugin.owners import pod_hostname
from plugin.pool import PoolBackend, program_fields

BASE = Netdev(name="eth1", ifindex=3, mac="02:00:00:00:00:01", kind="", driver="ice",
              pci_address="0000:3b:00.0", numa_node=0, up=True, addressed=False,
              loopback=False, default_route=False, xdp_prog_id=0, xdp_prog_name="")


def dev(name: str, **kw: Any) -> Netdev:
    return replace(BASE, name=name, **kw)


def pools(*raw: dict[str, Any], **top: Any) -> list[PoolConfig]:
    return validate({"pools": list(raw), **top}, node_name="node-a").pools


# -- configuration ------------------------------------------------------------------------------


def test_defaults_and_resource_names() -> None:
    cfg = validate({"pools": [{"name": "fast", "drivers": ["ice"]}]}, node_name="n1")
    p = cfg.pools[0]
    assert cfg.resource_name(p) == "afxdp/fast" and p.env_name() == "AFXDP_DEVICES_FAST"
    assert (p.pin_map, p.uid, p.socket_mode, p.queues) == ("socket", 0, 0o660, 0)
    assert cfg.device_plugins_dir == Path("/var/lib/kubelet/device-plugins")
    assert cfg.pod_resources_socket == Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    assert cfg.node_name == "n1"


def test_per_node_override_applies_only_on_that_node() -> None:
    raw = {"pools": [{"name": "fast", "devices": ["eth1"], "xdpMode": "native",
                      "nodes": {"node-b": {"devices": ["ens5"], "xdpMode": "skb"}}}]}
    a = validate(raw, node_name="node-a").pools[0]
    b = validate(raw, node_name="node-b").pools[0]
    assert ([p.pattern for p in a.devices], a.xdp_mode.value) == (["eth1"], "native")
    assert ([p.pattern for p in b.devices], b.xdp_mode.value) == (["ens5"], "skb")


@pytest.mark.parametrize("raw,field", [
    ({}, "pools"),
    ({"pools": []}, "pools"),
    ({"pools": [{"name": "Fast", "drivers": ["ice"]}]}, "pools[0].name"),
    ({"pools": [{"name": "fast"}]}, "pools[0]: selects nothing"),
    ({"pools": [{"name": "fast", "devices": ["eth["]}]}, "pools[0].devices[0]"),
    ({"pools": [{"name": "fast", "pciAddresses": ["3b:00.0"]}]}, "pools[0].pciAddresses[0]"),
    ({"pools": [{"name": "fast", "macs": ["zz"]}]}, "pools[0].macs[0]"),
    ({"pools": [{"name": "fast", "drivers": ["ice"], "pinMap": "yes"}]}, "pools[0].pinMap"),
    ({"pools": [{"name": "fast", "drivers": ["ice"], "queues": -1}]}, "pools[0].queues"),
    ({"pools": [{"name": "fast", "drivers": ["ice"], "udsIdleTimeout": 0}]},
     "pools[0].udsIdleTimeout"),
    ({"pools": [{"name": "fast", "drivers": ["ice"], "bogus": 1}]}, "pools[0].bogus"),
    ({"pools": [{"name": "a", "devices": ["eth1"]}, {"name": "b", "devices": ["eth1"]}]},
     "pools[1].devices[0]"),
    ({"pools": [{"name": "a", "drivers": ["x"]}, {"name": "a", "drivers": ["y"]}]},
     "pools[1].name"),
    ({"pools": [{"name": "a", "drivers": ["x"],
                 "nodes": {"node-a": {"name": "b"}}}]}, "pools[0].nodes.node-a.name"),
    ({"pools": [{"name": "a", "drivers": ["x"]}], "stateDir": "relative"}, "stateDir"),
    ({"pools": [{"name": "a", "drivers": ["x"]}], "resourcePrefix": "Bad_Prefix"},
     "resourcePrefix"),
    ({"pools": [{"name": "a", "drivers": ["x"]}], "gcInterval": 0}, "gcInterval"),
    ({"pools": [{"name": "a", "drivers": ["x"]}], "handshakeSpinUs": 5000}, "handshakeSpinUs"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": "p.o"}]}, "pools[0].program"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {"object": "rel.o", "name": "f"}}]},
     "pools[0].program.object"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {"object": "/p.o", "name": "1f"}}]},
     "pools[0].program.name"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {"object": "/p.o", "name": "f",
                                                             "section": "xdp"}}]},
     "pools[0].program.section"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {
        "object": "/p.o", "name": "f", "mapKeys": {"ports": [-1]}}}]},
     "pools[0].program.mapKeys.ports"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {
        "object": "/p.o", "source": "/p.c", "name": "f"}}]}, "pools[0].program: give either"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {"name": "f"}}]},
     "pools[0].program: give either"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {"source": "p.c", "name": "f"}}]},
     "pools[0].program.source"),
    ({"pools": [{"name": "a", "drivers": ["x"], "program": {
        "object": "/p.o", "name": "f", "kernelHeaders": "/usr/src"}}]},
     "pools[0].program.kernelHeaders: only programs from source"),
    ({"pools": [{"name": "a", "drivers": ["x"], "attachAhead": "yes"}]}, "pools[0].attachAhead"),
    ({"pools": [{"name": "a", "virtual": {"count": 2}, "attachAhead": True}]},
     "pools[0].attachAhead: a virtual pool"),
])
def test_bad_configuration_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(raw, node_name="node-a")
    assert str(e.value).startswith(field), str(e.value)


def test_handshake_spin_defaults_to_50_us_and_can_be_turned_off() -> None:
    pools = [{"name": "a", "drivers": ["x"]}]
    assert validate({"pools": pools}, node_name="n").handshake_spin_us == 50
    assert validate({"pools": pools, "handshakeSpinUs": 0}, node_name="n").handshake_spin_us == 0


def test_attach_ahead_is_off_unless_a_pool_asks_and_takes_the_pools_program() -> None:
    from plugin.ahead import pool_program
    plain, custom = pools({"name": "a", "drivers": ["x"]},
                          {"name": "b", "drivers": ["y"], "attachAhead": True,
                           "program": {"object": "/p.o", "name": "f", "mapKeys": {"m": [7]}}})
    assert (plain.attach_ahead, custom.attach_ahead) == (False, True)
    spec = AllocationSpec(id="x", netdevs=("eth1",), hostnames=frozenset(),
                          socket_base=Path("/s"), **program_fields(custom))
    assert pool_program(custom) == spec.program_choice()  # what Allocate will ask acquire for
    assert pool_program(plain) == AllocationSpec(id="y", netdevs=("eth1",),
                                                 hostnames=frozenset(),
                                                 socket_base=Path("/s")).program_choice()


def test_a_pool_program_is_read_with_its_map_keys() -> None:
    [p] = validate({"pools": [{"name": "a", "drivers": ["x"], "program": {
        "object": "/opt/p.o", "name": "steer", "mapKeys": {"udp_ports": [4789, 2152]}}}]},
        node_name="n").pools
    assert (p.program, p.program_map_keys) == (
        ProgramSpec("steer", object_path=Path("/opt/p.o")), {"udp_ports": [4789, 2152]})


def test_a_pool_program_from_source_is_read_with_its_kernel_headers() -> None:
    [p] = validate({"pools": [{"name": "a", "drivers": ["x"], "program": {
        "source": "/opt/p.c", "name": "steer", "kernelHeaders": "/usr/src/k"}}]},
        node_name="n").pools
    assert p.program == ProgramSpec("steer", source_path=Path("/opt/p.c"),
                                    kernel_headers=Path("/usr/src/k"))
    assert p.program_name == "steer"


def test_load_reads_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("pools:\n  - name: fast\n    devices: ['ens.*']\n    pinMap: both\n")
    assert load(f, node_name="n").pools[0].pin_map == "both"


# -- classification --------------------------------------------------------------------------------


def test_selectors_of_different_kinds_must_all_match() -> None:
    [p] = pools({"name": "fast", "drivers": ["ice"], "pciAddresses": ["0000:3b:00.0"]})
    c = classify({"eth1": dev("eth1"), "eth2": dev("eth2", pci_address="0000:3b:00.1"),
                  "eth3": dev("eth3", driver="mlx5_core")}, [p])
    assert list(c.members["fast"]) == ["eth1"]


@pytest.mark.parametrize("netdev,reason", [
    (dev("lo", loopback=True), "loopback"),
    (dev("eth1", default_route=True), "carries the default route"),
    (dev("eth1", xdp_prog_id=7, xdp_prog_name="firewall"), "foreign XDP program 'firewall'"),
    (dev("eth1", addressed=True), "has an IP address"),
    (dev("skip1"), "matches exclude"),
])
def test_never_taken_silently(netdev: Netdev, reason: str) -> None:
    [p] = pools({"name": "fast", "devices": [".*"], "exclude": ["skip.*"],
                 "excludeAddressed": True})
    c = classify({netdev.name: netdev}, [p])
    assert c.members["fast"] == {} and reason in c.excluded["fast"][netdev.name]


def test_our_own_program_is_not_foreign() -> None:
    [p] = pools({"name": "fast", "devices": ["eth1"]})
    c = classify({"eth1": dev("eth1", xdp_prog_id=9, xdp_prog_name="afxdp_redirect")}, [p])
    assert "eth1" in c.members["fast"]


def test_a_pools_custom_program_is_not_foreign_to_that_pool_only() -> None:
    steer = {"object": "/opt/s.o", "name": "afxdp_udp_steer"}
    mine, other = pools({"name": "mine", "devices": ["eth1"], "program": steer},
                        {"name": "other", "devices": ["eth2"]})
    c = classify({n: dev(n, xdp_prog_id=9, xdp_prog_name="afxdp_udp_steer")
                  for n in ("eth1", "eth2")}, [mine, other])
    assert "eth1" in c.members["mine"]
    assert "foreign XDP program 'afxdp_udp_steer'" in c.excluded["other"]["eth2"]


def test_allocated_netdev_stays_in_its_pool_even_with_an_address() -> None:
    [p] = pools({"name": "fast", "devices": ["eth1"], "excludeAddressed": True})
    c = classify({"eth1": dev("eth1", addressed=True)}, [p], keep={"eth1": "fast"})
    assert "eth1" in c.members["fast"]


def test_netdev_matching_two_pools_is_a_conflict() -> None:
    a, b = pools({"name": "a", "devices": ["eth.*"]}, {"name": "b", "drivers": ["ice"]})
    c = classify({"eth1": dev("eth1")}, [a, b])
    assert c.conflicts == {"eth1": ["a", "b"]} and not c.members["a"] and not c.members["b"]



@pytest.mark.parametrize("told", [False, True], ids=["looks-at-all", "told-what-changed"])
def test_the_classifier_works_out_again_only_what_changed_and_agrees_with_a_fresh_one(
        told: bool) -> None:
    """After each change (one netdev's facts, one allocation's keep, a netdev gone or
    new) the remembering classifier gives what a fresh classification gives, and
    works out only the netdevs whose Netdev or kept pool changed; whether it looks
    at every netdev or is told which changed (as NodeView.changed tells it)."""
    fast, other = pools({"name": "fast", "devices": ["eth.*"], "excludeAddressed": True},
                        {"name": "other", "drivers": ["mlx5_core"]})
    netdevs = {f"eth{i}": dev(f"eth{i}", ifindex=10 + i) for i in range(50)}
    netdevs["eth7"] = dev("eth7", driver="mlx5_core")  # both pools select it: a conflict
    netdevs["ib0"] = dev("ib0", driver="mlx5_core")
    keep: dict[str, str] = {}
    classifier = Classifier([fast, other])
    worked_out: list[str] = []
    outcome = classifier._outcome

    def counting(d: Netdev, kept: str | None) -> Any:
        worked_out.append(d.name)
        return outcome(d, kept)

    classifier._outcome = counting  # type: ignore[method-assign,assignment]
    changes: list[Callable[[], object]] = [
        lambda: None,
        lambda: netdevs.update(eth3=replace(netdevs["eth3"], addressed=True)),  # excluded
        lambda: keep.update(eth3="fast"),  # allocated: kept despite its address
        lambda: netdevs.update(eth4=replace(netdevs["eth4"], xdp_prog_id=9,
                                            xdp_prog_name="firewall")),
        lambda: netdevs.pop("eth5"),
        lambda: netdevs.update(eth99=dev("eth99", ifindex=99)),
        lambda: keep.pop("eth3"),
    ]
    expect_worked_out = [sorted(netdevs), [], ["eth3"], ["eth3"], ["eth4"], [], ["eth99"], ["eth3"]]
    initial: Callable[[], object] = lambda: None  # noqa: E731
    previous: dict[str, Netdev] = {}
    for i, change in enumerate([initial, *changes]):
        worked_out.clear()
        change()
        changed = {n for n in netdevs.keys() | previous.keys()
                   if netdevs.get(n) is not previous.get(n)}
        previous = dict(netdevs)
        got = classifier(dict(netdevs), dict(keep), changed if told and i else None)
        assert got == classify(dict(netdevs), [fast, other], dict(keep)), f"after change {i}"
        assert sorted(worked_out) == expect_worked_out[i], f"after change {i}"
    assert "eth3" in got.excluded["fast"] and got.conflicts == {"eth7": ["fast", "other"]}


# -- preferred allocation ------------------------------------------------------------------------------


class _Inventory:
    def __init__(self, states: dict[str, DeviceState]) -> None:
        self.pools = {"fast": states}


def backend(*netdevs: Netdev) -> PoolBackend:
    cfg = validate({"pools": [{"name": "fast", "drivers": ["ice"]}]}, node_name="n")
    states = {d.name: DeviceState(d.name, d, True) for d in netdevs}
    return PoolBackend(cfg, cfg.pools[0], None, _Inventory(states))  # type: ignore[arg-type]


def pref(b: PoolBackend, available: list[str], must: list[str], size: int) -> list[str]:
    return b.preferred(pb.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size))


def test_preferred_keeps_must_include_then_same_numa_then_same_nic() -> None:
    b = backend(dev("a0", numa_node=0, pci_address="0000:3b:00.0"),
                dev("a1", numa_node=0, pci_address="0000:3b:00.1"),
                dev("b0", numa_node=1, pci_address="0000:af:00.0"),
                dev("c0", numa_node=0, pci_address="0000:5e:00.0"))
    assert pref(b, ["a0", "a1", "b0", "c0"], ["a1"], 2) == ["a1", "a0"]  # same NIC
    assert pref(b, ["a0", "b0", "c0"], ["a0"], 2) == ["a0", "c0"]  # same NUMA, other NIC
    assert pref(b, ["b0", "a0", "a1", "c0"], [], 3) == ["a0", "a1", "c0"]  # the big NUMA node
    assert pref(b, ["a0"], [], 3) == ["a0"]


def test_pod_hostname_follows_kubelet() -> None:
    assert pod_hostname("dpdk-0") == "dpdk-0"
    assert pod_hostname("x" * 62 + "-abc") == "x" * 62
    assert len(pod_hostname("y" * 80)) == 63


# -- the CNI executable's child processes (IPAM) ---------------------------------------------


def test_the_cni_executable_feeds_a_child_more_than_a_pipe_holds_and_reads_it_all() -> None:
    from plugin import cni
    data = os.urandom(300_000).hex().encode()  # 600 kB: ten pipe buffers
    code, out, err = cni.Child(["/bin/cat"], data, {"PATH": "/usr/bin"}).wait()
    assert (code, out, err) == (0, data, b"")
    code, out, err = cni.Child(["/bin/sh", "-c", "cat >/dev/null; echo oops >&2; exit 3"],
                               data, {}).wait()
    assert (code, out, err) == (3, b"", b"oops\n")


def test_a_child_that_outlives_its_timeout_is_killed() -> None:
    from plugin import cni
    code, _, _ = cni.Child(["/bin/sleep", "30"], b"", {}).wait(timeout=0.2)
    assert code == -9


def test_the_kubernetes_daemon_takes_the_standalone_connection_limits() -> None:
    from plugin.kubernetes import kubernetes_daemon
    pools = [{"name": "fast", "drivers": ["ice"]}]
    cfg = validate({"pools": pools, "maxConnections": 300, "maxConnectionsPerSocket": 20},
                   node_name="n1")
    limits = kubernetes_daemon(cfg).server.limits
    assert (limits.max_connections, limits.max_connections_per_socket) == (300, 20)
    defaults = validate({"pools": pools}, node_name="n1")
    assert (defaults.max_connections, defaults.max_connections_per_socket) == (4096, 128)
    for bad, field in (({"maxConnections": 0}, "maxConnections"),
                       ({"maxConnections": True}, "maxConnections"),
                       ({"maxConnections": 5, "maxConnectionsPerSocket": 6},
                        "maxConnectionsPerSocket")):
        with pytest.raises(ConfigError, match=field):
            validate({"pools": pools, **bad}, node_name="n1")


def test_warm_programs_default_to_two_and_take_0_to_16() -> None:
    from plugin.kubernetes import kubernetes_daemon
    pools = [{"name": "fast", "drivers": ["ice"]}]
    assert kubernetes_daemon(validate({"pools": pools}, node_name="n1")).front.warm_programs == 2
    cfg = validate({"pools": pools, "warmPrograms": 0}, node_name="n1")
    assert kubernetes_daemon(cfg).front.warm_programs == 0
    for bad in (-1, 17, 2.5, True, "2"):
        with pytest.raises(ConfigError, match="warmPrograms"):
            validate({"pools": pools, "warmPrograms": bad}, node_name="n1")


# -- the CNI executable's JSON codec ---------------------------------------------------------

JSON_TEXTS = [
    '{"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "host-local", "ranges": [[{}]]}}',
    ' \n\t{"a": [1, -2.5e3, true, false, null, "\\u00e9\\ud83d\\ude00", "\\n\\"\\\\"]}\r\n ',
    '[]', '"x"', '0', '-0.0', '1E400', 'NaN', '-Infinity', '{"a": 1, "a": 2}',
    '"\u00e9t\u00e9"', '{"deep": ' + '[' * 200 + ']' * 200 + '}', '123456789012345678901234567890',
]
BAD_JSON = ['', '   ', '{', '{"a": 1} x', '{"a": 1}{}', "{'a': 1}", '[1,]', '"\x01"', 'nul',
            '{"a" 1}', '\ufeff{}', '[1] \n [2]', '\n\n  }']


@pytest.mark.parametrize("text", JSON_TEXTS)
def test_the_cni_executables_codec_reads_and_writes_what_json_does(text: str) -> None:
    import json
    import math

    from plugin import cni
    for data in (text, text.encode()):
        got, want = cni.loads(data), json.loads(text)
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got)
            continue
        assert got == want and type(got) is type(want)
        assert cni.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("text", BAD_JSON)
def test_the_cni_executables_codec_refuses_what_json_refuses_with_its_message(text: str) -> None:
    import json

    from plugin import cni
    for data in (text, text.encode()):
        try:
            want = json.loads(data)
        except ValueError as e:
            with pytest.raises(ValueError) as got:
                cni.loads(data)
            assert str(got.value) == str(e)
        else:  # json reads a UTF-8 BOM in bytes
            assert isinstance(data, bytes) and cni.loads(data) == want


def test_the_cni_executables_codec_refuses_bytes_that_are_not_utf8_and_odd_values() -> None:
    from plugin import cni
    with pytest.raises(ValueError):
        cni.loads(b'{"a": "\xff"}')
    with pytest.raises(TypeError, match="not JSON serializable"):
        cni.dumps({"a": object()})
    with pytest.raises(ValueError, match=r"[Cc]ircular"):
        loop: list[Any] = []
        loop.append(loop)
        cni.dumps(loop)


def test_the_installed_cni_executable_imports_no_pure_python_package_it_can_do_without() -> None:
    import subprocess
    import sys
    plugin_path = Path(__file__).resolve().parent.parent / "plugin" / "cni.py"
    code = (f"import sys; g = {{'__name__': 'cni'}}; exec(compile(open({str(plugin_path)!r})"
            ".read(), 'cni', 'exec'), g); print(' '.join(sorted(sys.modules)))\n"
            "try: g['loads'](b'{not json')\n"
            "except ValueError as e: print(e)")
    out = subprocess.run(["/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                          else sys.executable, "-IS", "-c", code],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    modules = out[0].split()
    assert {"json", "re", "enum", "subprocess", "socket", "typing"}.isdisjoint(modules), modules
    # A refused document still gets json's own message (the package loads for it).
    assert out[1:] == ["Expecting property name enclosed in double quotes: line 1 column 2 "
                       "(char 1)"]


def test_the_cni_executables_codec_falls_back_to_json_without_the_c_module() -> None:
    import subprocess
    import sys
    plugin_path = Path(__file__).resolve().parent.parent / "plugin" / "cni.py"
    code = ("import sys; sys.modules['_json'] = None; g = {'__name__': 'cni'}\n"
            f"exec(compile(open({str(plugin_path)!r}).read(), 'cni', 'exec'), g)\n"
            "assert g['_scan'] is None and g['_encoder'] is None\n"
            "print(g['dumps'](g['loads'](b'{\"a\": [1, \"\\\\u00e9\"]}')))")
    out = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == '{"a": [1, "\\u00e9"]}\n'


def _link_event(link: Any) -> dict[Any, Any]:
    """An RTM_NEWLINK as NodeView.apply reads pyroute2's messages."""
    return {"event": "RTM_NEWLINK", "ifname": link.name, "index": link.ifindex,
            "address": link.mac, ("linkinfo", "kind"): link.kind, "flags": link.flags,
            "operstate": link.operstate}


def test_the_node_view_rebuilds_only_the_netdevs_whose_facts_changed() -> None:
    from plugin.discovery import NodeView, _Link
    view = NodeView()
    a = _Link(name="a0", ifindex=10, mac="02:00:00:00:00:0a", kind="veth", flags=1,
              operstate="UP", xdp_prog_id=0)
    b = replace(a, name="b0", ifindex=11, mac="02:00:00:00:00:0b")
    view.links = {10: a, 11: b}
    view._sysfs = {("a0", 10): ("", "", None), ("b0", 11): ("", "", None)}  # no sysfs here
    first = view.netdevs()
    again = view.netdevs()
    assert again["a0"] is first["a0"] and again["b0"] is first["b0"] and view.changed == set()
    assert first["a0"].up and not first["a0"].addressed
    view.apply(_link_event(replace(b, flags=0)))  # b0 went down
    view.apply({"event": "RTM_NEWADDR", "family": 2, "address": "10.0.0.1", "prefixlen": 24,
                "scope": 0, "index": 10})  # a0 got an address
    changed = view.netdevs()
    assert changed["a0"] is not first["a0"] and changed["a0"].addressed
    assert changed["b0"] is not first["b0"] and not changed["b0"].up
    assert view.changed == {"a0", "b0"}
    view.apply({"event": "RTM_NEWROUTE", "family": 2, "dst_len": 0, "table": 254, "oif": 11,
                "priority": 0})  # b0 carries the default route now
    assert view.netdevs()["b0"].default_route and view.changed == {"b0"}
    view.apply({"event": "RTM_DELLINK", "index": 10})
    assert set(view.netdevs()) == {"b0"} and view.changed == {"a0"}


def test_the_node_view_after_any_events_equals_one_worked_out_from_scratch() -> None:
    """Renames (two links swapping names), a link gone and one new under its name,
    addresses, default routes, and an event that changes nothing: what netdevs()
    gives after each batch equals a fresh view's, and ``changed`` names exactly the
    netdevs that differ from the call before."""
    from plugin.discovery import NodeView, _Link

    def link(name: str, ifindex: int, **kw: Any) -> Any:
        return replace(_Link(name=name, ifindex=ifindex, mac=f"02:00:00:00:00:{ifindex:02x}",
                             kind="veth", flags=1, operstate="UP", xdp_prog_id=0), **kw)

    view = NodeView()
    view.links = {i: link(f"e{i}", i) for i in range(1, 9)}
    batches: list[list[dict[str, Any]]] = [
        [],
        [_link_event(link("e1", 1))],  # nothing changes
        [_link_event(link("e3", 2)), _link_event(link("e2", 3))],  # e2 and e3 swap names
        [{"event": "RTM_DELLINK", "index": 4}, _link_event(link("e4", 40))],  # e4 anew
        [_link_event(link("e5", 5, xdp_prog_id=7)), _link_event(link("e6", 6, flags=0))],
        [{"event": "RTM_NEWADDR", "family": 10, "address": "fd00::7", "prefixlen": 64,
          "scope": 0, "index": 7},
         {"event": "RTM_NEWROUTE", "family": 2, "dst_len": 0, "table": 254, "oif": 8,
          "priority": 5}],
        [{"event": "RTM_DELADDR", "family": 10, "address": "fd00::7", "prefixlen": 64,
          "scope": 0, "index": 7},
         {"event": "RTM_DELLINK", "index": 8}],
    ]
    view._prog_names = {7: "afxdp_redirect"}
    before = view.netdevs()
    for i, batch in enumerate(batches):
        for msg in batch:
            view.apply(msg)
        got = view.netdevs()
        fresh = NodeView()
        fresh.links, fresh.addrs, fresh.defaults = dict(view.links), view.addrs, view.defaults
        fresh._sysfs, fresh._prog_names = view._sysfs, view._prog_names
        assert got == fresh.netdevs(), f"after batch {i}"
        differ = {n for n in got.keys() | before.keys() if got.get(n) != before.get(n)}
        assert view.changed == differ, f"after batch {i}"
        before = got
    assert got["e3"].ifindex == 2 and got["e4"].ifindex == 40 and "e8" not in got


# -- pod owners ----------------------------------------------------------------------------------------


def test_a_cni_owner_check_during_garbage_collection_waits_for_the_list_not_the_releases(
        tmp_path: Path) -> None:
    """GC releases in batches, and each release detaches a program (an RCU grace
    period under the rtnl lock).  A CNI ADD arriving meanwhile needs a fresh List;
    it must not also wait for the releases of the List before."""
    import asyncio

    from cni_server.allocation import Allocation
    from plugin.owners import Owners
    from tests.fake_kubelet import running

    release_started, release_may_end = asyncio.Event(), asyncio.Event()
    released: list[str] = []

    class Registry:
        def __init__(self) -> None:
            self.allocations = {
                "gone": Allocation("gone", {}, frozenset(), pool="pool1", owner="ns/old/app"),
                "new": Allocation("new", {}, frozenset(), pool="pool1"),
            }
            self.allocations["gone"].netdevs = {"p0": None}  # type: ignore[dict-item]
            self.allocations["new"].netdevs = {"p1": None}  # type: ignore[dict-item]

        def set_owner(self, alloc_id: str, owner: str, hostnames: frozenset[str]) -> None:
            self.allocations[alloc_id].owner = owner

        async def release(self, alloc_id: str) -> None:
            release_started.set()
            await release_may_end.wait()
            released.append(alloc_id)
            del self.allocations[alloc_id]

    async def body(sock: Path) -> tuple[str, list[str], list[str]]:
        registry = Registry()
        owners = Owners(registry, sock, {"pool1": "afxdp/pool1"},  # type: ignore[arg-type]
                        gc_interval=60, gc_grace=300)
        gc = asyncio.create_task(owners.refresh(collect=True))
        await asyncio.wait_for(release_started.wait(), 5)
        why = await asyncio.wait_for(
            owners.check_pod(registry.allocations["new"], "ns", "pod-b"), 5)
        during = list(released)  # the owner check came back with the release under way
        release_may_end.set()
        await gc
        for _ in range(500):
            if released:
                break
            await asyncio.sleep(0.01)
        await owners.stop()
        return why, during, released

    with running(tmp_path / "dp", tmp_path / "podres.sock") as kubelet:
        kubelet.add_pod("ns", "pod-b", "afxdp/pool1", ["p1"])
        why, during, released_in_the_end = asyncio.run(body(tmp_path / "podres.sock"))
    assert why == ""  # pod-b holds p1, per the fresh List
    assert during == [] and released_in_the_end == ["gone"]


def test_a_cni_owner_check_takes_the_pod_from_a_list_under_way_without_one_of_its_own(
        tmp_path: Path) -> None:
    """The List asked for a moment after Allocate is under way when the pod's CNI ADD
    comes: if it names the pod, the ADD needs no List of its own (kubelet allows
    all its PodResources clients about 100 a second)."""
    import asyncio

    from cni_server.allocation import Allocation
    from plugin.owners import Owners
    from tests.fake_kubelet import running

    class Registry:
        def __init__(self) -> None:
            self.allocations = {"new": Allocation("new", {}, frozenset(), pool="pool1")}
            self.allocations["new"].netdevs = {"p1": None}  # type: ignore[dict-item]

        def set_owner(self, alloc_id: str, owner: str, hostnames: frozenset[str]) -> None:
            self.allocations[alloc_id].owner = owner

    async def body(sock: Path, kubelet: Any) -> str:
        registry = Registry()
        owners = Owners(registry, sock, {"pool1": "afxdp/pool1"},  # type: ignore[arg-type]
                        gc_interval=60, gc_grace=300)
        under_way = asyncio.ensure_future(owners.refresh())  # e.g. allocated()'s first ask
        while kubelet.list_calls == 0:  # kubelet is answering it (slowly)
            await asyncio.sleep(0.005)
        why = await asyncio.wait_for(
            owners.check_pod(registry.allocations["new"], "ns", "pod-b"), 5)
        await under_way
        await owners.stop()
        return why

    with running(tmp_path / "dp", tmp_path / "podres.sock") as kubelet:
        kubelet.add_pod("ns", "pod-b", "afxdp/pool1", ["p1"])
        kubelet.list_delay = 0.3
        why = asyncio.run(body(tmp_path / "podres.sock", kubelet))
        lists = kubelet.list_calls
    assert why == "" and lists == 1

    # A List that began before the pod was admitted cannot name it: one of its own.
    with running(tmp_path / "dp2", tmp_path / "podres2.sock") as kubelet:
        kubelet.list_delay = 0.3

        async def admitted_meanwhile() -> str:
            checking = asyncio.ensure_future(body(tmp_path / "podres2.sock", kubelet))
            while kubelet.list_calls == 0:
                await asyncio.sleep(0.005)
            kubelet.add_pod("ns", "pod-b", "afxdp/pool1", ["p1"])
            return await checking

        why = asyncio.run(admitted_meanwhile())
        lists = kubelet.list_calls
    assert why == "" and lists == 2


# -- the start-up dump and IPv6 ---------------------------------------------------------------------

LINK_LOCAL_ONLY = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n")
LINK_ROUTES = (
    "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0\n"
    # each table's own unreachable entry, which procfs shows as ::/0
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n")
DEFAULT_ROUTE = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n")


@pytest.mark.parametrize("addresses,routes,expect", [
    (LINK_LOCAL_ONLY, LINK_ROUTES, (False, False)),
    (LINK_LOCAL_ONLY + "fd000000000000000000000000000002 04 40 00 82     eth0\n", LINK_ROUTES,
     (True, False)),
    (LINK_LOCAL_ONLY, LINK_ROUTES + DEFAULT_ROUTE, (False, True)),
    (None, None, (True, True)),  # procfs cannot tell: dump as before
])
def test_the_dump_skips_ipv6_only_when_procfs_shows_nothing_it_would_keep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, addresses: str | None,
        routes: str | None, expect: tuple[bool, bool]) -> None:
    from plugin import discovery
    if addresses is not None and routes is not None:
        (tmp_path / "if_inet6").write_text(addresses)
        (tmp_path / "ipv6_route").write_text(routes)
    monkeypatch.setattr(discovery, "PROC_NET", tmp_path)
    assert discovery._ipv6_worth_dumping() == expect


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _newlink(attrs: bytes, ifindex: int = 7, flags: int = 0x1043) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, ifindex, flags, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 16, 2, 1, 0) + body


def test_link_facts_reads_name_mac_kind_operstate_and_xdp_program_from_the_bytes() -> None:
    msg = _newlink(_nla(3, b"eth7\0") + _nla(1, bytes([2, 0xAB, 0, 0, 0, 7]))
                   + _nla(13, b"\0" * 4) + _nla(16, b"\x06")
                   + _nla(18, _nla(1, b"veth\0") + _nla(2, b"\0" * 8))
                   + _nla(43, _nla(2, b"\x01") + _nla(4, struct.pack("=I", 42))))
    assert link_facts(b"junk" + msg, 4, len(msg)) == (
        "eth7", 7, "02:ab:00:00:00:07", "veth", 0x1043, "UP", 42)


def test_link_facts_stops_at_an_attribute_that_cannot_be_one() -> None:
    msg = _newlink(_nla(3, b"eth7\0") + struct.pack("=HH", 2, 1) + _nla(16, b"\x06"))
    assert link_facts(msg, 0, len(msg)) == ("eth7", 7, "", "", 0x1043, "", 0)
    cut = _newlink(_nla(3, b"eth7\0") + _nla(43, _nla(4, struct.pack("=I", 42))))
    assert link_facts(cut, 0, len(cut) - 2)[6] == 0  # the program id runs past the end


def test_podresources_keeps_one_channel_and_lists_again_as_soon_as_kubelet_is_back(
        tmp_path: Path) -> None:
    """One channel serves every List.  A List while kubelet is down fails; the first
    one after kubelet is back answers (a new channel, not the old one's reconnect
    backoff of about a second)."""
    import asyncio
    import threading

    import grpc

    from plugin.owners import PodResources
    from tests.fake_kubelet import running

    async def body(kubelet: Any) -> tuple[list[Any], bool, str, list[Any]]:
        client = PodResources(tmp_path / "podres.sock")
        try:
            before = await client.holders()
            channel = client._channel
            await client.holders()
            kept = client._channel is channel
            restart = threading.Thread(target=kubelet.restart, args=(0.5,))
            restart.start()
            await asyncio.sleep(0.1)
            try:
                await client.holders(timeout=5)
                down = "answered"
            except grpc.aio.AioRpcError as e:
                down = e.code().name
            await asyncio.to_thread(restart.join)
            kubelet.add_pod("ns", "pod-c", "afxdp/pool1", ["p2"])
            after = await client.holders(timeout=5)
        finally:
            await client.close()
        return before, kept, down, after

    with running(tmp_path / "dp", tmp_path / "podres.sock") as kubelet:
        kubelet.add_pod("ns", "pod-b", "afxdp/pool1", ["p1"])
        before, kept, down, after = asyncio.run(body(kubelet))
    assert [(h.pod, h.device_ids) for h in before] == [("pod-b", frozenset({"p1"}))]
    assert kept and down == "UNAVAILABLE"
    assert sorted((h.pod, h.device_ids) for h in after) == [
        ("pod-b", frozenset({"p1"})), ("pod-c", frozenset({"p2"}))]


def test_a_burst_of_events_is_one_reclassification_and_a_steady_stream_is_not_starved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The inventory reclassifies once events pause (DEBOUNCE), and at the latest
    MAX_DELAY after a burst's first event.  (Scaled up here, so that a slow machine's
    pauses between the test's own events do not split a burst.)"""
    import asyncio

    from plugin import inventory
    from plugin.config import PluginConfig, PoolConfig

    monkeypatch.setattr(inventory, "DEBOUNCE", 0.2)
    monkeypatch.setattr(inventory, "MAX_DELAY", 1.0)

    class Registry:
        on_changed: list[Callable[[str], None]] = []

        def any_moving(self) -> bool:
            return False

    async def body() -> tuple[int, int, int]:
        inv = inventory.Inventory(PluginConfig(pools=[PoolConfig("pool1")]),
                                  Registry(), lambda _pools: asyncio.sleep(0))  # type: ignore[arg-type]
        runs: list[float] = []

        async def reclassify(*, strict: bool = False) -> set[str]:
            runs.append(asyncio.get_running_loop().time())
            return set()

        inv.reclassify = reclassify  # type: ignore[method-assign]
        task = asyncio.create_task(inv._on_events())

        async def events(seconds: float) -> None:
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end:
                inv._kick.set()
                await asyncio.sleep(0.02)

        await events(0.3)  # a burst shorter than MAX_DELAY
        during_burst = len(runs)
        await asyncio.sleep(0.5)
        after_burst = len(runs)
        await events(2.5)  # a stream that never pauses
        during_stream = len(runs) - after_burst
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return during_burst, after_burst, during_stream

    during_burst, after_burst, during_stream = asyncio.run(body())
    assert (during_burst, after_burst) == (0, 1)
    assert during_stream >= 2


def test_reclassification_waits_for_a_cni_move_under_way_but_not_past_max_delay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CNI ADD or DEL's own move makes link events; the reclassification they
    bring waits until the operation is over (its end kicks the inventory), so it
    does not hold up the pod's next step on the loop.  An operation that never
    ends holds it back at most MAX_DELAY."""
    import asyncio

    from plugin import inventory
    from plugin.config import PluginConfig, PoolConfig

    monkeypatch.setattr(inventory, "DEBOUNCE", 0.05)
    monkeypatch.setattr(inventory, "MAX_DELAY", 1.0)

    class Registry:
        on_changed: list[Callable[[str], None]] = []
        moving = True

        def any_moving(self) -> bool:
            return self.moving

    registry = Registry()

    async def body() -> tuple[int, int, list[float]]:
        loop = asyncio.get_running_loop()
        inv = inventory.Inventory(PluginConfig(pools=[PoolConfig("pool1")]),
                                  registry, lambda _pools: asyncio.sleep(0))  # type: ignore[arg-type]
        runs: list[float] = []

        async def reclassify(*, strict: bool = False) -> set[str]:
            runs.append(loop.time())
            return set()

        inv.reclassify = reclassify  # type: ignore[method-assign]
        task = asyncio.create_task(inv._on_events())
        inv._kick.set()  # the move's first event
        await asyncio.sleep(0.4)  # eight quiet DEBOUNCE periods, the move still on
        during_move = len(runs)
        registry.moving = False
        inv._kick.set()  # as Registry.moving's end does
        await asyncio.sleep(0.3)
        after_move = len(runs)
        registry.moving = True  # one that never ends
        stuck_from = loop.time()
        inv._kick.set()
        await asyncio.sleep(2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return during_move, after_move, [t - stuck_from for t in runs[after_move:]]

    during_move, after_move, stuck = asyncio.run(body())
    assert (during_move, after_move) == (0, 1)
    assert len(stuck) == 1 and stuck[0] >= 0.9  # at MAX_DELAY, not at a DEBOUNCE


def test_events_dropped_by_the_kernel_are_counted_and_bring_a_rescan_after_them() -> None:
    """One rescan for a loss; losses while it runs (its dump may predate them) bring
    one more after it, not one each."""
    import asyncio
    from types import SimpleNamespace

    from cni_server.metrics import Metrics
    from plugin import inventory
    from plugin.config import PluginConfig, PoolConfig

    metrics = Metrics()
    registry = SimpleNamespace(on_changed=[], server=SimpleNamespace(metrics=metrics))

    async def body() -> tuple[int, int]:
        inv = inventory.Inventory(PluginConfig(pools=[PoolConfig("pool1")]),
                                  registry, lambda _pools: asyncio.sleep(0))  # type: ignore[arg-type]
        rescans = 0
        may_end = asyncio.Event()

        async def rescan() -> None:
            nonlocal rescans
            rescans += 1
            await may_end.wait()

        inv._safe_rescan = rescan  # type: ignore[method-assign]
        for _ in range(3):  # a loss, then two more while its rescan runs
            inv._events_lost()
            await asyncio.sleep(0)
        may_end.set()
        for _ in range(5):
            await asyncio.sleep(0)
        after_burst = rescans
        inv._events_lost()  # a later loss: another
        for _ in range(5):
            await asyncio.sleep(0)
        await inv.stop()
        return after_burst, rescans

    assert asyncio.run(body()) == (2, 3)
    assert metrics.netlink_events_lost._value.get() == 4


def test_podresources_lists_go_at_once_in_a_burst_of_five_then_twenty_a_second() -> None:
    from plugin.owners import ListBudget

    now = [100.0]
    budget = ListBudget(rate=20.0, burst=5, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [0.0] * 5  # pods starting together
    assert [round(budget.take(), 3) for _ in range(2)] == [0.05, 0.1]  # then in turn
    now[0] += 0.15  # the two have had their turn; one more List's worth came since
    assert [round(budget.take(), 3) for _ in range(2)] == [0.0, 0.05]
    now[0] += 10.0  # a quiet while refills the burst, not more
    assert [budget.take() for _ in range(5)] == [0.0] * 5 and budget.take() > 0
