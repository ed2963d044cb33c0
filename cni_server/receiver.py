"""A minimal AF_XDP receiver: UMEM, fill/completion/RX/TX rings over mmap.

Enough to prove a handed-out fd works and to count (or keep) received frames,
and to transmit a few (``tx_frames`` of the UMEM frames are kept for TX).
It can start from its own socket (needs CAP_NET_RAW) or from one the daemon
created (``/xsk_socket``: needs no capability).  Setting up UMEM and rings needs
no privilege; the UMEM is charged to RLIMIT_MEMLOCK unless the process has
CAP_IPC_LOCK, so the defaults stay small (2048 x 2048-byte frames = 4 MiB).

Ring protocol (Documentation/networking/af_xdp.rst): the producer index is
written after the descriptors, the consumer index after reading them; both
are free-running u32 counters.  Python's struct/memoryview stores are plain
memory writes, ordered on x86-64; this is a test and demo tool, not a data path.
"""

from __future__ import annotations

import mmap
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cni_server import xsk
from cni_server.fds import OwnedFd

# struct xdp_mmap_offsets: rx, tx, fr, cr rings, each (producer, consumer, desc, flags)
_STATS = struct.Struct("=6Q")
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class RingOffsets:
    producer: int
    consumer: int
    desc: int
    flags: int


@dataclass(frozen=True)
class XskStats:
    rx_dropped: int
    rx_invalid_descs: int
    tx_invalid_descs: int
    rx_ring_full: int
    rx_fill_ring_empty_descs: int
    tx_ring_empty_descs: int


