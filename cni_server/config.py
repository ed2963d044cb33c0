"""Node daemon configuration: one model for both front ends, validated once.

``NodeSettings`` holds what every node daemon takes (logs, control socket,
metrics, connection limits, the program object); ``StandaloneConfig`` (``afxdp
serve``) and ``plugin.config.PluginConfig`` (``afxdp daemon``) extend it.  Each
is read from camelCase keys through a table of :class:`Setting` (key, reader,
field), so both read a shared key the same way: the same type, the same limits,
the same error.  Every error names the field path and what was expected, e.g.
``maxConnectionsPerSocket: 300 exceeds maxConnections (200)``.  Paths in a file
must be absolute (a daemon's working directory means nothing); flags given on the
command line are made absolute against the working directory.  A key given with
no value (``key:`` in YAML) keeps its default.

The standalone settings come from ``afxdp serve`` flags or a YAML file
(``--config``); flags override the file::

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
class NodeSettings:
    """What every node daemon takes, whatever its front end."""

    log_level: str = "info"
    log_format: str = "kv"
    control_socket: Path | None = DEFAULT_CONTROL_SOCKET
    metrics_address: str = ""  # host:port for /metrics, /healthz, /readyz; "": off
    ready_file: Path | None = None
    check_peer_netns: bool = True
    handshake_spin_us: int = 50  # see server.Limits.handshake_spin; 0: off
    max_connections: int = 4096  # handout connections over all sockets
    max_connections_per_socket: int = 128
    bpf_object: Path | None = None  # None: the built afxdp_redirect object


@dataclass
class StandaloneConfig(NodeSettings):
    netdevs: list[str] = field(default_factory=list)
    socket_dir: Path = DEFAULT_SOCKET_DIR
    allow_hosts: list[str] = field(default_factory=lambda: [socket.gethostname()])
    xdp_mode: XdpMode = XdpMode.AUTO
    socket_mode: int = 0o660
    socket_uid: int = -1
    socket_gid: int = -1
    pin_dir: Path | None = None
    force_replace: bool = False
    idle_timeout: float = 30.0
    program_name: str = ""  # the program in bpf_object; "": afxdp_redirect
    watch_interval: float = 1.0  # seconds between checks that our programs are attached; 0: off
    allow_unbound_xsk: bool = False  # /xsk_socket hands out unbound sockets (see docs/security.md)
    max_umem_bytes: int = DEFAULT_UMEM_LIMIT  # per /xsk_bound_socket


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


def boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not true or false")
    return value


def number(value: object, where: str, *, integer: bool = False, minimum: float = 0,
           above: bool = False) -> Any:
    """A number (an integer if asked) >= ``minimum`` (> with ``above``); never a bool."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{where}: {value!r} is not {'an integer' if integer else 'a number'}")
    if value < minimum or (above and value == minimum):
        raise ConfigError(f"{where}: {value!r} must be {'>' if above else '>='} {minimum}")
    return value


def seconds(value: object, where: str) -> float:
    """A duration in seconds, > 0."""
    return float(number(value, where, above=True))


def path(value: object, where: str) -> Path:
    """An absolute path (a daemon's working directory means nothing)."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{where}: {value!r} is not an absolute path")
    return Path(value)


def metrics_address(value: object, where: str) -> str:
    """``host:port``, or "" for off."""
    return "" if value == "" else address(value, where)


Reader = Callable[[object, str], Any]


def one_of(options: tuple[str, ...]) -> Reader:
    return lambda value, where: choice(value, where, options)


@dataclass(frozen=True)
class Setting:
    """One top-level key: how its value is read and which field(s) it sets.

    ``read`` None: a key the validator reads itself (it needs more than its value);
    ``fields`` empty: the key in snake_case; several: ``read`` returns one value each.
    """

    key: str
    read: Reader | None
    fields: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return self.fields or (re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(),
                                      self.key),)


def check_known(raw: Mapping[str, object], table: Sequence[Setting]) -> None:
    known = {s.key for s in table}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")


def read_settings(cfg: NodeSettings, raw: Mapping[str, object], table: Sequence[Setting]
                  ) -> None:
    """Set ``cfg``'s fields from ``raw`` through ``table``; ConfigError naming the key."""
    check_known(raw, table)
    by_key = {s.key: s for s in table}
    for key, value in raw.items():
        setting = by_key[key]
        if value is None or setting.read is None:
            continue
        names = setting.names()
        got = setting.read(value, key)
        for name, v in zip(names, got if len(names) > 1 else (got,), strict=True):
            setattr(cfg, name, v)
    check_connection_limits(cfg.max_connections, cfg.max_connections_per_socket)


