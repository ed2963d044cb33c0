"""An allocation's spec: everything needed to (re-)create it, persisted as JSON.

Layout of one allocation (``socket_base`` and ``pin_base`` come from the spec)::

    <socket_base>/<netdev>/afxdp.sock    served socket (unless serve_socket is false)
    <socket_base>/<netdev>/xsks_map      empty file: mount point for the pin (pin_placeholder)
    <pin_base>/<netdev>/xsks_map         pinned XSKMAP (when pin_base is set)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bpf.program import PROGRAM_NAME, ProgramSpec, map_keys_from
from cni_server.programs import ProgramChoice
from cni_server.protocol import DEFAULT_UMEM_LIMIT, valid_netdev_name

SOCKET_NAME = "afxdp.sock"
PIN_NAME = "xsks_map"


def program_choice(name: str = "", obj: str = "", source: str = "", headers: str = "",
                   map_keys: dict[str, list[int]] | None = None) -> ProgramChoice:
    """The program a spec's (or a pool's) program fields name; "" fields: ours."""
    def path(text: str) -> Path | None:
        return Path(text) if text else None

    spec = ProgramSpec(name or PROGRAM_NAME, path(obj), path(source), path(headers))
    return ProgramChoice(spec, map_keys_from(map_keys or {}))


@dataclass(frozen=True)
class AllocationSpec:
    """Everything needed to (re-)create an allocation; persisted as JSON."""

    id: str
    netdevs: tuple[str, ...]
    hostnames: frozenset[str]
    socket_base: Path
    pin_base: Path | None = None
    serve_socket: bool = True
    pin_placeholder: bool = False
    own_socket_base: bool = False  # socket_base is the allocation's own directory
    xdp_mode: str = "auto"
    queues: int = 0
    uid: int = -1
    gid: int = -1
    mode: int = 0o660
    check_peer_netns: bool = True
    pool: str = ""
    owner: str = ""
    idle_timeout: float = 0.0
    allow_unbound_xsk: bool = False  # /xsk_socket hands out unbound sockets (opt-in)
    # The pool's netdevs go into their pods through CNI ADD: nothing of the
    # allocation (map, socket, pin) is handed out while a netdev is not there.
    await_cni: bool = False
    umem_limit: int = DEFAULT_UMEM_LIMIT  # bytes one /xsk_bound_socket may ask for
    # A custom XDP program (pool setting): its BPF object or C source (bcc) and
    # program name; "" for ours.
    program_object: str = ""
    program_name: str = ""
    program_source: str = ""
    program_kernel_headers: str = ""
    program_map_keys: dict[str, list[int]] = field(default_factory=dict)
    # Virtual devices (pool setting): the pair kind ("veth"/"netkit") the registry
    # creates for each netdev, "" for real netdevs; the bridge for their node ends.
    virtual_kind: str = ""
    virtual_bridge: str = ""
    # netdev -> where CNI ADD put it: {"netns": path, "ifname": name there, "container_id": id}
    attached: dict[str, dict[str, str]] = field(default_factory=dict)

    def socket_dir(self, netdev: str) -> Path:
        return self.socket_base / netdev

    def socket_paths(self) -> tuple[Path, ...]:
        if not self.serve_socket:
            return ()
        return tuple(self.socket_dir(n) / SOCKET_NAME for n in self.netdevs)

    def program_choice(self) -> ProgramChoice:
        return program_choice(self.program_name, self.program_object, self.program_source,
                              self.program_kernel_headers, self.program_map_keys)

    def pin_path(self, netdev: str) -> Path | None:
        return self.pin_base / netdev / PIN_NAME if self.pin_base else None

    def to_json(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: that deep-copies every value, and
        # the state file holds every allocation's spec, saved on every change.
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["netdevs"] = list(self.netdevs)
        doc["hostnames"] = sorted(self.hostnames)
        doc["socket_base"] = str(self.socket_base)
        doc["pin_base"] = str(self.pin_base) if self.pin_base else None
        doc["program_map_keys"] = {k: list(v) for k, v in self.program_map_keys.items()}
        doc["attached"] = {k: dict(v) for k, v in self.attached.items()}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AllocationSpec:
        """Parse a persisted record strictly: every field of the right type, no
        unknown field, every netdev name and path well-formed.  ValueError names the
        field; what the configuration allows is checked by the daemon's own check."""
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(doc) - set(kinds))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: unknown field")
        for name in ("id", "netdevs", "hostnames", "socket_base"):
            if name not in doc:
                raise ValueError(f"{name}: missing")
        values: dict[str, Any] = {}
        for name, value in doc.items():
            values[name] = _parse_field(name, str(kinds[name]), value)
        for i, netdev in enumerate(values["netdevs"]):
            if not valid_netdev_name(netdev):
                raise ValueError(f"netdevs[{i}]: {netdev!r} is not a valid interface name")
        for netdev, record in values.get("attached", {}).items():
            if netdev not in values["netdevs"]:
                raise ValueError(f"attached.{netdev}: not one of the allocation's netdevs")
            if not isinstance(record, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
                raise ValueError(f"attached.{netdev}: not a mapping of strings")
            ifname = record.get("ifname", "")
            if ifname and not valid_netdev_name(ifname):
                raise ValueError(f"attached.{netdev}.ifname: {ifname!r} is not a valid "
                                 "interface name")
        return cls(**values)


def _parse_field(name: str, kind: str, value: Any) -> Any:
    """One persisted field, checked against its declared type."""
    def want(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{name}: {value!r} is not {what}")

    if kind == "str":
        want(isinstance(value, str) and "\0" not in value, "a string")
        return value
    if kind == "bool":
        want(isinstance(value, bool), "true or false")
        return value
    if kind == "int":
        want(isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if kind == "float":
        want(isinstance(value, (int, float)) and not isinstance(value, bool), "a number")
        return float(value)
    if kind in ("tuple[str, ...]", "frozenset[str]"):
        want(isinstance(value, list) and all(isinstance(v, str) for v in value),
             "a list of strings")
        return tuple(value) if kind.startswith("tuple") else frozenset(value)
    if kind in ("Path", "Path | None"):
        if value is None and kind == "Path | None":
            return None
        want(isinstance(value, str) and value.startswith("/") and "\0" not in value
             and ".." not in Path(value).parts, "an absolute path")
        return Path(value)
    if kind.startswith("dict"):
        want(isinstance(value, dict), "a mapping")
        if kind == "dict[str, list[int]]":
            want(all(isinstance(k, str) and isinstance(v, list)
                     and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                     for k, v in value.items()), "a mapping of names to integer lists")
        return value
    raise ValueError(f"{name}: cannot be restored (type {kind})")