class _Ring:
    """One mmap'ed ring: u32 producer/consumer and a descriptor array."""

    def __init__(self, fd: int, pgoff: int, off: RingOffsets, entries: int, desc_words: int) -> None:
        self.entries = entries
        self.mask = entries - 1
        self.map = mmap.mmap(fd, off.desc + entries * desc_words * 8,
                             mmap.MAP_SHARED | mmap.MAP_POPULATE,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        view = memoryview(self.map)
        self.producer = view[off.producer: off.producer + 4].cast("I")
        self.consumer = view[off.consumer: off.consumer + 4].cast("I")
        self.flags = view[off.flags: off.flags + 4].cast("I")
        self.desc = view[off.desc: off.desc + entries * desc_words * 8].cast("Q")
        self._views = [view, self.producer, self.consumer, self.flags, self.desc]

    def close(self) -> None:
        for v in reversed(self._views):
            v.release()
        self.map.close()


class XskReceiver:
    """An AF_XDP socket with UMEM and rings, ready to bind and receive."""

    def __init__(self, sock: OwnedFd, *, frames: int = 2048, frame_size: int = 2048,
                 ring_size: int = 2048, tx_frames: int = 0) -> None:
        self._init(sock, frames, frame_size, ring_size, tx_frames)
        try:
            self._setup(ring_size)
        except BaseException:
            self._unmap()
            raise

    def _init(self, sock: OwnedFd, frames: int, frame_size: int, ring_size: int,
              tx_frames: int) -> None:
        if frames & (frames - 1) or ring_size & (ring_size - 1):
            raise ValueError("frames and ring_size must be powers of two")
        if not 0 <= tx_frames < frames or tx_frames > ring_size:
            raise ValueError("tx_frames must be fewer than frames and at most ring_size")
        self.sock = sock
        self.umem_fd: OwnedFd | None = None  # the daemon's memfd (from_bound), ours to close
        self.frame_size = frame_size
        self.frames = frames
        self.tx_frames = tx_frames
        self._tx_free = [(frames - tx_frames + i) * frame_size for i in range(tx_frames)]
        self._rings: list[_Ring] = []
        self._umem: mmap.mmap | None = None

    @classmethod
    def with_own_socket(cls, **kw: int) -> XskReceiver:
        """Create the AF_XDP socket ourselves (needs CAP_NET_RAW)."""
        sock = xsk.create_socket(
            ", and CAP_IPC_LOCK or a large RLIMIT_MEMLOCK for the UMEM; without "
            "capabilities, let the daemon make the socket: `afxdp receive --mode xsk`, "
            "the /xsk_bound_socket request")
        try:
            return cls(sock, **kw)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def from_bound(cls, sock: OwnedFd, umem: OwnedFd, *, frames: int, frame_size: int,
                   tx_frames: int = 0) -> XskReceiver:
        """A socket the daemon made, sized and bound (/xsk_bound_socket), with its UMEM
        memfd: map both and start receiving.  Needs no capability and no memlock."""
        rx = cls.__new__(cls)
        rx._init(sock, frames, frame_size, frames, tx_frames)
        try:
            rx._umem = mmap.mmap(umem.fileno(), frames * frame_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            rx._map_rings(frames, frames)
        except BaseException:
            rx._unmap()
            raise
        rx.umem_fd = umem
        return rx

    def _setup(self, ring_size: int) -> None:
        fd = self.sock.fileno()
        size = self.frames * self.frame_size
        self._umem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        xsk.register_umem(fd, self._umem, self.frame_size)
        fill_size = max(ring_size, self.frames)
        xsk.size_rings(fd, fill_size, ring_size, ring_size, ring_size)
        self._map_rings(ring_size, fill_size)

    def _map_rings(self, ring_size: int, fill_size: int) -> None:
        fd = self.sock.fileno()
        raw = xsk.getsockopt_bytes(fd, xsk.SOL_XDP, xsk.XDP_MMAP_OFFSETS, xsk.MMAP_OFFSETS.size,
                                   "reading ring offsets")
        v = xsk.MMAP_OFFSETS.unpack(raw)
        rx, tx, fr, cr = (RingOffsets(*v[i: i + 4]) for i in range(0, 16, 4))
        self.rx = self._map(fd, xsk.XDP_PGOFF_RX_RING, rx, ring_size, 2)
        self.tx = self._map(fd, xsk.XDP_PGOFF_TX_RING, tx, ring_size, 2)
        self.fill = self._map(fd, xsk.XDP_UMEM_PGOFF_FILL_RING, fr, fill_size, 1)
        self.comp = self._map(fd, xsk.XDP_UMEM_PGOFF_COMPLETION_RING, cr, ring_size, 1)
        # Give the kernel every frame to fill, except those kept for TX.
        start = self.fill.producer[0]
        rx_frames = self.frames - self.tx_frames
        for i in range(rx_frames):
            self.fill.desc[(start + i) & self.fill.mask] = i * self.frame_size
        self.fill.producer[0] = (start + rx_frames) & _U32
        self._rx_cons = self.rx.consumer[0]

    def _map(self, fd: int, pgoff: int, off: RingOffsets, entries: int, words: int) -> _Ring:
        ring = _Ring(fd, pgoff, off, entries, words)
        self._rings.append(ring)
        return ring

    def bind(self, ifindex: int, queue: int, flags: int = 0) -> None:
        """Bind it ourselves (map mode; needs no capability once the socket exists)."""
        xsk.bind(self.sock.fileno(), ifindex, queue, flags)

    def insert(self, map_fd: int, queue: int) -> None:
        """Put the socket into a handed-out XSKMAP at ``queue``."""
        xsk.insert(map_fd, queue, self.sock.fileno())

    def poll_batch(self, keep: list[bytes] | None = None) -> int:
        """Consume what the RX ring holds, recycle the frames; returns how many."""
        prod = self.rx.producer[0]
        cons = self._rx_cons
        n = (prod - cons) & _U32
        if not n:
            return 0
        rx_desc, rx_mask = self.rx.desc, self.rx.mask
        fill_desc, fill_mask = self.fill.desc, self.fill.mask
        fp = self.fill.producer[0]
        umem = self._umem
        for i in range(n):
            idx = ((cons + i) & rx_mask) * 2
            addr = rx_desc[idx]
            if keep is not None and umem is not None:
                length = rx_desc[idx + 1] & _U32
                keep.append(umem[addr: addr + length])
            fill_desc[(fp + i) & fill_mask] = addr
        self._rx_cons = (cons + n) & _U32
        self.rx.consumer[0] = self._rx_cons
        self.fill.producer[0] = (fp + n) & _U32
        return n

    def transmit(self, frames: Sequence[bytes], timeout: float = 5.0) -> int:
        """Send ``frames`` through the TX ring; returns how many the kernel completed."""
        if not self.tx_frames:
            raise ValueError("this socket keeps no frames for TX (tx_frames=0)")
        umem = self._umem
        assert umem is not None
        done, pending = 0, list(frames)
        deadline = time.monotonic() + timeout
        while (pending or len(self._tx_free) < self.tx_frames) and time.monotonic() < deadline:
            done += self._reap_completions()
            prod = self.tx.producer[0]
            n = 0
            while pending and self._tx_free:
                frame, addr = pending.pop(0), self._tx_free.pop()
                if len(frame) > self.frame_size:
                    raise ValueError(f"a {len(frame)}-byte frame does not fit a UMEM frame")
                umem[addr: addr + len(frame)] = frame
                idx = ((prod + n) & self.tx.mask) * 2
                self.tx.desc[idx], self.tx.desc[idx + 1] = addr, len(frame)
                n += 1
            if n:
                self.tx.producer[0] = (prod + n) & _U32
            xsk.kick_tx(self.sock.fileno())
            if not n:
                time.sleep(0.001)
        return done + self._reap_completions()

    def _reap_completions(self) -> int:
        prod, cons = self.comp.producer[0], self.comp.consumer[0]
        n = (prod - cons) & _U32
        for i in range(n):
            self._tx_free.append(self.comp.desc[(cons + i) & self.comp.mask])
        self.comp.consumer[0] = (cons + n) & _U32
        return n

    def receive(self, count: int, timeout: float, keep: list[bytes] | None = None) -> int:
        """Receive until ``count`` frames arrived or ``timeout`` seconds passed."""
        return receive_all([self], count, timeout, keep)

    def stats(self) -> XskStats:
        raw = xsk.getsockopt_bytes(self.sock.fileno(), xsk.SOL_XDP, xsk.XDP_STATISTICS,
                                   _STATS.size, "reading XDP_STATISTICS")
        return XskStats(*_STATS.unpack(raw.ljust(_STATS.size, b"\0")))

    def _unmap(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        if self._umem is not None:
            self._umem.close()
            self._umem = None

    def close(self) -> None:
        """Close the socket first (the kernel stops writing), then unmap."""
        self.sock.close()
        self._unmap()
        if self.umem_fd is not None:
            self.umem_fd.close()

    def __enter__(self) -> XskReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receive_all(receivers: Sequence[XskReceiver], count: int, timeout: float,
                keep: list[bytes] | None = None) -> int:
    """Receive on several sockets (e.g. one per queue) until ``count`` frames in all, or timeout."""
    poller = select.poll()
    for r in receivers:
        poller.register(r.sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    got = 0
    while got < count:
        n = sum(r.poll_batch(keep) for r in receivers)
        if n:
            got += n
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            break
        poller.poll(min(left, 0.1) * 1000)
    return got
