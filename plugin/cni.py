#!/usr/bin/env python3
"""afxdp CNI plugin: hand an allocated netdev to a pod, as the container runtime asks.

Installed on the host as ``/opt/cni/bin/afxdp`` (``afxdp install-cni``) and run
by the runtime (via Multus, which adds ``deviceID``) for every pod.  It needs
only the host's ``python3`` (3.8 or newer) and its standard library: the
privileged work (moving the netdev into the pod's netns, addresses, routes) is
done by the node daemon, reached on its local Unix socket, with the netns
passed as a file descriptor.

CNI spec 1.0.0 and 1.1.0: ADD, DEL, CHECK, VERSION, STATUS, GC.  Results and
errors are JSON on stdout; logs go to stderr (or ``logFile``).  Config keys
besides the standard ones: ``deviceID`` (or ``runtimeConfig.deviceID``),
``ipam`` (delegated), ``rename`` (false: keep the device's name; true: rename
it to CNI_IFNAME, restored on DEL), ``mtu``, ``daemonSocket``, ``logFile``.
See docs/cni.md.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import time
from typing import IO, Any

SUPPORTED_VERSIONS = ["1.0.0", "1.1.0"]
DEFAULT_DAEMON_SOCKET = "/run/afxdp/cni.sock"
DAEMON_TIMEOUT = 30.0

# CNI spec error codes, then ours (100+, docs/cni.md).
INCOMPATIBLE_VERSION = 1
BAD_ENV = 4
DECODE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
DAEMON_UNREACHABLE = 107
IPAM_FAILED = 108

REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": (),
    "GC": (),
}


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class Log:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: str, **kv: object) -> None:
        fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}"
                          for k, v in kv.items())
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.stream.write(f"ts={ts} plugin=afxdp event={event} {fields}\n")
        self.stream.flush()


# -- talking to the daemon --------------------------------------------------------------


def daemon_call(path: str, request: dict[str, Any], fd: int | None = None,
                timeout: float = DAEMON_TIMEOUT) -> dict[str, Any]:
    """One request (and optionally one fd) to the daemon; its ``result`` or CniError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise CniError(DAEMON_UNREACHABLE, f"afxdp daemon not reachable on {path}",
                           e.strerror or str(e)) from None
        data = json.dumps(request).encode()
        if fd is None:
            s.send(data)
        else:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        raw = s.recv(1 << 20)
    except TimeoutError:
        raise CniError(TRY_AGAIN, f"afxdp daemon on {path} did not answer in {timeout:.0f} s"
                       ) from None
    finally:
        s.close()
    if not raw:
        raise CniError(TRY_AGAIN, "afxdp daemon closed the connection without an answer")
    reply = json.loads(raw)
    if not reply.get("ok"):
        raise CniError(int(reply.get("code", TRY_AGAIN)), str(reply.get("msg")),
                       str(reply.get("details") or ""))
    result: dict[str, Any] = reply.get("result") or {}
    return result


# -- IPAM delegation --------------------------------------------------------------------


def find_plugin(name: str, cni_path: str) -> str:
    if "/" in name or not name:
        raise CniError(INVALID_CONFIG, f"ipam.type {name!r} is not a plugin name")
    for d in cni_path.split(":"):
        candidate = os.path.join(d, name)
        if d and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH {cni_path!r}")


def delegate(command: str, conf_bytes: bytes, conf: dict[str, Any], env: dict[str, str]
             ) -> dict[str, Any]:
    """Run the IPAM plugin with the same config and environment (but CNI_COMMAND)."""
    exe = find_plugin(str(conf["ipam"]["type"]), env.get("CNI_PATH", ""))
    proc = subprocess.run([exe], input=conf_bytes, capture_output=True,
                          env=dict(env, CNI_COMMAND=command), timeout=60)
    out = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        try:
            err = json.loads(out)
            code, msg = int(err.get("code", IPAM_FAILED)), str(err.get("msg", out))
            details = str(err.get("details") or "")
        except (ValueError, AttributeError):
            code, msg, details = IPAM_FAILED, out or "no output", proc.stderr.decode()[-500:]
        raise CniError(code, f"IPAM plugin {conf['ipam']['type']} {command} failed: {msg}",
                       details)
    if not out:
        return {}
    result: dict[str, Any] = json.loads(out)
    return result


# -- commands ------------------------------------------------------------------------------


