"""A narrow ctypes binding to the distro's libbpf (``libbpf.so.1``).

Only the calls this project uses are declared, each with ``argtypes`` and
``restype``.  Every wrapper turns a failure into :class:`LibbpfError`, which
says what was being done (to which interface or object) and carries the errno.

libbpf >= 1.0 returns ``-errno`` from int functions and ``NULL`` from pointer
functions, and sets ``errno`` in both cases; we read ``errno`` through ctypes'
private copy (``use_errno=True``) so nothing in between can clobber it.

libbpf's own messages (including the verifier log of a failed load) are routed
into the ``bpf.libbpf`` logger and, while :func:`capture_messages` is active,
collected so that the exception for a failed load can include them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import logging
import os
import threading
from collections.abc import Iterator

from bpf.errors import LibbpfError, LibbpfMissing

log = logging.getLogger(__name__)

# enum bpf_map_type / bpf_prog_type values we check against (uapi/linux/bpf.h).
BPF_MAP_TYPE_XSKMAP = 17
BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# XDP attach flags (uapi/linux/if_link.h).
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

# enum XDP_ATTACHED_* (uapi/linux/if_link.h), as IFLA_XDP_ATTACHED reports them (0: none).
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4

# libbpf_print_level
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class XdpAttachOpts(ctypes.Structure):
    """struct bpf_xdp_attach_opts."""

    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class BpfProgInfo(ctypes.Structure):
    """The prefix of struct bpf_prog_info we read; the kernel accepts a short info_len."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
    ]


class BpfMapInfo(ctypes.Structure):
    """The prefix of struct bpf_map_info we read."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_capture = threading.local()
# Kept referenced for the life of the process: libbpf stores the raw pointer.
_print_cb: object = None


def _declare(lib: ctypes.CDLL) -> None:
    vp, i, u32, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    sigs: dict[str, tuple[list[object], object]] = {
        "bpf_object__open_file": ([cp, vp], vp),
        "bpf_object__load": ([vp], i),
        "bpf_object__close": ([vp], None),
        "bpf_object__find_map_by_name": ([vp, cp], vp),
        "bpf_object__find_program_by_name": ([vp, cp], vp),
        "bpf_map__set_max_entries": ([vp, u32], i),
        "bpf_map__type": ([vp], i),
        "bpf_map__fd": ([vp], i),
        "bpf_map__reuse_fd": ([vp, i], i),
        "bpf_program__fd": ([vp], i),
        "bpf_xdp_attach": ([i, i, u32, ctypes.POINTER(XdpAttachOpts)], i),
        "bpf_obj_pin": ([i, cp], i),
        "bpf_obj_get": ([cp], i),
        "bpf_prog_get_fd_by_id": ([u32], i),
        "bpf_prog_get_next_id": ([u32, ctypes.POINTER(u32)], i),
        "bpf_map_get_fd_by_id": ([u32], i),
        "bpf_obj_get_info_by_fd": ([i, vp, ctypes.POINTER(u32)], i),
        "bpf_map_update_elem": ([i, vp, vp, ctypes.c_uint64], i),
        "bpf_map_lookup_elem": ([i, vp, vp], i),
        "bpf_map_create": ([i, cp, u32, u32, u32, vp], i),
        "bpf_prog_test_run_opts": ([i, ctypes.POINTER(TestRunOpts)], i),
        "libbpf_set_print": ([_PRINT_FN], vp),
        "libbpf_major_version": ([], u32),
        "libbpf_minor_version": ([], u32),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


def _install_printer(lib: ctypes.CDLL) -> None:
    global _print_cb
    libc = ctypes.CDLL(None, use_errno=True)
    vsnprintf = libc.vsnprintf
    # On x86-64 and arm64 a va_list argument travels as a pointer.
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    vsnprintf.restype = ctypes.c_int

    def printer(level: int, fmt: bytes | None, args: int | None) -> int:
        buf = ctypes.create_string_buffer(4096)
        vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode("utf-8", "replace").rstrip("\n")
        # Most of libbpf's messages carry their own "libbpf: " prefix; ours says it.
        text = text.removeprefix("libbpf: ")
        sink: list[str] | None = getattr(_capture, "lines", None)
        if sink is not None:
            sink.append(text)
        log.log(_LEVELS.get(level, logging.DEBUG), "libbpf: %s", text)
        return 0

    _print_cb = _PRINT_FN(printer)
    lib.libbpf_set_print(_print_cb)


def lib() -> ctypes.CDLL:
    """Load libbpf.so.1 once and declare the calls we use."""
    global _lib
    with _lib_lock:
        if _lib is None:
            name = os.environ.get("AFXDP_LIBBPF") or "libbpf.so.1"
            try:
                loaded = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                raise LibbpfMissing(
                    f"cannot load {name} ({e}); install the distro's libbpf "
                    "(Debian: apt-get install libbpf1)"
                ) from e
            _declare(loaded)
            _install_printer(loaded)
            _lib = loaded
        return _lib


def version() -> str:
    """libbpf's version as 'major.minor'."""
    library = lib()
    return f"{library.libbpf_major_version()}.{library.libbpf_minor_version()}"


