"""Test traffic: build Ethernet/IPv4/UDP frames and send them on a netdev (AF_PACKET).

Used by the demo, the tests and the benchmarks to inject frames on the peer
end of a veth pair.  Needs CAP_NET_RAW in the netdev's namespace.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

ETH_P_IP = 0x0800
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def udp_frame(*, src_mac: str, dst_mac: str = BROADCAST, src_ip: str = "192.0.2.1",
              dst_ip: str = "192.0.2.2", sport: int = 40000, dport: int = 9,
              payload: bytes = b"") -> bytes:
    """One Ethernet II / IPv4 / UDP frame (UDP checksum left 0, as IPv4 allows)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ETH_P_IP) + ip + udp


def send_frames(ifname: str, count: int, *, dst_mac: str = BROADCAST, dport: int = 9,
                flows: int = 1, size: int = 64, tag: bytes = b"afxdp") -> int:
    """Send ``count`` frames on ``ifname``; ``flows`` varies the UDP source port.

    Each payload starts with ``tag`` and the frame's sequence number, so a
    receiver can check which frames arrived.  Retries on ENOBUFS.
    """
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((ifname, 0))
        src_mac = ":".join(f"{b:02x}" for b in s.getsockname()[4][:6])
        # Built before sending, so the send loop runs at the rate of send() alone.
        pad = b"\0" * max(0, size - 42 - len(tag) - 4)
        frames = [udp_frame(src_mac=src_mac, dst_mac=dst_mac, sport=40000 + seq % max(flows, 1),
                            dport=dport, payload=tag + struct.pack("!I", seq) + pad)
                  for seq in range(count)]
        sent = 0
        for frame in frames:
            for _ in range(1000):
                try:
                    s.send(frame)
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    time.sleep(0.0005)
            else:
                continue
            sent += 1
        return sent
