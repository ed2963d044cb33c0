#!/usr/bin/env python3
"""The main job, end to end, on this machine (run as root: ``make demo``).

1. A network namespace with a veth pair ``va`` <-> ``vb``.
2. ``afxdp serve --netdev va``: attaches the redirect program to ``va`` and
   serves ``<dir>/va/afxdp.sock`` (owned by uid 65534), pinning the XSKMAP too.
3. Three unprivileged clients (uid 65534) each receive every frame injected on
   ``vb``:
   - DPDK's ``use_cni`` way: the XSKMAP fd over the socket, own AF_XDP socket
     (needs CAP_NET_RAW + CAP_IPC_LOCK);
   - our extension: a daemon-made AF_XDP socket, bound by the daemon (needs no
     capability at all);
   - DPDK's ``use_pinned_map`` way: the pinned XSKMAP (CAP_NET_RAW + CAP_IPC_LOCK).
4. ``afxdp status``, then SIGTERM: the program is detached, sockets and pins removed.

Exit status 0 only if every client received every frame and nothing was left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bpf import bpffs
from tests.kernel import ClientRuntime, Daemon, make_netns, run, setpriv, wait_for

FRAMES = 1000


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    # Interrupted or terminated: leave through the finally blocks, which clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("demo: run as root (it creates a netns and attaches an XDP program)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afxdp-demo-", dir="/tmp"))
    work.chmod(0o755)
    (work / "out").mkdir()
    (work / "out").chmod(0o1777)
    runtime = ClientRuntime()
    ok = True
    daemon: Daemon | None = None
    try:
        with make_netns() as ns:
            say(f"netns {ns.name}: veth pair va <-> vb (one queue each)")
            ns.veth()
            sock_dir, pin_dir = work / "sock", work / "pins"
            say("afxdp serve --netdev va --socket-owner 65534:65534 --pin-dir ...")
            daemon = Daemon(ns, work, "--netdev", "va", "--socket-dir", str(sock_dir),
                            "--socket-owner", "65534:65534", "--pin-dir", str(pin_dir))
            sock = sock_dir / "va" / "afxdp.sock"
            pin = pin_dir / "va" / "xsks_map"
            print(f"serving {sock}; XSKMAP pinned at {pin}; XDP prog id {ns.xdp_prog_id('va')}")
            clients = [
                ("XSKMAP fd over the socket (DPDK use_cni)", ("net_raw", "ipc_lock"),
                 ["--socket", str(sock), "--mode", "map"]),
                ("AF_XDP socket made, bound and put in the map by the daemon (/xsk_bound_socket)", (),
                 ["--socket", str(sock), "--mode", "xsk"]),
                ("pinned XSKMAP (DPDK use_pinned_map)", ("net_raw", "ipc_lock"),
                 ["--mode", "pinned", "--pin", str(pin)]),
            ]
            for i, (what, caps, args) in enumerate(clients):
                say(f"client {i + 1}: uid 65534, capabilities: {', '.join(caps) or 'none'}; {what}")
                ready = work / "out" / f"ready-{i}"
                proc = subprocess.Popen(
                    ns.cmd(*setpriv(*caps), *runtime.argv(
                        "receive", "--netdev", "va", "--count", str(FRAMES), "--timeout", "15",
                        "--json", "--ready-file", str(ready), *args)),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=runtime.env(), cwd=runtime.dir)
                wait_for(ready, 15, proc)
                run(*ns.cmd(sys.executable, "-m", "cni_server.cli", "send", "--netdev", "vb",
                            "--count", str(FRAMES)))
                out, err = proc.communicate(timeout=30)
                if proc.returncode != 0:
                    print(f"FAILED: {err.strip() or out.strip()}")
                    ok = False
                    continue
                report = json.loads(out)
                print(f"sent {FRAMES} frames on vb; client received {report['received']} "
                      f"(as uid {report['uid']}, mode {report['mode']})")
                ok &= report["received"] == FRAMES
            say("afxdp status")
            print(run(*ns.cmd(sys.executable, "-m", "cni_server.cli", "status",
                              "--control-socket", str(daemon.control))).stdout.rstrip())
            say("daemon log (one line per handshake)")
            for line in daemon.log().splitlines():
                if "event=handshake" in line:
                    print(line.split(" logger=")[1])
            say("SIGTERM")
            code = daemon.stop(signal.SIGTERM)
            left = [str(p) for p in (sock, pin) if p.exists()]
            print(f"daemon exit status {code}; XDP prog on va: {ns.xdp_prog_id('va') or 'none'}; "
                  f"left behind: {left or 'nothing'}")
            ok &= code == 0 and not left and ns.xdp_prog_id("va") == 0
    finally:
        if daemon is not None:
            daemon.stop()  # SIGTERM: the daemon removes its sockets, pins and bpffs mount
        if bpffs.is_bpffs(work / "pins"):
            bpffs.unmount(work / "pins")
        runtime.close()
        shutil.rmtree(work, ignore_errors=True)
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