def netdev_names(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {value!r} must be a non-empty list of interface names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not valid_netdev_name(name):
            raise ConfigError(f"{where}[{i}]: {name!r} is not a valid interface name")
    dupes = sorted({n for n in value if value.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: {', '.join(dupes)} listed more than once")
    return list(value)


def hostnames(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {value!r} is not a list of hostnames")
    for i, h in enumerate(value):
        if not isinstance(h, str) or not valid_hostname(h):
            raise ConfigError(f"{where}[{i}]: {h!r} is not a valid hostname")
    if not value:
        raise ConfigError(f"{where}: must name at least one hostname")
    return list(value)


def xdp_mode(value: object, where: str) -> XdpMode:
    try:
        return XdpMode(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not one of auto, native, skb") from None


def program_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        raise ConfigError(f"{where}: {value!r} is not a BPF program (function) name")
    return value


def watch_interval(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number of seconds (0: off)")
    if value < 0:
        raise ConfigError(f"{where}: {value!r} must be >= 0 (0 turns the watch off)")
    return float(value)


def connection_limit(value: object, where: str) -> int:
    """``maxConnections`` / ``maxConnectionsPerSocket``: a positive integer."""
    n: int = number(value, where, integer=True, above=True)
    return n


def owner(value: object, where: str) -> tuple[int, int]:
    return parse_owner(str(value), where)


# Every node daemon's keys: read the same way by both front ends.
NODE_SETTINGS: tuple[Setting, ...] = (
    Setting("logLevel", one_of(LOG_LEVELS)),
    Setting("logFormat", one_of(LOG_FORMATS)),
    Setting("controlSocket", path),
    Setting("metricsAddress", metrics_address),
    Setting("readyFile", path),
    Setting("checkPeerNetns", boolean),
    Setting("handshakeSpinUs", lambda v, w: handshake_spin_us(v, w)),
    Setting("maxConnections", connection_limit),
    Setting("maxConnectionsPerSocket", connection_limit),
    Setting("bpfObject", path),
)

STANDALONE_SETTINGS: tuple[Setting, ...] = (
    *NODE_SETTINGS,
    Setting("netdevs", netdev_names),
    Setting("socketDir", path),
    Setting("allowHosts", hostnames),
    Setting("xdpMode", xdp_mode),
    Setting("socketMode", lambda v, w: parse_mode(v, w)),
    Setting("socketOwner", owner, ("socket_uid", "socket_gid")),
    Setting("pinDir", path),
    Setting("forceReplace", boolean),
    Setting("idleTimeout", seconds),
    Setting("programName", program_name),
    Setting("watchInterval", watch_interval),
    Setting("allowUnboundXsk", boolean),
    Setting("maxUmemBytes", lambda v, w: umem_limit(v, w)),
)


def validate(raw: dict[str, Any], source: str = "config") -> StandaloneConfig:
    """Build a StandaloneConfig from camelCase keys; every error names its field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(raw).__name__}")
    check_known(raw, STANDALONE_SETTINGS)
    if raw.get("netdevs") is None:
        raise ConfigError("netdevs: no netdev to serve: give --netdev NAME (repeat it for "
                          "several), or list them under netdevs: in the --config file")
    cfg = StandaloneConfig()
    read_settings(cfg, raw, STANDALONE_SETTINGS)
    return cfg


def check_connection_limits(total: int, per_socket: int) -> None:
    if per_socket > total:
        raise ConfigError(f"maxConnectionsPerSocket: {per_socket} exceeds "
                          f"maxConnections ({total})")


MAX_HANDSHAKE_SPIN_US = 1000


def int_in(value: object, where: str, low: int, high: int, unit: str, note: str = "") -> int:
    """A whole number of ``unit`` from ``low`` to ``high`` (never a bool); ``note``
    ends the out-of-range message."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number of {unit}, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range ({low} to {high} {unit}{note})")
    return value


def umem_limit(value: object, where: str) -> int:
    """Bytes of UMEM one /xsk_bound_socket may ask for: 4 KiB .. 4 GiB."""
    return int_in(value, where, 4096, 2**32, "bytes")


def handshake_spin_us(value: object, where: str) -> int:
    """Microseconds the handout server polls for a handshake's next request (0: off)."""
    return int_in(value, where, 0, MAX_HANDSHAKE_SPIN_US, "microseconds",
                  "; 0 turns the spin off")


def read_yaml(path: Path) -> Any:
    """A YAML config file's document, for a validator (both daemons' files)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def load_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (validation happens in :func:`validate`)."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data
