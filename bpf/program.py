"""Load, attach, detach and query the XDP redirect program.

Everything here acts on an ``ifindex`` in the *calling thread's* network
namespace (libbpf talks rtnetlink from the current thread); callers that manage
a netdev in another namespace run these functions in a thread that has entered
it (see ``cni_server.netns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bpf import libbpf
from bpf.errors import BpfError, ForeignProgram, LibbpfError, ObjectInvalid, ObjectMissing

log = logging.getLogger(__name__)

PROGRAM_NAME = "afxdp_redirect"
MAP_NAME = "xsks_map"
DEFAULT_OBJECT = Path(__file__).with_name("afxdp_redirect.bpf.o")


class XdpMode(enum.Enum):
    """How to attach: the driver's native hook, the generic (skb) hook, or native then skb."""

    AUTO = "auto"
    NATIVE = "native"
    SKB = "skb"

    @property
    def flags(self) -> int:
        return {XdpMode.NATIVE: libbpf.XDP_FLAGS_DRV_MODE, XdpMode.SKB: libbpf.XDP_FLAGS_SKB_MODE}[
            self
        ]


_ATTACHED_MODE = {
    libbpf.XDP_ATTACHED_DRV: "native",
    libbpf.XDP_ATTACHED_SKB: "skb",
    libbpf.XDP_ATTACHED_HW: "hw",
    libbpf.XDP_ATTACHED_MULTI: "multi",
}
# Errors skb mode would meet just the same: no point falling back.
_NO_FALLBACK = {errno.EEXIST, errno.EBUSY, errno.EPERM, errno.EACCES, errno.ENODEV,
                errno.ENOENT}
_MODE_FLAGS = {
    "native": libbpf.XDP_FLAGS_DRV_MODE,
    "skb": libbpf.XDP_FLAGS_SKB_MODE,
    "hw": libbpf.XDP_FLAGS_HW_MODE,
}


def default_object() -> Path:
    """The BPF object to load: $AFXDP_BPF_OBJECT, else the one built beside this module."""
    env = os.environ.get("AFXDP_BPF_OBJECT")
    return Path(env) if env else DEFAULT_OBJECT


@dataclass(frozen=True)
class ProgramSpec:
    """Which XDP program to load: ours, one in a compiled BPF object (loaded with
    libbpf), or C source compiled on this node by bcc.  Every one must use an
    XSKMAP named ``xsks_map``."""

    name: str = PROGRAM_NAME
    object_path: Path | None = None  # None (and no source): default_object()
    source_path: Path | None = None  # C source for bcc
    kernel_headers: Path | None = None  # bcc's header tree; None: bcc's own search

    @property
    def origin(self) -> str:
        """Where the program comes from, for messages."""
        if self.source_path is not None:
            return f"source {self.source_path}"
        return f"object {self.object_path or default_object()}"

    def load(self, map_entries: int, *, reuse_map_fd: int = -1) -> LoadedProgram:
        """Load a fresh copy with an XSKMAP of at least ``map_entries`` slots, or
        using the existing XSKMAP ``reuse_map_fd`` (of exactly that size)."""
        if self.source_path is None:
            return LoadedProgram.load(map_entries, self.object_path, self.name,
                                      reuse_map_fd=reuse_map_fd)
        if reuse_map_fd >= 0:
            raise ObjectInvalid(f"a program compiled from {self.source_path} cannot take over "
                                "an existing map")
        from bpf import bcc  # only programs from source need it

        prog_fd = bcc.compile_and_load(self.source_path, self.name, map_entries,
                                       self.kernel_headers)
        program = LoadedProgram.from_prog_fd(prog_fd, f"the program compiled from "
                                                      f"{self.source_path}")
        if program.map_entries < map_entries:
            program.close()
            raise ObjectInvalid(
                f"'{MAP_NAME}' in {self.source_path} has {program.map_entries} entries, fewer "
                f"than the {map_entries} queues to serve: size it with "
                f"BPF_XSKMAP({MAP_NAME}, {bcc.SIZE_MACRO})")
        return program