@contextlib.contextmanager
def capture_messages() -> Iterator[list[str]]:
    """Collect libbpf's messages printed by this thread inside the block."""
    previous = getattr(_capture, "lines", None)
    lines: list[str] = []
    _capture.lines = lines
    try:
        yield lines
    finally:
        _capture.lines = previous


def _errno_of(ret: int) -> int:
    err = ctypes.get_errno()
    if err:
        return err
    return -ret if ret < 0 else errno_mod.EIO


def check(ret: int, what: str) -> int:
    """Raise LibbpfError for a negative libbpf return value, else pass it through."""
    if ret < 0:
        raise LibbpfError(what, _errno_of(ret))
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """Raise LibbpfError for a NULL pointer returned by libbpf."""
    if not ptr:
        err = ctypes.get_errno() or errno_mod.EINVAL
        raise LibbpfError(what, err)
    return ptr


def call(fn_name: str, *args: object) -> int:
    """Call a declared libbpf function with errno cleared first."""
    ctypes.set_errno(0)
    result: int = getattr(lib(), fn_name)(*args)
    return result


def prog_info(fd: int) -> BpfProgInfo:
    """bpf_obj_get_info_by_fd for a program fd (without map ids)."""
    info = BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(size)),
          f"reading info of BPF program fd {fd}")
    return info


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps a program uses (two info calls: count, then ids)."""
    count = prog_info(fd).nr_map_ids
    if count == 0:
        return []
    ids = (ctypes.c_uint32 * count)()
    info = BpfProgInfo()
    info.nr_map_ids = count
    info.map_ids = ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(size)),
          f"reading map ids of BPF program fd {fd}")
    return list(ids[: min(count, info.nr_map_ids)])


def map_info(fd: int) -> BpfMapInfo:
    """bpf_obj_get_info_by_fd for a map fd."""
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(size)),
          f"reading info of BPF map fd {fd}")
    return info


def map_update_u32(map_fd: int, key: int, value: int, what: str) -> None:
    """bpf_map_update_elem with u32 key and u32/int value (an XSKMAP slot)."""
    k = ctypes.c_uint32(key)
    v = ctypes.c_uint32(value)
    check(call("bpf_map_update_elem", map_fd, ctypes.byref(k), ctypes.byref(v), 0), what)


def map_update_bytes(map_fd: int, key: bytes, value: bytes, what: str) -> None:
    """bpf_map_update_elem with raw key and value (sizes must match the map's)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    check(call("bpf_map_update_elem", map_fd, k, v, 0), what)


def map_fd_by_name(prog_fd: int, name: str) -> int:
    """A new fd for the map named ``name`` that program ``prog_fd`` uses (caller owns it)."""
    for map_id in prog_map_ids(prog_fd):
        fd = check(call("bpf_map_get_fd_by_id", map_id), f"opening BPF map {map_id}")
        if map_info(fd).name.decode() == name:
            return fd
        os.close(fd)
    raise LookupError(f"BPF program fd {prog_fd} uses no map named {name!r}")


def test_run(prog_fd: int, data: bytes, repeat: int) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: (return value, kernel-measured ns per run) over ``repeat`` runs."""
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(buf),
                       data_out=ctypes.addressof(out), data_size_in=len(data),
                       data_size_out=len(out), repeat=repeat)
    check(call("bpf_prog_test_run_opts", prog_fd, ctypes.byref(opts)),
          f"test-running BPF program fd {prog_fd}")
    return opts.retval, opts.duration


def xskmap_create(max_entries: int, name: str = "xsks_map") -> int:
    """Create a standalone XSKMAP (tests and tools; the daemon's maps come from the object)."""
    return check(
        call("bpf_map_create", BPF_MAP_TYPE_XSKMAP, name.encode(), 4, 4, max_entries, None),
        f"creating an XSKMAP with {max_entries} entries",
    )
