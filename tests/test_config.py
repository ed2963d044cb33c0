"""Standalone configuration: defaults, YAML, and errors that name the field."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from bpf.program import XdpMode
from cni_server.config import ConfigError, load_file, parse_owner, validate


def test_defaults_serve_dpdks_default_path_for_this_host() -> None:
    cfg = validate({"netdevs": ["v0"]})
    assert cfg.socket_dir == Path("/tmp/afxdp_dp")
    assert cfg.allow_hosts == [socket.gethostname()]
    assert (cfg.xdp_mode, cfg.socket_mode, cfg.check_peer_netns) == (XdpMode.AUTO, 0o660, True)
    assert (cfg.socket_uid, cfg.socket_gid, cfg.pin_dir) == (-1, -1, None)


def test_full_yaml_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "netdevs: [v0, v1]\nsocketDir: /run/x\nallowHosts: [h1, h2]\nxdpMode: skb\n"
        "socketMode: '0600'\nsocketOwner: '65534:65534'\npinDir: /sys/fs/bpf/afxdp\n"
        "idleTimeout: 2.5\nmaxConnections: 10\nmaxConnectionsPerSocket: 5\n"
        "checkPeerNetns: false\nforceReplace: true\nlogFormat: json\nhandshakeSpinUs: 0\n"
    )
    cfg = validate(load_file(f))
    assert cfg.netdevs == ["v0", "v1"] and cfg.socket_dir == Path("/run/x")
    assert cfg.allow_hosts == ["h1", "h2"] and cfg.xdp_mode is XdpMode.SKB
    assert (cfg.socket_mode, cfg.socket_uid, cfg.socket_gid) == (0o600, 65534, 65534)
    assert cfg.pin_dir == Path("/sys/fs/bpf/afxdp") and cfg.idle_timeout == 2.5
    assert (cfg.max_connections, cfg.max_connections_per_socket) == (10, 5)
    assert (cfg.check_peer_netns, cfg.force_replace, cfg.log_format) == (False, True, "json")
    assert cfg.handshake_spin_us == 0 and validate({"netdevs": ["v0"]}).handshake_spin_us == 50


def test_yaml_octal_integer_mode_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("netdevs: [v0]\nsocketMode: 0640\n")  # YAML 1.1 reads 0640 as octal
    assert validate(load_file(f)).socket_mode == 0o640


@pytest.mark.parametrize("raw,field", [
    ({}, "netdevs"),
    ({"netdevs": []}, "netdevs"),
    ({"netdevs": "v0"}, "netdevs"),
    ({"netdevs": ["eth 0"]}, "netdevs[0]"),
    ({"netdevs": ["v0", "a" * 16]}, "netdevs[1]"),
    ({"netdevs": ["v0", "v0"]}, "netdevs"),
    ({"netdevs": ["v0"], "programName": "1bad"}, "programName"),
    ({"netdevs": ["v0"], "programName": 7}, "programName"),
    ({"netdevs": ["v0"], "xdpMode": "fast"}, "xdpMode"),
    ({"netdevs": ["v0"], "socketMode": "rw-rw----"}, "socketMode"),
    ({"netdevs": ["v0"], "socketMode": "01777"}, "socketMode"),
    ({"netdevs": ["v0"], "socketOwner": "no-such-user-xyz"}, "socketOwner"),
    ({"netdevs": ["v0"], "allowHosts": ["bad host"]}, "allowHosts[0]"),
    ({"netdevs": ["v0"], "allowHosts": []}, "allowHosts"),
    ({"netdevs": ["v0"], "idleTimeout": 0}, "idleTimeout"),
    ({"netdevs": ["v0"], "idleTimeout": "soon"}, "idleTimeout"),
    ({"netdevs": ["v0"], "maxConnections": True}, "maxConnections"),
    ({"netdevs": ["v0"], "maxConnections": 5, "maxConnectionsPerSocket": 6},
     "maxConnectionsPerSocket"),
    ({"netdevs": ["v0"], "checkPeerNetns": "no"}, "checkPeerNetns"),
    ({"netdevs": ["v0"], "handshakeSpinUs": -1}, "handshakeSpinUs"),
    ({"netdevs": ["v0"], "handshakeSpinUs": 1001}, "handshakeSpinUs"),
    ({"netdevs": ["v0"], "handshakeSpinUs": 0.5}, "handshakeSpinUs"),
    ({"netdevs": ["v0"], "handshakeSpinUs": True}, "handshakeSpinUs"),
    ({"netdevs": ["v0"], "logLevel": "loud"}, "logLevel"),
    ({"netdevs": ["v0"], "socketDri": "/x"}, "socketDri"),
])
def test_bad_values_are_rejected_naming_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_unreadable_or_invalid_yaml_says_which_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("netdevs: [v0\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- v0\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_file(listy)


def test_owner_accepts_names_numbers_and_default_group() -> None:
    assert parse_owner("nobody", "x") == (65534, 65534)
    assert parse_owner("65534", "x") == (65534, 65534)
    assert parse_owner("0:65534", "x") == (0, 65534)
    assert parse_owner("root:nogroup", "x") == (0, 65534)


# -- one model for both daemons ----------------------------------------------------------------

def _both(extra: dict[str, Any]) -> list[Any]:
    """``extra`` read by the standalone and the Kubernetes validators."""
    from plugin.config import validate as validate_k8s
    out: list[Any] = []
    for build in (lambda: validate({"netdevs": ["v0"], **extra}),
                  lambda: validate_k8s({"pools": [{"name": "p", "drivers": ["ice"]}], **extra},
                                       node_name="n1")):
        try:
            out.append(build())
        except ConfigError as e:
            out.append(str(e))
    return out


@pytest.mark.parametrize("key,bad", [
    ("logLevel", "loud"), ("logFormat", "xml"), ("controlSocket", "run/c.sock"),
    ("metricsAddress", "nowhere"), ("readyFile", 5), ("checkPeerNetns", "no"),
    ("handshakeSpinUs", 1001), ("maxConnections", 0), ("maxConnectionsPerSocket", True),
    ("bpfObject", "prog.o"),
])
def test_both_daemons_refuse_a_shared_key_with_the_same_error(key: str, bad: object) -> None:
    standalone, k8s = _both({key: bad})
    assert isinstance(standalone, str) and standalone.startswith(f"{key}:"), standalone
    assert standalone == k8s


def test_both_daemons_read_every_shared_key_into_the_same_field() -> None:
    from cni_server.config import NODE_SETTINGS
    good = {"logLevel": "debug", "logFormat": "json", "controlSocket": "/run/x/c.sock",
            "metricsAddress": "", "readyFile": "/run/x/ready", "checkPeerNetns": False,
            "handshakeSpinUs": 0, "maxConnections": 300, "maxConnectionsPerSocket": 20,
            "bpfObject": "/opt/prog.o"}
    assert set(good) == {s.key for s in NODE_SETTINGS}
    standalone, k8s = _both(good)
    for setting in NODE_SETTINGS:
        (name,) = setting.names()
        assert getattr(standalone, name) == getattr(k8s, name), name
    assert (standalone.metrics_address, standalone.max_connections,
            standalone.control_socket) == ("", 300, Path("/run/x/c.sock"))


def test_a_relative_path_is_refused_in_a_file_and_made_absolute_from_a_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cni_server.cli import _serve_overrides, build_parser
    with pytest.raises(ConfigError, match="socketDir: 'sock' is not an absolute path"):
        validate({"netdevs": ["v0"], "socketDir": "sock"})
    monkeypatch.chdir(tmp_path)
    a = build_parser().parse_args(["serve", "--netdev", "v0", "--socket-dir", "sock",
                                   "--ready-file", "r.json"])
    cfg = validate(_serve_overrides(a))
    assert (cfg.socket_dir, cfg.ready_file) == (tmp_path / "sock", tmp_path / "r.json")
