"""``afxdp``: the standalone daemon and the client side, for operators and tests.

Exit codes: 0 success, 1 runtime error, 2 bad usage or configuration,
3 the server refused a handshake step, 4 fewer frames received than asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpf.errors import BpfError
from cni_server import config as config_mod
from cni_server import logs
from cni_server.client import Client, HandshakeError
from cni_server.config import ConfigError
from cni_server.control import ControlError
from cni_server.fds import OwnedFd

EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_SHORT = 1, 2, 3, 4
log = logging.getLogger("afxdp")


def _fail(code: int, message: str) -> int:
    print(f"afxdp: {message}", file=sys.stderr)
    return code


# -- serve ---------------------------------------------------------------------


def _serve_overrides(a: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "netdevs": a.netdev, "socketDir": a.socket_dir, "allowHosts": a.allow_host,
        "xdpMode": a.xdp_mode, "socketMode": a.socket_mode, "socketOwner": a.socket_owner,
        "pinDir": a.pin_dir, "controlSocket": a.control_socket, "idleTimeout": a.idle_timeout,
        "maxConnections": a.max_connections, "maxConnectionsPerSocket": a.max_connections_per_socket,
        "handshakeSpinUs": a.handshake_spin_us, "watchInterval": a.watch_interval,
        "maxUmemBytes": a.max_umem_bytes,
        "bpfObject": a.bpf_object, "programName": a.program_name, "readyFile": a.ready_file,
        "logLevel": a.log_level,
        "logFormat": a.log_format, "metricsAddress": a.metrics_address,
    }
    raw = {k: v for k, v in pairs.items() if v is not None}
    for key in ("socketDir", "pinDir", "controlSocket", "bpfObject", "readyFile"):
        if raw.get(key):  # a flag's path is the caller's: made absolute here
            raw[key] = os.path.abspath(raw[key])
    if a.force:
        raw["forceReplace"] = True
    if a.no_peer_netns_check:
        raw["checkPeerNetns"] = False
    if a.allow_unbound_xsk:
        raw["allowUnboundXsk"] = True
    return raw


def cmd_serve(a: argparse.Namespace) -> int:
    from cni_server.node import DaemonError, freeze_imports
    from cni_server.server import ServerError
    from cni_server.standalone import standalone_daemon

    try:
        raw = config_mod.load_file(Path(a.config)) if a.config else {}
        raw.update(_serve_overrides(a))
        no_control = a.no_control_socket
        cfg = config_mod.validate(raw)
        if no_control:
            cfg.control_socket = None
    except ConfigError as e:
        return _fail(EXIT_USAGE, f"configuration: {e}")
    logs.setup(cfg.log_level, cfg.log_format)
    if os.geteuid() != 0:
        log.warning("event=not_root hint=attaching_XDP_needs_CAP_NET_ADMIN_and_CAP_BPF")
    daemon = standalone_daemon(cfg)
    try:
        freeze_imports()
        asyncio.run(daemon.run())
    except (BpfError, DaemonError, ServerError, ControlError, OSError) as e:
        log.error("event=start_failed error=%r", str(e))
        return _fail(EXIT_ERROR, str(e))
    log.info("event=stopped")
    return 0


# -- daemon (Kubernetes) ---------------------------------------------------------


def cmd_daemon(a: argparse.Namespace) -> int:
    from cni_server.node import DaemonError, freeze_imports
    from cni_server.ownership import OwnershipError
    from cni_server.programs import RegistryError
    from cni_server.safedir import UnsafeDirectory
    from cni_server.server import ServerError
    from cni_server.state import StateError
    from plugin.config import load
    from plugin.inventory import PoolConflict
    from plugin.kubernetes import kubernetes_daemon

    try:
        cfg = load(Path(a.config), node_name=a.node_name)
    except ConfigError as e:
        return _fail(EXIT_USAGE, f"configuration: {e}")
    if a.ready_file:
        cfg.ready_file = Path(a.ready_file).absolute()
    if a.metrics_address is not None:
        try:
            cfg.metrics_address = config_mod.address(a.metrics_address, "--metrics-address") \
                if a.metrics_address else ""
        except ConfigError as e:
            return _fail(EXIT_USAGE, f"configuration: {e}")
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        daemon = kubernetes_daemon(cfg)
        freeze_imports()
        asyncio.run(daemon.run())
    except (PoolConflict, ConfigError) as e:
        log.error("event=start_failed error=%r", str(e))
        return _fail(EXIT_USAGE, f"configuration: {e}")
    except (BpfError, ServerError, ControlError, RegistryError, StateError, OSError,
            UnsafeDirectory, OwnershipError, DaemonError) as e:
        log.error("event=start_failed error=%r", str(e))
        return _fail(EXIT_ERROR, str(e))
    log.info("event=stopped")
    return 0


# -- install-cni -------------------------------------------------------------------


def cmd_install_cni(a: argparse.Namespace) -> int:
    """Install the stdlib-only CNI plugin: DEST/NAME, a launcher started by the host's
    interpreter (``--python``) in isolated mode whatever the PATH, and the plugin
    itself in DEST/NAME.d, where the host's interpreter caches its bytecode (see
    plugin/cni_launcher.py).  Each file is replaced atomically, the launcher last."""
    import plugin.cni
    import plugin.cni_launcher

    if not a.python.startswith("/"):
        return _fail(EXIT_USAGE, f"--python {a.python!r} must be an absolute path: runtimes "
                                 "run the plugin with a PATH of their own")
    dest = Path(a.dest)
    target = dest / a.name
    lib = dest / f"{a.name}.d"

    def without_shebang(module: Any) -> str:
        source = Path(module.__file__).read_text()
        return source.split("\n", 1)[1] if source.startswith("#!") else source
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for d in (lib, lib / "__pycache__"):
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                d.unlink()
            d.mkdir(mode=0o755, exist_ok=True)
            _own(d, 0o755)
        for old in (lib / "__pycache__").iterdir():  # bytecode of an earlier version
            old.unlink()
        _write_atomically(lib / f"{plugin.cni_launcher.MODULE}.py",
                          without_shebang(plugin.cni), 0o644)
        _write_atomically(target, f"#!{a.python} -IS\n{without_shebang(plugin.cni_launcher)}",
                          0o755)
    except OSError as e:
        return _fail(EXIT_ERROR, f"installing the CNI plugin in {dest}: {e.strerror or e}")
    print(f"installed {target} (the plugin in {lib})")
    return 0


def _write_atomically(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    _own(tmp, mode)
    tmp.replace(path)


def _own(path: Path, mode: int) -> None:
    """Root's, ``mode``: the launcher runs nothing else.  (Installed by another user,
    the plugin refuses to run, as it should: the runtime runs it as root.)"""
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
    path.chmod(mode)


# -- request -------------------------------------------------------------------


def _default_socket(netdev: str) -> str:
    return str(config_mod.DEFAULT_SOCKET_DIR / netdev / "afxdp.sock")


def fd_info(fd: int) -> dict[str, str]:
    """What /proc says about one of our fds (map type, id, entries for a BPF map)."""
    info: dict[str, str] = {}
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


def cmd_request(a: argparse.Namespace) -> int:
    path = a.socket or _default_socket(a.netdev)
    steps: list[dict[str, Any]] = []
    fd: OwnedFd | None = None
    try:
        with Client(path, timeout=a.timeout) as c:
            host = a.hostname or socket.gethostname()
            c.connect(host)
            steps.append({"request": f"/connect,{host}", "reply": "/host_ok"})
            steps.append({"request": "/version", "reply": c.version()})
            fd = c.xsk_map_fd(a.netdev)
            steps.append({"request": f"/xsk_map_fd,{a.netdev}", "reply": "/fd_ack",
                          "fd": fd.fileno()})
            c.fin()
            steps.append({"request": "/fin", "reply": "/fin_ack"})
    except HandshakeError as e:
        if fd is not None:
            fd.close()
        steps.append({"request": e.request, "reply": e.reply})
        _print_steps(a, steps, None)
        return _fail(EXIT_REFUSED, f"{path}: {e}")
    except OSError as e:
        if fd is not None:
            fd.close()
        return _fail(EXIT_ERROR, f"{path}: {e.strerror or e}")
    assert fd is not None
    info = fd_info(fd.fileno())
    _print_steps(a, steps, info)
    if not a.command:
        fd.close()
        return 0
    raw = fd.detach()
    os.set_inheritable(raw, True)
    env = dict(os.environ, AFXDP_XSKMAP_FD=str(raw), AFXDP_NETDEV=a.netdev)
    cmd = a.command[1:] if a.command[0] == "--" else a.command
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        os.close(raw)
        return _fail(127 if isinstance(e, FileNotFoundError) else 126, f"{cmd[0]}: {e.strerror}")


def _print_steps(a: argparse.Namespace, steps: list[dict[str, Any]],
                 info: dict[str, str] | None) -> None:
    out = sys.stderr if a.command else sys.stdout
    if a.json:
        doc: dict[str, Any] = {"steps": steps}
        if info is not None:
            doc["map"] = {"id": int(info.get("map_id", "0")), "type": int(info.get("map_type", "0")),
                          "max_entries": int(info.get("max_entries", "0"))}
        print(json.dumps(doc), file=out)
        return
    for s in steps:
        extra = f" (fd {s['fd']})" if "fd" in s else ""
        print(f"{s['request']:<28} -> {s['reply']}{extra}", file=out)
    if info is not None:
        print(f"XSKMAP id {info.get('map_id')} type {info.get('map_type')} "
              f"max_entries {info.get('max_entries')}", file=out)


# -- status --------------------------------------------------------------------


def cmd_status(a: argparse.Namespace) -> int:
    from cni_server.control import call

    doc: dict[str, Any] = {"daemon": None, "xdp": _kernel_view()}
    error = ""
    try:
        doc["daemon"] = call(Path(a.control_socket), {"op": "status"})["status"]
    except ControlError as e:
        error = str(e)
    if a.json:
        doc["daemon_error"] = error or None
        print(json.dumps(doc, indent=2))
    else:
        _print_status(doc, error)
    return 0 if not error else EXIT_ERROR


def _kernel_view() -> list[dict[str, Any]]:
    """XDP programs attached in this netns: which build of ours (by tag and map
    layout, not by name alone) or foreign, and which daemon serves the netdev."""
    from pyroute2 import IPRoute

    from bpf.program import identify, query
    from cni_server.netns import thread_netns_inode
    from cni_server.ownership import describe_holder, holder_of

    rows = []
    inode = thread_netns_inode()
    with IPRoute() as ipr:
        links = [(int(link["index"]), link.get("ifname")) for link in ipr.get_links()]
    for ifindex, name in links:
        try:
            st = query(ifindex)
            who = identify(st)
        except BpfError:
            continue
        if st.attached:
            holder = holder_of(name, inode) if name else None
            rows.append({"netdev": name, "prog_id": st.prog_id, "mode": st.mode,
                         "name": st.name, "tag": st.tag, "ours": who != "foreign",
                         "build": who, "served_by": describe_holder(holder) if holder else None})
    return rows


def _print_status(doc: dict[str, Any], error: str) -> None:
    d = doc["daemon"]
    if d is None:
        print(f"{error} (is `afxdp serve` or `afxdp daemon` running? "
              "--control-socket names its control socket)")
    else:
        srv = d["server"]
        mode = f" node {d['node']} (kubernetes mode)" if "node" in d else ""
        print(f"daemon: pid {d['pid']} on {d['hostname']}{mode}, {srv['sockets']} socket(s), "
              f"{srv['connections']} connection(s), fds sent {srv['fds_sent']}")
        print(f"  handshakes: {json.dumps(srv['handshakes'], sort_keys=True)}")
        for name, pool in d.get("pools", {}).items():
            healthy = sum(1 for dev in pool["devices"].values() if dev["healthy"])
            print(f"  pool {name} ({pool['resource']}, "
                  f"{'registered' if pool['registered'] else 'not registered'}): "
                  f"{healthy} of {len(pool['devices'])} device(s) healthy")
            for dev_name, dev in sorted(pool["devices"].items()):
                if not dev["healthy"]:
                    print(f"    {dev_name}: unhealthy: {dev['reason']}")
        for alloc in d["allocations"]:
            owner = f" for {alloc['owner']}" if alloc.get("owner") else ""
            conns = (f" ({alloc['connections']} connection(s))" if "connections" in alloc
                     else "")
            print(f"  allocation {alloc['id']}{owner}: sockets {', '.join(alloc['sockets']) or '-'}"
                  f"{conns}")
            for name, dev in alloc["devices"].items():
                pin = f", pinned XSKMAP at {dev['pin']}" if dev.get("pin") else ""
                print(f"    {name}: {dev['mode']} mode, prog {dev['prog_id']}, map {dev['map_id']}, "
                      f"{dev['queues']} queue(s){pin}")
    print("XDP programs in this network namespace:")
    if not doc["xdp"]:
        print("  none")
    for row in doc["xdp"]:
        owner = f"ours, {row['build']}" if row["ours"] else "foreign"
        served = (f", served by daemon {row['served_by']}" if row["served_by"]
                  else ", served by no daemon" if row["ours"] else "")
        print(f"  {row['netdev']}: prog {row['prog_id']} '{row['name']}' {row['mode']} mode "
              f"({owner}{served})")


# -- receive / send (test traffic) -----------------------------------------------


def cmd_receive(a: argparse.Namespace) -> int:
    from bpf import bpffs
    from cni_server import client as client_mod
    from cni_server.receiver import XskReceiver, receive_all

    path = a.socket or _default_socket(a.netdev)
    queues = a.queue or [0]
    receivers: list[XskReceiver] = []
    kw = {"frames": a.frames, "ring_size": a.frames}
    try:
        if a.mode == "xsk":
            for q in queues:
                sock, umem = client_mod.fetch_bound_xsk(path, a.netdev, q, a.frames, 2048,
                                                        a.hostname)
                try:
                    r = XskReceiver.from_bound(sock, umem, frames=a.frames, frame_size=2048)
                except BaseException:
                    sock.close()
                    umem.close()
                    raise
                receivers.append(r)
        elif a.mode == "xsk-unbound":
            for q in queues:
                sock = client_mod.fetch_xsk_socket(path, a.netdev, q, a.hostname)
                try:
                    r = XskReceiver(sock, **kw)
                except BaseException:
                    sock.close()
                    raise
                receivers.append(r)
                client_mod.bind_xsk_socket(path, a.netdev, q, r.sock.fileno(), a.hostname)
        else:
            ifindex = socket.if_nametoindex(a.netdev)
            for q in queues:
                # One handshake per queue, as DPDK does in rte_eth_rx_queue_setup.
                if a.mode == "pinned":
                    map_fd = OwnedFd(bpffs.open_pinned(Path(a.pin)))
                else:
                    map_fd = client_mod.fetch_map_fd(path, a.netdev, a.hostname)
                with map_fd:
                    r = XskReceiver.with_own_socket(**kw)
                    receivers.append(r)
                    r.bind(ifindex, q)
                    r.insert(map_fd.fileno(), q)
        if a.ready_file:
            Path(a.ready_file).write_text("ready\n")
        got = receive_all(receivers, a.count, a.timeout)
        stats = [r.stats().__dict__ for r in receivers]
    except HandshakeError as e:
        return _fail(EXIT_REFUSED, f"{path}: {e}")
    except (OSError, BpfError) as e:
        return _fail(EXIT_ERROR, str(e))
    finally:
        for r in receivers:
            r.close()
    doc = {"mode": a.mode, "netdev": a.netdev, "queues": queues, "received": got,
           "wanted": a.count, "uid": os.getuid(), "stats": stats}
    print(json.dumps(doc) if a.json else f"received {got} of {a.count} frames on "
          f"{a.netdev} queues {queues} ({a.mode} mode)")
    return 0 if got >= a.count else EXIT_SHORT


def cmd_send(a: argparse.Namespace) -> int:
    from cni_server.traffic import send_frames

    try:
        sent = send_frames(a.netdev, a.count, flows=a.flows, size=a.size, dst_mac=a.dst_mac)
    except OSError as e:
        return _fail(EXIT_ERROR, f"sending on {a.netdev}: {e.strerror or e}")
    print(json.dumps({"sent": sent}) if a.json else f"sent {sent} frames on {a.netdev}")
    return 0


# -- parser ----------------------------------------------------------------------


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, where it has one (options merged with a config
    file have none here: their help text says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afxdp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the standalone daemon", formatter_class=_Help)
    s.add_argument("--config", metavar="FILE",
                   help="YAML file with the same settings (flags override it)")
    s.add_argument("--netdev", action="append", metavar="NAME",
                   help="netdev to serve; repeat for several (required, unless the --config "
                        "file lists netdevs)")
    s.add_argument("--socket-dir", metavar="DIR",
                   help="serve DIR/<netdev>/afxdp.sock (default /tmp/afxdp_dp)")
    s.add_argument("--allow-host", action="append", metavar="HOST",
                   help="hostname clients may /connect with (repeatable; default: this host)")
    s.add_argument("--xdp-mode", choices=["auto", "native", "skb"],
                   help="where to attach: the driver's hook, the generic one, or native with "
                        "fallback to skb (default auto)")
    s.add_argument("--socket-mode", metavar="MODE", help="octal mode of sockets and pins (default 0660)")
    s.add_argument("--socket-owner", metavar="USER[:GROUP]",
                   help="owner of sockets and pins, names or numbers (default: root)")
    s.add_argument("--pin-dir", metavar="DIR",
                   help="also pin each XSKMAP at DIR/<netdev>/xsks_map, in bpffs (default: "
                        "no pins)")
    s.add_argument("--control-socket", metavar="PATH",
                   help="status socket (default /run/afxdp/control.sock)")
    s.add_argument("--no-control-socket", action="store_true", help="serve no control socket")
    s.add_argument("--force", action="store_true",
                   help="replace a foreign XDP program instead of refusing")
    s.add_argument("--no-peer-netns-check", action="store_true",
                   help="do not require clients to live in the netdev's network namespace")
    s.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="close a client connection silent this long (default 30)")
    s.add_argument("--max-connections", type=int, metavar="N",
                   help="client connections in all (default 4096)")
    s.add_argument("--max-connections-per-socket", type=int, metavar="N",
                   help="client connections per served socket (default 128)")
    s.add_argument("--handshake-spin-us", type=int, metavar="US",
                   help="poll this long for a handshake's next request before yielding to "
                        "the event loop (default 50; 0: off)")
    s.add_argument("--allow-unbound-xsk", action="store_true",
                   help="let /xsk_socket hand out unbound AF_XDP sockets, which a client can "
                        "bind to any netdev of its namespace (risky: see docs/security.md)")
    s.add_argument("--max-umem-bytes", type=int, metavar="BYTES",
                   help="most UMEM one daemon-made socket may have (default 64 MiB)")
    s.add_argument("--watch-interval", type=float, metavar="SECONDS",
                   help="check this often that each netdev still carries our program, and "
                        "put it back if not (default 1; 0: off)")
    s.add_argument("--bpf-object", metavar="FILE",
                   help="compiled redirect program (default: the one built with afxdp)")
    s.add_argument("--program-name", help="the program in --bpf-object (default: afxdp_redirect)")
    s.add_argument("--ready-file", metavar="FILE",
                   help="write status JSON here once sockets are served (default: none)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="(default info)")
    s.add_argument("--log-format", choices=["kv", "json"],
                   help="key=value lines or JSON objects (default kv)")
    s.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve /metrics, /healthz, /readyz here (default: off)")
    s.set_defaults(fn=cmd_serve)

    dm = sub.add_parser("daemon", help="run the Kubernetes node daemon (device plugin)",
                        formatter_class=_Help)
    dm.add_argument("--config", required=True, help="YAML configuration (docs/kubernetes.md)")
    dm.add_argument("--node-name", help="this node's name (default: $NODE_NAME, else hostname)")
    dm.add_argument("--ready-file", help="write status JSON here once registered")
    dm.add_argument("--metrics-address", metavar="HOST:PORT",
                    help="serve /metrics, /healthz, /readyz here, overriding the config's "
                         "metricsAddress ('' turns it off; the config's default: "
                         "127.0.0.1:9402)")
    dm.set_defaults(fn=cmd_daemon)

    ic = sub.add_parser("install-cni", help="install the CNI executable (host python3, stdlib)",
                        formatter_class=_Help)
    ic.add_argument("--dest", default="/opt/cni/bin")
    ic.add_argument("--name", default="afxdp")
    ic.add_argument("--python", default="/usr/bin/python3", metavar="PATH",
                    help="the host's interpreter, as the host sees it (the plugin runs there)")
    ic.set_defaults(fn=cmd_install_cni)

    r = sub.add_parser("request", help="run the handshake and print (or pass on) the map fd",
                       formatter_class=_Help)
    r.add_argument("--socket", help="default /tmp/afxdp_dp/<netdev>/afxdp.sock")
    r.add_argument("--netdev", required=True)
    r.add_argument("--hostname", help="name sent in /connect (default: gethostname())")
    r.add_argument("--json", action="store_true")
    r.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="for each reply")
    r.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS: exec CMD with the fd inherited, its number in "
                        "AFXDP_XSKMAP_FD")
    r.set_defaults(fn=cmd_request)

    st = sub.add_parser("status", help="what the daemon serves and what is attached",
                        formatter_class=_Help)
    st.add_argument("--control-socket", default=str(config_mod.DEFAULT_CONTROL_SOCKET))
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    rc = sub.add_parser("receive", help="receive frames through a handed-out fd (test client)",
                        formatter_class=_Help)
    rc.add_argument("--socket", metavar="PATH",
                    help="the handout socket (default /tmp/afxdp_dp/<netdev>/afxdp.sock)")
    rc.add_argument("--netdev", required=True, help="the netdev to receive on")
    rc.add_argument("--queue", type=int, action="append", help="repeatable (default 0)")
    rc.add_argument("--mode", choices=["map", "xsk", "xsk-unbound", "pinned"], default="map",
                    help="map: XSKMAP fd, own socket (CAP_NET_RAW); xsk: a socket the daemon "
                         "made and bound, no capability; xsk-unbound: an unbound socket the "
                         "client has bound (only where the daemon allows it); pinned: "
                         "bpf_obj_get(--pin)")
    rc.add_argument("--pin", help="pinned XSKMAP path (pinned mode)")
    rc.add_argument("--hostname", help="name sent in /connect (default: gethostname())")
    rc.add_argument("--count", type=int, default=1000, help="frames to wait for")
    rc.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="give up after this long")
    rc.add_argument("--frames", type=int, default=2048, help="UMEM frames per queue")
    rc.add_argument("--ready-file", help="written once the socket is in the map")
    rc.add_argument("--json", action="store_true", help="print a JSON report")
    rc.set_defaults(fn=cmd_receive)

    se = sub.add_parser("send", help="send test UDP frames on a netdev (AF_PACKET)",
                        formatter_class=_Help)
    se.add_argument("--netdev", required=True,
                    help="where to send: the peer of the served netdev (e.g. the other end "
                         "of a veth pair)")
    se.add_argument("--count", type=int, default=1000, help="frames to send")
    se.add_argument("--flows", type=int, default=1, help="distinct UDP source ports")
    se.add_argument("--size", type=int, default=64, help="frame size in bytes")
    se.add_argument("--dst-mac", default="ff:ff:ff:ff:ff:ff", help="destination MAC address")
    se.add_argument("--json", action="store_true", help="print a JSON report")
    se.set_defaults(fn=cmd_send)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "request" and args.command and args.command[0] == "--" and len(args.command) == 1:
        return _fail(EXIT_USAGE, "nothing to run after --")
    if args.cmd == "receive" and args.mode == "pinned" and not args.pin:
        return _fail(EXIT_USAGE, "--mode pinned needs --pin PATH")
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
