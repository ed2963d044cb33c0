"""AF_XDP socket primitives: create, identify, bind, insert into an XSKMAP, busy-poll.

Raw fds are used through libc (ctypes) because Python's socket module knows no
``sockaddr_xdp``.  Constants are from ``uapi/linux/if_xdp.h`` and
``uapi/asm-generic/socket.h``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import struct

from bpf import libbpf
from cni_server.fds import OwnedFd

AF_XDP = 44
SOL_XDP = 283

# setsockopt/getsockopt names at SOL_XDP
XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7

# mmap offsets of the four rings
XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

SO_DOMAIN = 39
SO_BUSY_POLL = 46
SO_PREFER_BUSY_POLL = 69
SO_BUSY_POLL_BUDGET = 70

_libc = ctypes.CDLL(None, use_errno=True)
_libc.socket.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32]


class XskError(OSError):
    """An AF_XDP socket operation failed (errno and what was being done)."""


def _raise(what: str) -> None:
    err = ctypes.get_errno() or errno.EIO
    raise XskError(err, f"{what}: {os.strerror(err)}")


def create_socket(advice: str = "") -> OwnedFd:
    """socket(AF_XDP, SOCK_RAW) in the calling thread's netns; needs CAP_NET_RAW.

    ``advice``: what the caller's user can do instead, added to a refusal."""
    fd = _libc.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        hint = (f" (this process needs CAP_NET_RAW{advice})") if err == errno.EPERM else ""
        raise XskError(err, f"creating an AF_XDP socket: {os.strerror(err)}{hint}")
    return OwnedFd(fd)


def socket_domain(fd: int) -> int | None:
    """The address family of socket ``fd``; None if ``fd`` is not a socket."""
    val = ctypes.c_int(0)
    size = ctypes.c_uint32(ctypes.sizeof(val))
    if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_DOMAIN, ctypes.byref(val), ctypes.byref(size)):
        err = ctypes.get_errno()
        if err in (errno.ENOTSOCK, errno.EBADF):
            return None
        _raise("reading SO_DOMAIN")
    return val.value


def is_xdp_socket(fd: int) -> bool:
    return socket_domain(fd) == AF_XDP


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


_SIOCGSKNS = 0x894C


def socket_netns_inode(fd: int) -> int:
    """The inode of the network namespace socket ``fd`` was created in (SIOCGSKNS)."""
    ns = fcntl.ioctl(fd, _SIOCGSKNS)
    try:
        return os.fstat(ns).st_ino
    finally:
        os.close(ns)


def setsockopt_int(fd: int, level: int, name: int, value: int, what: str) -> None:
    val = ctypes.c_int(value)
    if _libc.setsockopt(fd, level, name, ctypes.byref(val), ctypes.sizeof(val)):
        _raise(what)


def getsockopt_bytes(fd: int, level: int, name: int, size: int, what: str) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, level, name, buf, ctypes.byref(length)):
        _raise(what)
    return buf.raw[: length.value]


def setsockopt_bytes(fd: int, level: int, name: int, data: bytes, what: str) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    if _libc.setsockopt(fd, level, name, buf, len(data)):
        _raise(what)


UMEM_REG = struct.Struct("=QQIIII")  # addr, len, chunk_size, headroom, flags, tx_metadata_len
MMAP_OFFSETS = struct.Struct("=16Q")  # rx, tx, fill, completion: producer, consumer, desc, flags
_SOCKADDR_XDP = struct.Struct("=HHIII")  # family, flags, ifindex, queue_id, shared_umem_fd


def register_umem(fd: int, umem: mmap.mmap, frame_size: int) -> None:
    """XDP_UMEM_REG with the pages of ``umem`` (a mapping of ours); the kernel pins them."""
    anchor = (ctypes.c_char * len(umem)).from_buffer(umem)
    addr = ctypes.addressof(anchor)
    del anchor  # release the buffer export so the mmap can be closed later
    setsockopt_bytes(fd, SOL_XDP, XDP_UMEM_REG, UMEM_REG.pack(addr, len(umem), frame_size,
                                                              0, 0, 0),
                     "registering UMEM (RLIMIT_MEMLOCK too low without CAP_IPC_LOCK?)")


