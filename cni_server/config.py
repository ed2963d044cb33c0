"""Standalone daemon configuration: typed, validated once, errors name the field path.

The same settings come from ``afxdp serve`` flags or a YAML file (``--config``);
flags given on the command line override the file.  YAML keys are camelCase,
as in the Kubernetes configuration::

    netdevs: [v0, v1]
    socketDir: /tmp/afxdp_dp
    allowHosts: [my-host]
    xdpMode: auto            # auto | native | skb
    socketMode: "0660"
    socketOwner: "65534:65534"
    pinDir: /sys/fs/bpf/afxdp
"""

from __future__ import annotations

import grp
import pwd
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bpf.program import XdpMode
from cni_server.protocol import DEFAULT_UMEM_LIMIT, valid_hostname, valid_netdev_name

DEFAULT_SOCKET_DIR = Path("/tmp/afxdp_dp")  # DPDK's default dp_path root
DEFAULT_CONTROL_SOCKET = Path("/run/afxdp/control.sock")
_OWNER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field path."""


@dataclass
class StandaloneConfig:
    netdevs: list[str]
    socket_dir: Path = DEFAULT_SOCKET_DIR
    allow_hosts: list[str] = field(default_factory=lambda: [socket.gethostname()])
    xdp_mode: XdpMode = XdpMode.AUTO
    socket_mode: int = 0o660
    socket_uid: int = -1
    socket_gid: int = -1
    pin_dir: Path | None = None
    control_socket: Path | None = DEFAULT_CONTROL_SOCKET
    force_replace: bool = False
    check_peer_netns: bool = True
    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_socket: int = 128
    handshake_spin_us: int = 50  # see server.Limits.handshake_spin; 0: off
    bpf_object: Path | None = None
    program_name: str = ""  # the program in bpf_object; "": afxdp_redirect
    ready_file: Path | None = None
    log_level: str = "info"
    log_format: str = "kv"
    metrics_address: str = ""  # host:port for /metrics, /healthz, /readyz; "": off
    watch_interval: float = 1.0  # seconds between checks that our programs are attached; 0: off
    allow_unbound_xsk: bool = False  # /xsk_socket hands out unbound sockets (see docs/security.md)
    max_umem_bytes: int = DEFAULT_UMEM_LIMIT  # per /xsk_bound_socket


# YAML key -> (dataclass field, parser)
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def parse_owner(text: str, where: str) -> tuple[int, int]:
    """'UID[:GID]' with numbers or names -> (uid, gid); gid defaults to the user's group."""
    if not _OWNER_RE.fullmatch(str(text)):
        raise ConfigError(f"{where}: {text!r} is not USER[:GROUP] (a name or a number each, "
                          "e.g. 1000:1000 or afxdp:afxdp)")
    user, _, group = str(text).partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            try:
                default_gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                default_gid = uid
        else:
            entry = pwd.getpwnam(user)
            uid, default_gid = entry.pw_uid, entry.pw_gid
        if not group:
            gid = default_gid
        elif group.isdigit():
            gid = int(group)
        else:
            gid = grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ConfigError(f"{where}: {text!r}: no such user or group") from e
    return uid, gid


def parse_mode(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a file mode")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{1,4}", value):
        mode = int(value.replace("o", ""), 8)
    else:
        raise ConfigError(f"{where}: {value!r} is not an octal file mode such as '0660'")
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: {value!r} is out of range (0000..0777)")
    return mode


def _want(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {value!r} is not {what}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {value!r} is not {what}")
    return value


def choice(value: object, where: str, options: tuple[str, ...]) -> str:
    """``value`` if it is one of ``options``, else a ConfigError naming the field."""
    if value not in options:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(options)}")
    return str(value)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")