def parse_config(raw: bytes, command: str) -> dict[str, Any]:
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise CniError(DECODE, "network configuration is not valid JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE, "network configuration is not a JSON object")
    version = conf.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    for key in ("name", "type"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise CniError(INVALID_CONFIG, f"config key {key!r} is required")
    ipam = conf.get("ipam")
    if ipam is not None and (not isinstance(ipam, dict) or
                             (ipam and not isinstance(ipam.get("type"), str))):
        raise CniError(INVALID_CONFIG, "ipam must be an object with a 'type'")
    if not isinstance(conf.get("rename", False), bool):
        raise CniError(INVALID_CONFIG, "rename must be true or false")
    mtu = conf.get("mtu", 0)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not (mtu == 0 or 68 <= mtu <= 65535):
        raise CniError(INVALID_CONFIG, f"mtu {mtu!r} is not 68..65535")
    if not isinstance(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), str):
        raise CniError(INVALID_CONFIG, "daemonSocket must be a path")
    if command in ("ADD", "CHECK") and not device_id(conf):
        raise CniError(INVALID_CONFIG, "no deviceID: Multus adds it from the device plugin's "
                       "allocation (or set runtimeConfig.deviceID)")
    return conf


def device_id(conf: dict[str, Any]) -> str:
    runtime = conf.get("runtimeConfig")
    from_runtime = runtime.get("deviceID") if isinstance(runtime, dict) else None
    value = conf.get("deviceID") or from_runtime or ""
    return str(value)


def has_ipam(conf: dict[str, Any]) -> bool:
    return bool(conf.get("ipam") and conf["ipam"].get("type"))


def cmd_add(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> dict[str, Any]:
    ipam: dict[str, Any] = {}
    if has_ipam(conf):
        ipam = delegate("ADD", raw, conf, env)
    try:
        try:
            netns_fd = os.open(env["CNI_NETNS"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CniError(BAD_ENV, f"cannot open CNI_NETNS {env['CNI_NETNS']!r}",
                           e.strerror or "") from None
        try:
            reply = daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), {
                "op": "add", "deviceID": device_id(conf), "containerID": env["CNI_CONTAINERID"],
                "ifname": env["CNI_IFNAME"], "netns": env["CNI_NETNS"],
                "rename": bool(conf.get("rename", False)), "mtu": int(conf.get("mtu", 0)),
                "ipam": ipam or None,
            }, netns_fd)
        finally:
            os.close(netns_fd)
    except BaseException:
        if has_ipam(conf):  # give the addresses back
            try:
                delegate("DEL", raw, conf, env)
            except CniError as e:
                log("ipam_rollback_failed", msg=e.msg)
        raise
    iface = reply["interface"]
    result: dict[str, Any] = {"cniVersion": conf["cniVersion"], "interfaces": [
        {"name": iface["name"], "mac": iface["mac"], "sandbox": env["CNI_NETNS"]}]}
    if ipam.get("ips"):
        result["ips"] = [dict(ip, interface=0) for ip in ipam["ips"]]
    for key in ("routes", "dns"):
        if ipam.get(key):
            result[key] = ipam[key]
    log("add", device=device_id(conf), container=env["CNI_CONTAINERID"], ifname=iface["name"])
    return result


def cmd_del(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> None:
    try:
        daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), {
            "op": "del", "deviceID": device_id(conf), "containerID": env["CNI_CONTAINERID"],
            "ifname": env["CNI_IFNAME"]})
    except CniError as e:
        # DEL must succeed: the daemon reconciles what is left at its next start.
        log("del_daemon_skipped", code=e.code, msg=e.msg)
    if has_ipam(conf):
        delegate("DEL", raw, conf, env)
    log("del", device=device_id(conf) or "-", container=env["CNI_CONTAINERID"])


def cmd_check(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> None:
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
    daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), {
        "op": "check", "deviceID": device_id(conf), "containerID": env["CNI_CONTAINERID"],
        "ips": prev.get("ips", [])})
    if has_ipam(conf):
        delegate("CHECK", raw, conf, env)


def cmd_status(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> None:
    try:
        daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), {"op": "status"},
                    timeout=5)
    except CniError as e:
        raise CniError(NOT_AVAILABLE, "the afxdp daemon is not available",
                       f"{e.msg}: {e.details}") from None


def cmd_gc(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> None:
    valid = conf.get("cni.dev/valid-attachments", [])
    if not isinstance(valid, list):
        raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    reply = daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET),
                        {"op": "gc", "valid": valid})
    log("gc", released=",".join(reply.get("released", [])) or "-")


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status,
            "GC": cmd_gc}


def run(env: dict[str, str], stdin: bytes, stdout: IO[str], stderr: IO[str]) -> int:
    command = env.get("CNI_COMMAND", "")
    version = "1.1.0"
    log = Log(stderr)
    try:
        if command == "VERSION":
            stdout.write(json.dumps({"cniVersion": "1.1.0",
                                     "supportedVersions": SUPPORTED_VERSIONS}) + "\n")
            return 0
        if command not in COMMANDS:
            raise CniError(BAD_ENV, f"CNI_COMMAND {command!r} is not one of "
                           "ADD, DEL, CHECK, VERSION, STATUS, GC")
        missing = [k for k in REQUIRED_ENV[command] if not env.get(k)]
        if missing:
            raise CniError(BAD_ENV, f"missing environment for {command}: {', '.join(missing)}")
        conf = parse_config(stdin, command)
        version = conf["cniVersion"]
        if conf.get("logFile"):
            log = Log(open(str(conf["logFile"]), "a"))  # noqa: SIM115 - for the process' life
        out = COMMANDS[command](conf, stdin, env, log)
        if out is not None:
            stdout.write(json.dumps(out) + "\n")
        return 0
    except CniError as e:
        log("error", command=command, code=e.code, msg=e.msg)
        stdout.write(json.dumps({"cniVersion": version, "code": e.code, "msg": e.msg,
                                 "details": e.details}) + "\n")
        return 1
    except Exception as e:  # never a traceback on stdout: a spec error instead
        log("internal_error", command=command, error=repr(e))
        stdout.write(json.dumps({"cniVersion": version, "code": TRY_AGAIN,
                                 "msg": "internal error in the afxdp CNI plugin",
                                 "details": repr(e)}) + "\n")
        return 1


def main() -> int:
    return run(dict(os.environ), sys.stdin.buffer.read() if not sys.stdin.isatty() else b"",
               sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