def size_rings(fd: int, fill: int, completion: int, rx: int, tx: int) -> None:
    for name, entries in ((XDP_UMEM_FILL_RING, fill), (XDP_UMEM_COMPLETION_RING, completion),
                          (XDP_RX_RING, rx), (XDP_TX_RING, tx)):
        setsockopt_int(fd, SOL_XDP, name, entries, f"sizing ring {name} to {entries}")


def make_bound(fd: int, ifindex: int, queue: int, frames: int, frame_size: int) -> OwnedFd:
    """The daemon's side of /xsk_bound_socket, on a fresh AF_XDP socket ``fd``.

    UMEM in a memfd of ours (sealed: its size cannot change), every ring sized to
    ``frames``, the socket bound to (ifindex, queue).  The client gets the socket
    and the memfd and maps both; it can use the socket but never bind it
    elsewhere (a bound socket refuses a second bind).  Returns the memfd.
    """
    size = frames * frame_size
    memfd = OwnedFd(os.memfd_create("afxdp-umem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        os.ftruncate(memfd.fileno(), size)
        fcntl.fcntl(memfd.fileno(), fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        with mmap.mmap(memfd.fileno(), size, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as umem:
            register_umem(fd, umem, frame_size)
        size_rings(fd, frames, frames, frames, frames)
        bind(fd, ifindex, queue)
        _check_rings_mappable(fd)
    except BaseException:
        memfd.close()
        raise
    return memfd


def _check_rings_mappable(fd: int) -> None:
    """Kernels before the "allow remap of rings after bind" change in net/xdp/xsk.c
    refuse to map a bound socket's rings: then the client could not use it."""
    try:
        ring = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ,
                         offset=XDP_PGOFF_RX_RING)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        raise XskError(errno.EBUSY, "this kernel does not let a client map the rings of an "
                                    "AF_XDP socket bound by the daemon (it needs the 'allow "
                                    "remap of rings after bind' change); use map mode with "
                                    "CAP_NET_RAW instead") from e
    ring.close()


def bind(fd: int, ifindex: int, queue: int, flags: int = 0, shared_umem_fd: int = 0) -> None:
    """bind(2) an AF_XDP socket to (ifindex, queue) in the socket's own netns."""
    addr = ctypes.create_string_buffer(
        _SOCKADDR_XDP.pack(AF_XDP, flags, ifindex, queue, shared_umem_fd), _SOCKADDR_XDP.size
    )
    if _libc.bind(fd, addr, _SOCKADDR_XDP.size):
        _raise(f"binding AF_XDP socket to ifindex {ifindex} queue {queue}")


def insert(map_fd: int, queue: int, xsk_fd: int) -> None:
    """Put the AF_XDP socket into XSKMAP slot ``queue`` (needs no capability)."""
    libbpf.map_update_u32(map_fd, queue, xsk_fd, f"inserting AF_XDP socket into XSKMAP slot {queue}")


def set_busy_poll(fd: int, timeout_us: int, budget: int) -> None:
    """Preferred busy polling, as DPDK's busy_budget configures it (needs CAP_NET_ADMIN)."""
    setsockopt_int(fd, socket.SOL_SOCKET, SO_PREFER_BUSY_POLL, 1, "setting SO_PREFER_BUSY_POLL")
    setsockopt_int(fd, socket.SOL_SOCKET, SO_BUSY_POLL, timeout_us, "setting SO_BUSY_POLL")
    setsockopt_int(fd, socket.SOL_SOCKET, SO_BUSY_POLL_BUDGET, budget,
                   "setting SO_BUSY_POLL_BUDGET")


_libc.sendto.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_uint32]
_libc.sendto.restype = ctypes.c_ssize_t


def kick_tx(fd: int) -> None:
    """Tell the kernel the TX ring has descriptors (copy mode needs the syscall)."""
    if _libc.sendto(fd, None, 0, socket.MSG_DONTWAIT, None, 0) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EBUSY, errno.ENOBUFS):
            raise OSError(err, f"kicking the AF_XDP TX ring: {os.strerror(err)}")