DEFAULT_PROGRAM = ProgramSpec()


@dataclass(frozen=True)
class XdpState:
    """What the kernel reports as attached to one netdev."""

    ifindex: int
    prog_id: int
    mode: str | None
    name: str = ""
    tag: str = ""

    @property
    def attached(self) -> bool:
        return self.prog_id != 0


_TAGS: dict[tuple[str, str, int, int], str] = {}


def expected_tag(spec: ProgramSpec) -> str | None:
    """The tag (the kernel's hash of the instructions) this build of ``spec``'s
    program gets when loaded; None for programs compiled from source, which are
    known by name only.  Loaded once per object file and cached."""
    if spec.source_path is not None:
        return None
    path = spec.object_path or default_object()
    try:
        st = path.stat()
    except OSError:
        return None  # the load that follows says what is missing
    key = (str(path), spec.name, st.st_mtime_ns, st.st_size)
    tag = _TAGS.get(key)
    if tag is None:
        with LoadedProgram.load(1, path, spec.name) as program:
            tag = _TAGS[key] = program.tag
    return tag


def identify(state: XdpState, spec: ProgramSpec = DEFAULT_PROGRAM) -> str:
    """Whose program ``state`` shows: "this build" (same name, our map layout, the
    tag this build loads with), "another build" (same name and map layout, another
    tag: an older or newer release of ours), "foreign", or "" (none attached)."""
    if not state.attached:
        return ""
    if state.name != kernel_name(spec.name):
        return "foreign"
    try:
        with LoadedProgram.adopt(state.prog_id):
            pass
    except ObjectInvalid:
        return "foreign"
    try:
        want = expected_tag(spec)
    except BpfError:
        want = None
    return "this build" if want is None or want == state.tag else "another build"


def kernel_name(program_name: str) -> str:
    """The name the kernel reports for a program (BPF_OBJ_NAME_LEN: 15 characters)."""
    return program_name[:15]


# IFLA_XDP_ATTACHED as pyroute2 decodes it.
_ATTACHED_NAMES = {"xdp": libbpf.XDP_ATTACHED_DRV, "xdpgeneric": libbpf.XDP_ATTACHED_SKB,
                   "xdpoffload": libbpf.XDP_ATTACHED_HW, "xdpmulti": libbpf.XDP_ATTACHED_MULTI}