def address(value: object, where: str) -> str:
    """'host:port' (host may be empty or [v6]), port 0..65535."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: {value!r} is not an address like 0.0.0.0:9402")
    return f"{host}:{int(port)}"


def _positive(value: object, where: str, *, real: bool = False) -> Any:
    v = _want(value, (int, float) if real else int, where,
              "a positive number" if real else "a positive integer")
    if v <= 0:
        raise ConfigError(f"{where}: {value!r} must be > 0")
    return v


def _path(value: object, where: str) -> Path:
    text = _want(value, str, where, "a path")
    if not text or "\0" in text:
        raise ConfigError(f"{where}: {value!r} is not a valid path")
    return Path(text)


def validate(raw: dict[str, Any], source: str = "config") -> StandaloneConfig:
    """Build a StandaloneConfig from camelCase keys; every error names its field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(raw).__name__}")
    known = {_camel(f.name): f.name for f in fields(StandaloneConfig)
             if f.name not in ("socket_uid", "socket_gid")}  # both come from socketOwner
    known["socketOwner"] = "socket_owner"
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
    netdevs = raw.get("netdevs")
    if netdevs is None:
        raise ConfigError("netdevs: no netdev to serve: give --netdev NAME (repeat it for "
                          "several), or list them under netdevs: in the --config file")
    if not isinstance(netdevs, list) or not netdevs:
        raise ConfigError(f"netdevs: {netdevs!r} must be a non-empty list of interface names")
    for i, name in enumerate(netdevs):
        if not isinstance(name, str) or not valid_netdev_name(name):
            raise ConfigError(f"netdevs[{i}]: {name!r} is not a valid interface name")
    dupes = sorted({n for n in netdevs if netdevs.count(n) > 1})
    if dupes:
        raise ConfigError(f"netdevs: {', '.join(dupes)} listed more than once")
    cfg = StandaloneConfig(netdevs=list(netdevs))
    for key, value in raw.items():
        if value is None:
            continue
        where = key
        if key == "socketDir":
            cfg.socket_dir = _path(value, where)
        elif key == "allowHosts":
            hosts = _want(value, list, where, "a list of hostnames")
            for i, h in enumerate(hosts):
                if not isinstance(h, str) or not valid_hostname(h):
                    raise ConfigError(f"{where}[{i}]: {h!r} is not a valid hostname")
            if not hosts:
                raise ConfigError(f"{where}: must name at least one hostname")
            cfg.allow_hosts = list(hosts)
        elif key == "xdpMode":
            try:
                cfg.xdp_mode = XdpMode(value)
            except ValueError:
                raise ConfigError(f"{where}: {value!r} is not one of auto, native, skb") from None
        elif key == "socketMode":
            cfg.socket_mode = parse_mode(value, where)
        elif key == "socketOwner":
            cfg.socket_uid, cfg.socket_gid = parse_owner(str(value), where)
        elif key in ("pinDir", "bpfObject", "readyFile", "controlSocket"):
            setattr(cfg, known[key], _path(value, where))
        elif key == "programName":
            name = _want(value, str, where, "a BPF program (function) name")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise ConfigError(f"{where}: {name!r} is not a BPF program (function) name")
            cfg.program_name = name
        elif key == "maxUmemBytes":
            cfg.max_umem_bytes = umem_limit(value, where)
        elif key in ("forceReplace", "checkPeerNetns", "allowUnboundXsk"):
            setattr(cfg, known[key], _want(value, bool, where, "true or false"))
        elif key == "idleTimeout":
            cfg.idle_timeout = float(_positive(value, where, real=True))
        elif key == "watchInterval":
            interval = _want(value, (int, float), where, "a number of seconds (0: off)")
            if interval < 0:
                raise ConfigError(f"{where}: {value!r} must be >= 0 (0 turns the watch off)")
            cfg.watch_interval = float(interval)
        elif key in ("maxConnections", "maxConnectionsPerSocket"):
            setattr(cfg, known[key], connection_limit(value, where))
        elif key == "handshakeSpinUs":
            cfg.handshake_spin_us = handshake_spin_us(value, where)
        elif key == "logLevel":
            cfg.log_level = choice(value, where, LOG_LEVELS)
        elif key == "logFormat":
            cfg.log_format = choice(value, where, LOG_FORMATS)
        elif key == "metricsAddress":
            cfg.metrics_address = address(value, where)
    check_connection_limits(cfg.max_connections, cfg.max_connections_per_socket)
    return cfg


def connection_limit(value: object, where: str) -> int:
    """``maxConnections`` / ``maxConnectionsPerSocket`` (both daemons)."""
    n: int = _positive(value, where)
    return n


def check_connection_limits(total: int, per_socket: int) -> None:
    if per_socket > total:
        raise ConfigError(f"maxConnectionsPerSocket: {per_socket} exceeds "
                          f"maxConnections ({total})")


MAX_HANDSHAKE_SPIN_US = 1000


def umem_limit(value: object, where: str) -> int:
    """Bytes of UMEM one /xsk_bound_socket may ask for: 4 KiB .. 4 GiB."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a number of bytes, got {value!r}")
    if not 4096 <= value <= 2**32:
        raise ConfigError(f"{where}: {value} is out of range (4096 to {2**32} bytes)")
    return value


def handshake_spin_us(value: object, where: str) -> int:
    """Microseconds the handout server polls for a handshake's next request (0: off)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer number of microseconds, got {value!r}")
    if not 0 <= value <= MAX_HANDSHAKE_SPIN_US:
        raise ConfigError(f"{where}: {value} is out of range (0 to {MAX_HANDSHAKE_SPIN_US} "
                          "microseconds; 0 turns the spin off)")
    return value


def load_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (validation happens in :func:`validate`)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data