def _xdp_attrs(ifindex: int) -> dict[str, Any]:
    """IFLA_XDP of one link (RTM_GETLINK for that ifindex), {} when there is none.

    Not libbpf's bpf_xdp_query: it dumps every link of the namespace to find one,
    which costs 20 ms per call with 1,000 netdevs (2 ms with 100).  pyroute2's
    synchronous API runs an event loop of its own, which it cannot on a thread that
    runs one (the daemon's): there the request goes through a new thread, which
    starts in the caller's network namespace."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _xdp_attrs_here(ifindex)
    result: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(_xdp_attrs_here(ifindex))
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="xdp-query")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _xdp_attrs_here(ifindex: int) -> dict[str, Any]:
    with IPRoute() as ipr:
        try:
            link = ipr.link("get", index=ifindex)[0]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return {}
            raise LibbpfError(f"querying the XDP program of ifindex {ifindex}", e.code,
                              []) from e
    xdp = link.get_attr("IFLA_XDP")
    return dict(xdp["attrs"]) if xdp else {}


def query(ifindex: int) -> XdpState:
    """The XDP program attached to ``ifindex`` (prog_id 0 when none)."""
    attrs = _xdp_attrs(ifindex)

    def prog(kind: str) -> int:
        return int(attrs.get(f"IFLA_XDP_{kind}PROG_ID") or 0)

    attached = attrs.get("IFLA_XDP_ATTACHED")
    attach_mode = int(_ATTACHED_NAMES.get(attached, 0) if isinstance(attached, str)
                      else attached or 0)
    mode = _ATTACHED_MODE.get(attach_mode)
    drv, hw = prog("DRV_"), prog("HW_")
    prog_id = prog("") or drv or prog("SKB_") or hw
    if not prog_id:
        return XdpState(ifindex, 0, None)
    if attach_mode == libbpf.XDP_ATTACHED_MULTI:
        # Only the drv+hw combination exists; the driver-level one is the one we manage.
        mode = "native" if drv else "hw"
        prog_id = drv or hw
    name, tag = "", ""
    try:
        fd = libbpf.check(libbpf.call("bpf_prog_get_fd_by_id", prog_id), f"opening program {prog_id}")
    except LibbpfError as e:
        if e.errno != errno.ENOENT:
            raise
        # Detached between the two calls.
        return XdpState(ifindex, 0, None)
    try:
        info = libbpf.prog_info(fd)
        name = info.name.decode("ascii", "replace")
        tag = bytes(info.tag).hex()
    finally:
        os.close(fd)
    return XdpState(ifindex, prog_id, mode, name, tag)


def prog_name(prog_id: int) -> str:
    """The name of loaded BPF program ``prog_id`` (needs CAP_SYS_ADMIN)."""
    fd = libbpf.check(libbpf.call("bpf_prog_get_fd_by_id", prog_id), f"opening program {prog_id}")
    try:
        return str(libbpf.prog_info(fd).name.decode("ascii", "replace"))
    finally:
        os.close(fd)


@contextlib.contextmanager
def opened_object(path: Path, program_name: str,
                  map_entries: int) -> Iterator[tuple[int, int, int, list[str]]]:
    """A BPF object opened (not loaded) with its XSKMAP sized: yields (object,
    program, map, libbpf's messages) and closes the object afterwards."""
    if not path.is_file():
        raise ObjectMissing(
            f"BPF object {path} not found: build it with `make bpf` in the source tree "
            "(needs clang and libbpf-dev), or point AFXDP_BPF_OBJECT at a built copy"
        )
    if map_entries < 1:
        raise ValueError(f"an XSKMAP needs at least one entry, not {map_entries}")
    with libbpf.capture_messages() as messages:
        obj = libbpf.check_ptr(
            libbpf.call("bpf_object__open_file", str(path).encode(), None),
            f"opening BPF object {path}",
        )
        try:
            bpf_map = libbpf.call("bpf_object__find_map_by_name", obj, MAP_NAME.encode())
            if not bpf_map:
                raise ObjectInvalid(f"BPF object {path} defines no map named '{MAP_NAME}'")
            if libbpf.call("bpf_map__type", bpf_map) != libbpf.BPF_MAP_TYPE_XSKMAP:
                raise ObjectInvalid(f"map '{MAP_NAME}' in {path} is not an XSKMAP")
            prog = libbpf.call("bpf_object__find_program_by_name", obj, program_name.encode())
            if not prog:
                raise ObjectInvalid(f"BPF object {path} defines no program named '{program_name}'")
            libbpf.check(
                libbpf.call("bpf_map__set_max_entries", bpf_map, map_entries),
                f"sizing '{MAP_NAME}' to {map_entries} entries",
            )
            yield obj, prog, bpf_map, messages
        finally:
            libbpf.call("bpf_object__close", obj)


class LoadedProgram:
    """Owner of one loaded copy of the redirect program: its program fd and its XSKMAP fd."""

    def __init__(self, prog_fd: int, map_fd: int) -> None:
        self._prog_fd = prog_fd
        self._map_fd = map_fd
        info = libbpf.prog_info(prog_fd)
        self.prog_id: int = info.id
        self.tag: str = bytes(info.tag).hex()
        self.name: str = info.name.decode("ascii", "replace")
        minfo = libbpf.map_info(map_fd)
        self.map_id: int = minfo.id
        self.map_entries: int = minfo.max_entries

    @property
    def prog_fd(self) -> int:
        if self._prog_fd < 0:
            raise ValueError("program is closed")
        return self._prog_fd

    @property
    def map_fd(self) -> int:
        if self._map_fd < 0:
            raise ValueError("program is closed")
        return self._map_fd

    @property
    def closed(self) -> bool:
        return self._prog_fd < 0

    def close(self) -> None:
        """Close both fds (the kernel keeps an attached program alive by itself)."""
        for attr in ("_prog_fd", "_map_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(
        cls,
        map_entries: int,
        object_path: Path | None = None,
        program_name: str = PROGRAM_NAME,
        *,
        reuse_map_fd: int = -1,
    ) -> LoadedProgram:
        """Open the object, size its XSKMAP to ``map_entries`` and load it into the kernel.

        ``reuse_map_fd``: the program uses that existing XSKMAP instead of a new
        one (an upgrade keeps the sockets clients put there).
        """
        path = object_path or default_object()
        with opened_object(path, program_name, map_entries) as (obj, prog, bpf_map, messages):
            if reuse_map_fd >= 0:
                libbpf.check(libbpf.call("bpf_map__reuse_fd", bpf_map, reuse_map_fd),
                             f"reusing XSKMAP fd {reuse_map_fd} for {path}")
            ret = libbpf.call("bpf_object__load", obj)
            if ret < 0:
                err = ctypes.get_errno() or -ret
                raise LibbpfError(f"loading BPF object {path}", err, messages[-60:])
            return cls.from_object(prog, bpf_map)

    @classmethod
    def from_object(cls, prog: int, bpf_map: int) -> LoadedProgram:
        """Our own fds for a loaded libbpf program and its XSKMAP (the object may close)."""
        prog_fd = os.dup(libbpf.call("bpf_program__fd", prog))
        try:
            map_fd = os.dup(libbpf.call("bpf_map__fd", bpf_map))
        except BaseException:
            os.close(prog_fd)
            raise
        return cls._own(prog_fd, map_fd)

    @classmethod
    def adopt(cls, prog_id: int) -> LoadedProgram:
        """Take fds for an already loaded copy of our program (e.g. left by a previous daemon)."""
        prog_fd = libbpf.check(
            libbpf.call("bpf_prog_get_fd_by_id", prog_id), f"opening BPF program {prog_id}"
        )
        return cls.from_prog_fd(prog_fd, f"BPF program {prog_id}")

    @classmethod
    def from_prog_fd(cls, prog_fd: int, label: str) -> LoadedProgram:
        """Own ``prog_fd`` (closed on failure) and a new fd for its ``xsks_map``."""
        try:
            map_fd = -1
            for map_id in libbpf.prog_map_ids(prog_fd):
                fd = libbpf.check(
                    libbpf.call("bpf_map_get_fd_by_id", map_id), f"opening BPF map {map_id}"
                )
                info = libbpf.map_info(fd)
                if info.name.decode() == MAP_NAME:
                    if info.type != libbpf.BPF_MAP_TYPE_XSKMAP:
                        os.close(fd)
                        raise ObjectInvalid(f"map '{MAP_NAME}' of {label} is not an XSKMAP")
                    map_fd = fd
                    break
                os.close(fd)
            if map_fd < 0:
                raise ObjectInvalid(f"{label} uses no map named '{MAP_NAME}' (an XSKMAP)")
        except BaseException:
            os.close(prog_fd)
            raise
        return cls._own(prog_fd, map_fd)

    @classmethod
    def _own(cls, prog_fd: int, map_fd: int) -> LoadedProgram:
        try:
            return cls(prog_fd, map_fd)
        except BaseException:
            os.close(prog_fd)
            os.close(map_fd)
            raise


def attach(ifindex: int, program: LoadedProgram, mode: XdpMode, *, ifname: str = "") -> str:
    """Attach ``program`` where nothing is attached; returns the mode used ('native'/'skb').

    ``auto`` tries the native hook first and falls back to skb when the driver
    has no native XDP support.  Fails (EEXIST/EBUSY) if any program is attached.
    """
    label = ifname or f"ifindex {ifindex}"
    modes = [XdpMode.NATIVE, XdpMode.SKB] if mode is XdpMode.AUTO else [mode]
    last: LibbpfError | None = None
    for m in modes:
        with libbpf.capture_messages() as messages:
            ret = libbpf.call(
                "bpf_xdp_attach",
                ifindex,
                program.prog_fd,
                libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST | m.flags,
                None,
            )
        if ret >= 0:
            return m.value
        err = ctypes.get_errno() or -ret
        last = LibbpfError(f"attaching XDP program to {label} in {m.value} mode", err, messages)
        if mode is XdpMode.AUTO and m is XdpMode.NATIVE and err not in _NO_FALLBACK:
            # The driver refused native XDP (no support, too many peer queues on a
            # veth, MTU too large, ...): the generic hook works on any netdev.
            log.info("event=xdp_native_refused netdev=%s fallback=skb errno=%d reason=%r",
                     label, err, "; ".join(messages) or os.strerror(err))
            continue
        break
    assert last is not None
    raise last


def detach(ifindex: int, program: LoadedProgram, mode: str, *, ifname: str = "") -> bool:
    """Detach ``program`` from ``ifindex`` only if it is still the one attached.

    Returns False (and leaves the netdev alone) when something else has replaced
    it or the netdev is gone.
    """
    label = ifname or f"ifindex {ifindex}"
    opts = libbpf.XdpAttachOpts(sz=ctypes.sizeof(libbpf.XdpAttachOpts), old_prog_fd=program.prog_fd)
    ret = libbpf.call(
        "bpf_xdp_attach", ifindex, -1, libbpf.XDP_FLAGS_REPLACE | _MODE_FLAGS[mode], ctypes.byref(opts)
    )
    if ret >= 0:
        return True
    err = ctypes.get_errno() or -ret
    if err in (errno.EEXIST, errno.ENODEV, errno.ENOENT):
        # EEXIST: the attached program is not ours; which one, or none at all?
        reason = "netdev gone"
        if err == errno.EEXIST:
            try:
                now = query(ifindex)
            except LibbpfError:
                now = XdpState(ifindex, 0, None)
            reason = (f"replaced by program {now.prog_id} '{now.name}'" if now.attached
                      else "already detached by someone else")
        log.warning("event=xdp_detach_skipped netdev=%s prog_id=%d reason=%r", label,
                    program.prog_id, reason)
        return False
    raise LibbpfError(f"detaching XDP program from {label}", err)


def detach_any(ifindex: int, state: XdpState, *, ifname: str = "") -> None:
    """Detach whatever program ``state`` describes (used when the operator forces replacement)."""
    if not state.attached or state.mode not in _MODE_FLAGS:
        return
    label = ifname or f"ifindex {ifindex}"
    libbpf.check(
        libbpf.call("bpf_xdp_attach", ifindex, -1, _MODE_FLAGS[state.mode], None),
        f"detaching program {state.prog_id} from {label}",
    )


def replace_attached(ifindex: int, new: LoadedProgram, old: LoadedProgram, mode: str, *,
                     ifname: str = "") -> None:
    """Swap ``old`` for ``new`` on ``ifindex`` in one step (XDP_FLAGS_REPLACE): no
    frame sees the netdev without a program.  Fails (EEXIST) if ``old`` is no
    longer the attached program."""
    label = ifname or f"ifindex {ifindex}"
    opts = libbpf.XdpAttachOpts(sz=ctypes.sizeof(libbpf.XdpAttachOpts), old_prog_fd=old.prog_fd)
    with libbpf.capture_messages() as messages:
        ret = libbpf.call("bpf_xdp_attach", ifindex, new.prog_fd,
                          libbpf.XDP_FLAGS_REPLACE | _MODE_FLAGS[mode], ctypes.byref(opts))
    if ret < 0:
        raise LibbpfError(f"replacing program {old.prog_id} on {label} with {new.prog_id}",
                          ctypes.get_errno() or -ret, messages)


class FreshPrograms(Protocol):
    """Fresh programs loaded ahead (``cni_server.warm``): :meth:`take` one of a kind
    (None: load it), and once attached (or failed to be), say so to :meth:`placed`
    before closing it."""

    def take(self, spec: ProgramSpec, map_entries: int) -> LoadedProgram | None: ...

    def placed(self, program: LoadedProgram) -> None: ...


class NetdevProgram:
    """Our redirect program on one netdev, as the daemon manages it.

    Owns the LoadedProgram (and so the XSKMAP fd handed to clients).  ``adopted``
    says the program was already attached when we found it (a previous daemon's),
    in which case its XSKMAP, and the sockets clients put there, are kept.
    """

    def __init__(
        self, netdev: str, ifindex: int, program: LoadedProgram, mode: str, adopted: bool
    ) -> None:
        self.netdev = netdev
        self.ifindex = ifindex
        self.program = program
        self.mode = mode
        self.adopted = adopted

    @property
    def map_fd(self) -> int:
        return self.program.map_fd

    @property
    def queue_slots(self) -> int:
        return self.program.map_entries

    def detach(self) -> bool:
        """Detach from the netdev (if still ours) and close our fds."""
        try:
            return detach(self.ifindex, self.program, self.mode, ifname=self.netdev)
        finally:
            self.program.close()

    def close(self) -> None:
        """Close our fds and leave the program attached (e.g. for running pods)."""
        self.program.close()

    def describe(self) -> dict[str, object]:
        return {
            "netdev": self.netdev,
            "ifindex": self.ifindex,
            "mode": self.mode,
            "prog_id": self.program.prog_id,
            "map_id": self.program.map_id,
            "queue_slots": self.program.map_entries,
            "adopted": self.adopted,
        }


def ensure_attached(
    netdev: str,
    ifindex: int,
    queues: int,
    mode: XdpMode = XdpMode.AUTO,
    *,
    force: bool = False,
    spec: ProgramSpec = DEFAULT_PROGRAM,
    warm: FreshPrograms | None = None,
) -> NetdevProgram:
    """Make sure our program is attached to ``netdev``, with an XSKMAP of >= ``queues`` slots.

    - Nothing attached: attach a fresh copy (one ``warm`` has ready, else one
      loaded now).
    - Our program attached with a large enough map: adopt it (idempotent; the
      map, and the sockets already in it, survive).
    - A foreign program attached: refuse with :class:`ForeignProgram`, unless
      ``force``, in which case it is detached and ours attached.
    """
    state = query(ifindex)
    adopted = _ours_attached(state, spec)
    if adopted is not None:
        if adopted.map_entries >= queues and (mode is XdpMode.AUTO or mode.value == state.mode):
            assert state.mode is not None
            want = expected_tag(spec)
            if want is not None and adopted.tag != want:
                return _upgrade(netdev, ifindex, adopted, state.mode, spec)
            log.info(
                "event=xdp_adopted netdev=%s prog_id=%d mode=%s queue_slots=%d",
                netdev, state.prog_id, state.mode, adopted.map_entries,
            )
            return NetdevProgram(netdev, ifindex, adopted, state.mode, adopted=True)
        log.warning(
            "event=xdp_replacing_own netdev=%s prog_id=%d reason=%s",
            netdev, state.prog_id,
            "map too small" if adopted.map_entries < queues else f"mode {state.mode} != {mode.value}",
        )
        adopted.close()
        detach_any(ifindex, state, ifname=netdev)
    elif state.attached:
        if not force:
            raise ForeignProgram(
                f"{netdev} already carries XDP program id {state.prog_id} "
                f"'{state.name or '?'}' in {state.mode} mode that is not ours; refusing to "
                "replace it (detach it, or let the daemon replace it with --force)"
            )
        log.warning(
            "event=xdp_replacing_foreign netdev=%s prog_id=%d name=%s mode=%s",
            netdev, state.prog_id, state.name, state.mode,
        )
        detach_any(ifindex, state, ifname=netdev)
    entries = max(queues, 1)
    taken = warm.take(spec, entries) if warm is not None else None
    program = taken or spec.load(entries)
    try:
        used = attach(ifindex, program, mode, ifname=netdev)
    except BaseException:
        if warm is not None:
            warm.placed(program)
        program.close()
        raise
    if warm is not None:
        warm.placed(program)
    log.info(
        "event=xdp_attached netdev=%s prog_id=%d mode=%s queue_slots=%d warm=%s",
        netdev, program.prog_id, used, program.map_entries, "yes" if taken else "no",
    )
    return NetdevProgram(netdev, ifindex, program, used, adopted=False)


def _ours_attached(state: XdpState, spec: ProgramSpec) -> LoadedProgram | None:
    """Our fds for the attached program if it is of ours (its name, and an XSKMAP named
    ``xsks_map``: a program of that name without one is foreign), else None."""
    if not state.attached or state.name != kernel_name(spec.name):
        return None
    try:
        return LoadedProgram.adopt(state.prog_id)
    except ObjectInvalid:
        return None
    except LibbpfError as e:
        if e.errno == errno.ENOENT:  # detached and freed since the query
            return None
        raise


def _upgrade(netdev: str, ifindex: int, old: LoadedProgram, mode: str,
             spec: ProgramSpec) -> NetdevProgram:
    """Another build of our program is attached (an upgrade, or a downgrade): load
    this build on the same XSKMAP and swap it in atomically, so the sockets clients
    put in the map keep receiving through the change."""
    try:
        new = spec.load(old.map_entries, reuse_map_fd=old.map_fd)
    except BaseException:
        old.close()
        raise
    try:
        replace_attached(ifindex, new, old, mode, ifname=netdev)
    except BaseException:
        new.close()
        old.close()
        raise
    log.info("event=xdp_upgraded netdev=%s old_prog_id=%d old_tag=%s prog_id=%d tag=%s "
             "map_id=%d mode=%s", netdev, old.prog_id, old.tag, new.prog_id, new.tag,
             new.map_id, mode)
    old.close()
    return NetdevProgram(netdev, ifindex, new, mode, adopted=True)


def verify(spec: ProgramSpec, check_netdev: str, map_keys: MapKeys = ()) -> None:
    """Load the program ``spec`` names and attach it (generic hook) to
    ``check_netdev``, then detach: a bad program fails here, with the verifier's log,
    instead of at a pod's start.  The caller provides a scratch netdev."""
    ifindex = socket.if_nametoindex(check_netdev)
    with spec.load(1) as program:
        fill_map_keys(program, map_keys)
        mode = attach(ifindex, program, XdpMode.SKB, ifname=check_netdev)
        detach(ifindex, program, mode, ifname=check_netdev)


MapKeys = tuple[tuple[str, tuple[int, ...]], ...]


def map_keys_from(keys: dict[str, list[int]]) -> MapKeys:
    """The hashable form of ``{map name: [keys]}`` (as configured and persisted)."""
    return tuple((name, tuple(ints)) for name, ints in sorted(keys.items()))


def fill_map_keys(program: LoadedProgram, map_keys: MapKeys) -> None:
    """Add keys (value 1) to maps a custom program uses, e.g. its udp_ports set.

    Keys are integers in host byte order, sized to the map's key size; existing
    keys stay (a key removed from the configuration is not deleted from a map
    adopted after a restart).
    """
    for name, keys in map_keys:
        try:
            fd = libbpf.map_fd_by_name(program.prog_fd, name)
        except LookupError:
            raise ObjectInvalid(f"the program uses no map named {name!r}") from None
        try:
            info = libbpf.map_info(fd)
            one = (1).to_bytes(info.value_size, sys.byteorder)
            for key in keys:
                try:
                    raw = key.to_bytes(info.key_size, sys.byteorder)
                except OverflowError:
                    raise ObjectInvalid(f"key {key} does not fit map {name!r}'s "
                                        f"{info.key_size}-byte keys") from None
                libbpf.map_update_bytes(fd, raw, one, f"adding key {key} to map {name!r}")
        finally:
            os.close(fd)
