#!/usr/bin/python3 -IS
"""afxdp CNI plugin: hand an allocated netdev to a pod, as the container runtime asks.

Installed on the host as ``/opt/cni/bin/afxdp`` (``afxdp install-cni``) and run
by the runtime (via Multus, which adds ``deviceID``) for every pod.  It needs
only the host's system ``python3`` (3.8 or newer) and its standard library,
started by path in isolated mode (``-IS``: no PATH lookup, no site packages, no
PYTHON* variables), so a runtime's PATH or a user's Python cannot change it: the
privileged work (moving the netdev into the pod's netns, addresses, routes) is
done by the node daemon, reached on its local Unix socket, with the netns
passed as a file descriptor.

CNI spec 0.3.0 to 1.1.0: ADD, DEL, CHECK (0.4.0 on), VERSION, STATUS and GC (1.1.0),
with each version's result shape.  Results and
errors are JSON on stdout; logs go to stderr (or ``logFile``).  Config keys
besides the standard ones: ``deviceID`` (or ``runtimeConfig.deviceID``),
``ipam`` (delegated), ``rename`` (true, the default: the pod sees the device as
CNI_IFNAME, as the spec asks and chained plugins expect; its own name comes back
on DEL; false keeps the device's name), ``mtu``, ``daemonSocket``, ``logFile``.
See docs/cni.md.

The config is tenant input (NetworkAttachmentDefinitions are written by
namespace users): ``runtimeConfig.deviceID`` (set by the runtime from the
device plugin's allocation) wins over a config value, the daemon checks that
the pod named in ``CNI_ARGS`` owns the device, ``logFile`` can only name a file
in ``LOG_DIR``, and the daemon at ``daemonSocket`` must run as root.
"""

from __future__ import annotations

# Start-up is most of this executable's cost (a runtime runs it for every pod), so
# it imports only modules built into the interpreter or written in C: no json
# package (it brings re, enum, functools and collections: 10 ms, as much as the
# interpreter's own start), no subprocess, socket.py or typing (mypy reads the
# names below; Python never imports them), and posix rather than os, which is
# posix plus os.path and os.environ built on _collections_abc's classes (1.5 ms, a
# fifth of the interpreter's start).
import _socket
import fcntl
import posix
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
# Commands the spec added after 0.3: a config of an older version may not ask for them.
COMMAND_SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}
DEFAULT_DAEMON_SOCKET = "/run/afxdp/cni.sock"
DAEMON_TIMEOUT = 30.0
# Where logFile may write: fixed by the node's installation, never by a config.
LOG_DIR = "/var/log/afxdp"
_NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd (linux/nsfs.h)
_CLONE_NEWNET = 0x40000000
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/@+,-")

# CNI spec error codes, then ours (100+, docs/cni.md).
INCOMPATIBLE_VERSION = 1
BAD_ENV = 4
DECODE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
DAEMON_UNREACHABLE = 107
IPAM_FAILED = 108
UNTRUSTED_DAEMON = 110

REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": (),
    "GC": (),
}


# -- JSON ------------------------------------------------------------------------------
# The json package's own C codec (_json), driven as json.loads/json.dumps drive it
# with their defaults; the package is imported only where _json is missing, or by
# _json itself to raise a decode error.


class _DecodeContext:  # the attributes _json.make_scanner reads from a JSONDecoder
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_JSON_SPACE = " \t\n\r"

_scan: Any = None  # _json's scanner; None: an interpreter without the C codec
_encoder: Any = None
try:
    import _json
    _scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
    _encoder = (_json.make_encoder, _json.encode_basestring_ascii)
except (ImportError, AttributeError):
    pass


def loads(data: bytes | str) -> Any:
    """As ``json.loads`` (UTF-8 bytes or str): the value, or ValueError."""
    if _scan is None:
        import json
        return json.loads(data)
    if isinstance(data, (bytes, bytearray)):
        # Bytes may start with a BOM, as json allows (cut here: the utf-8-sig codec
        # would be one more import).
        text = (data[3:] if data[:3] == b"\xef\xbb\xbf" else data).decode("utf-8")
    elif data.startswith("\ufeff"):
        raise _decode_error("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    else:
        text = data
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as e:
        raise _decode_error("Expecting value", text, e.value) from None
    except Exception:  # _json builds its errors from json.decoder's class, loaded here:
        import json  # only a refused document pays for the package, to get json's message
        return json.loads(text)
    rest = len(text) - len(text[end:].lstrip(_JSON_SPACE))
    if rest != len(text):
        raise _decode_error("Extra data", text, rest)
    return value


def _decode_error(what: str, text: str, pos: int) -> ValueError:
    """json's message for the same error: what, line, column and char offset."""
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return ValueError(f"{what}: line {line} column {column} (char {pos})")


def dumps(value: object) -> str:
    """As ``json.dumps(value)`` with its defaults."""
    if _encoder is None:
        import json
        return json.dumps(value)
    make_encoder, ascii_string = _encoder
    encode = make_encoder({}, _not_serializable, ascii_string, None, ": ", ", ", False, False,
                          True)
    return "".join(encode(value, 0))


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
        # Values come from the config and the environment: escaped, so none can
        # forge a field or a line.
        fields = " ".join(f"{k}={_esc(v)}" for k, v in kv.items())
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.stream.write(f"ts={ts} plugin=afxdp event={event} {fields}\n")
        self.stream.flush()


def _esc(value: object) -> str:
    text = str(value)
    return text if text and _BARE.issuperset(text) else dumps(text)


_S_IFMT, _S_IFDIR, _S_IFREG = 0o170000, 0o040000, 0o100000


def _is(mode: int, kind: int) -> bool:
    return mode & _S_IFMT == kind


def open_log(name: object) -> Log:
    """``logFile``: a file in LOG_DIR (a bare name, or LOG_DIR/<name>), appended to,
    never through a symlink; LOG_DIR is created (0750) if missing and must be a
    directory only root can write."""
    text = str(name)
    base = text[len(LOG_DIR) + 1:] if text.startswith(LOG_DIR + "/") else text
    if not base or "/" in base or base in (".", "..") or "\0" in base:
        raise CniError(INVALID_CONFIG, f"logFile {text!r} must be a file name in {LOG_DIR}")
    try:
        posix.mkdir(LOG_DIR, 0o750)
    except FileExistsError:
        pass
    except OSError as e:
        raise CniError(INVALID_CONFIG, f"cannot create {LOG_DIR}", e.strerror or "") from None
    st = posix.lstat(LOG_DIR)
    if not _is(st.st_mode, _S_IFDIR) or st.st_uid != 0 or st.st_mode & 0o022:
        raise CniError(INVALID_CONFIG, f"{LOG_DIR} is not a directory only root can write")
    dir_fd = posix.open(LOG_DIR, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW
                        | posix.O_CLOEXEC)
    try:
        fd = posix.open(base, posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_NOFOLLOW
                        | posix.O_CLOEXEC | posix.O_NONBLOCK, 0o640, dir_fd=dir_fd)
    except OSError as e:
        raise CniError(INVALID_CONFIG, f"cannot open logFile {LOG_DIR}/{base}",
                       e.strerror or "") from None
    finally:
        posix.close(dir_fd)
    if not _is(posix.fstat(fd).st_mode, _S_IFREG):
        posix.close(fd)
        raise CniError(INVALID_CONFIG, f"logFile {LOG_DIR}/{base} is not a regular file")
    return Log(open(fd, "a"))


def open_netns(path: str) -> int:
    """An fd for CNI_NETNS, checked to be a network namespace (a FIFO or a plain
    file there must fail at once, not hang or be passed on)."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK)
    except OSError as e:
        raise CniError(BAD_ENV, f"cannot open CNI_NETNS {path!r}", e.strerror or "") from None
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != _CLONE_NEWNET:
        posix.close(fd)
        raise CniError(BAD_ENV, f"CNI_NETNS {path!r} is not a network namespace")
    return fd


def _vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def result_ips(ips: list[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    """IPAM's addresses as our result's, for the config's CNI version: before 1.0.0
    each carries ``version`` ("4"/"6"); 1.0.0 dropped the field."""
    out = []
    for ip in ips:
        entry = {k: v for k, v in ip.items() if k != "version"}
        entry["interface"] = 0
        if _vtuple(version) < (1, 0, 0):
            entry["version"] = "6" if ":" in str(ip.get("address", "")) else "4"
        out.append(entry)
    return out


def _version_asked(stdin: bytes) -> str:
    try:
        doc = loads(stdin) if stdin.strip() else {}
    except ValueError:
        return ""
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) else ""


def pod_from_args(env: dict[str, str]) -> dict[str, str]:
    """K8S_POD_NAMESPACE and K8S_POD_NAME from CNI_ARGS ("K=V;K=V"), set by the runtime."""
    args = dict(part.split("=", 1) for part in env.get("CNI_ARGS", "").split(";") if "=" in part)
    return {"namespace": args.get("K8S_POD_NAMESPACE", ""), "name": args.get("K8S_POD_NAME", "")}


# -- talking to the daemon --------------------------------------------------------------


class DaemonCall:
    """One connection to the daemon: a request (with an fd, if any), perhaps a
    follow-up datagram, then the reply."""

    def __init__(self, path: str, timeout: float = DAEMON_TIMEOUT) -> None:
        self.path, self.timeout = path, timeout
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except OSError as e:
                raise CniError(DAEMON_UNREACHABLE, f"afxdp daemon not reachable on {path}",
                               e.strerror or str(e)) from None
            # We are about to pass the pod's netns: only to the daemon, which runs as root.
            cred = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            uid = int.from_bytes(cred[4:8], sys.byteorder, signed=True)  # pid, uid, gid
            if uid != 0:
                raise CniError(UNTRUSTED_DAEMON, f"the server on {path} runs as uid {uid}, "
                               "not root: it is not the afxdp daemon")
        except BaseException:
            self.sock.close()
            raise

    def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        data = dumps(message).encode()
        try:
            if fd is None:
                self.sock.send(data)
            else:
                self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                            fd.to_bytes(4, sys.byteorder))])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered already (and closed): reply() reads why
        except (TimeoutError, _socket.timeout):
            raise self._timeout() from None

    def reply(self) -> dict[str, Any]:
        """The daemon's ``result``, or CniError with its error."""
        try:
            try:
                raw = self.sock.recv(1 << 20)
            except ConnectionResetError:
                # The daemon closed with our follow-up unread (it had answered early):
                # the kernel reports that first, then the answer it queued.
                raw = self.sock.recv(1 << 20)
        except (TimeoutError, _socket.timeout):  # the same class from Python 3.10 on
            raise self._timeout() from None
        if not raw:
            raise CniError(TRY_AGAIN, "afxdp daemon closed the connection without an answer")
        reply = loads(raw)
        if not reply.get("ok"):
            raise CniError(int(reply.get("code", TRY_AGAIN)), str(reply.get("msg")),
                           str(reply.get("details") or ""))
        result: dict[str, Any] = reply.get("result") or {}
        return result

    def _timeout(self) -> CniError:
        return CniError(TRY_AGAIN, f"afxdp daemon on {self.path} did not answer in "
                        f"{self.timeout:.0f} s")

    def close(self) -> None:
        self.sock.close()


def daemon_call(path: str, request: dict[str, Any], fd: int | None = None,
                timeout: float = DAEMON_TIMEOUT) -> dict[str, Any]:
    """One request (and optionally one fd) to the daemon; its ``result`` or CniError."""
    call = DaemonCall(path, timeout)
    try:
        call.send(request, fd)
        return call.reply()
    finally:
        call.close()


# -- IPAM delegation --------------------------------------------------------------------


def find_plugin(name: str, cni_path: str) -> str:
    if "/" in name or not name:
        raise CniError(INVALID_CONFIG, f"ipam.type {name!r} is not a plugin name")
    for d in cni_path.split(":"):
        candidate = d.rstrip("/") + "/" + name
        if d and posix.access(candidate, posix.X_OK):
            return candidate
    raise CniError(INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH {cni_path!r}")


_SIGKILL = 9  # (the signal module would cost its import)


class Child:
    """A plugin we run (IPAM): started at once, its answer collected by ``wait``, so
    the caller can do its own work meanwhile.  (subprocess would cost every call
    several milliseconds of imports.)"""

    def __init__(self, argv: list[str], stdin: bytes, env: dict[str, str]) -> None:
        pipes = [posix.pipe() for _ in range(3)]  # stdin, stdout, stderr: (read, write)
        dup2 = posix.POSIX_SPAWN_DUP2
        actions = [(dup2, pipes[0][0], 0), (dup2, pipes[1][1], 1), (dup2, pipes[2][1], 2)]
        try:
            self.pid = posix.posix_spawn(argv[0], argv, env, file_actions=actions)
        except BaseException:
            for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):  # (ours; theirs below)
                posix.close(fd)
            raise
        finally:
            for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
                posix.close(fd)
        self.to_child, self.out_fd, self.err_fd = pipes[0][1], pipes[1][0], pipes[2][0]
        posix.set_blocking(self.to_child, False)
        self.pending = memoryview(stdin)
        self._write()  # a config fits in the pipe: the child can start now

    def _write(self) -> None:
        if self.to_child < 0:
            return
        try:
            while self.pending:
                self.pending = self.pending[posix.write(self.to_child, self.pending[:65536]):]
        except BlockingIOError:
            return  # the rest when the pipe has room again (wait)
        except BrokenPipeError:
            self.pending = self.pending[:0]
        posix.close(self.to_child)
        self.to_child = -1

    def wait(self, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Its exit status, stdout and stderr; killed (status -9) after ``timeout``."""
        chunks: dict[int, list[bytes]] = {self.out_fd: [], self.err_fd: []}
        reading = [self.out_fd, self.err_fd]
        deadline = time.monotonic() + timeout
        try:
            while reading or self.to_child >= 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    posix.kill(self.pid, _SIGKILL)
                    break
                writing = [self.to_child] if self.to_child >= 0 else []
                readable, writable, _ = select.select(reading, writing, [], left)
                for fd in readable:
                    data = posix.read(fd, 65536)
                    if data:
                        chunks[fd].append(data)
                    else:
                        reading.remove(fd)
                if writable:
                    self._write()
        finally:
            for fd in reading:
                posix.close(fd)
            if self.to_child >= 0:
                posix.close(self.to_child)
                self.to_child = -1
        _, status = posix.waitpid(self.pid, 0)
        code = (posix.waitstatus_to_exitcode(status) if hasattr(posix, "waitstatus_to_exitcode")
                else posix.WEXITSTATUS(status) if posix.WIFEXITED(status)
                else -posix.WTERMSIG(status))
        return code, b"".join(chunks[self.out_fd]), b"".join(chunks[self.err_fd])


def start_delegate(command: str, conf_bytes: bytes, conf: dict[str, Any], env: dict[str, str]
                   ) -> Child:
    """Start the IPAM plugin with the same config and environment (but CNI_COMMAND)."""
    exe = find_plugin(str(conf["ipam"]["type"]), env.get("CNI_PATH", ""))
    return Child([exe], conf_bytes, dict(env, CNI_COMMAND=command))


def delegate_result(child: Child, command: str, conf: dict[str, Any]) -> dict[str, Any]:
    """The started IPAM plugin's result, or CniError with its error."""
    code, stdout, stderr = child.wait()
    out = stdout.decode("utf-8", "replace").strip()
    if code != 0:
        try:
            err = loads(out)
            code, msg = int(err.get("code", IPAM_FAILED)), str(err.get("msg", out))
            details = str(err.get("details") or "")
        except (ValueError, AttributeError):
            code, msg, details = IPAM_FAILED, out or "no output", stderr.decode()[-500:]
        raise CniError(code, f"IPAM plugin {conf['ipam']['type']} {command} failed: {msg}",
                       details)
    if not out:
        return {}
    result: dict[str, Any] = loads(out)
    return result


def delegate(command: str, conf_bytes: bytes, conf: dict[str, Any], env: dict[str, str]
             ) -> dict[str, Any]:
    """Run the IPAM plugin with the same config and environment (but CNI_COMMAND)."""
    return delegate_result(start_delegate(command, conf_bytes, conf, env), command, conf)


def delegate_versions(conf: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The CNI versions the IPAM plugin supports (its VERSION answer)."""
    exe = find_plugin(str(conf["ipam"]["type"]), env.get("CNI_PATH", ""))
    _, stdout, _ = Child([exe], dumps({"cniVersion": conf["cniVersion"]}).encode(),
                         dict(env, CNI_COMMAND="VERSION")).wait()
    try:
        versions = loads(stdout).get("supportedVersions", [])
    except (ValueError, AttributeError):
        return []
    return [str(v) for v in versions] if isinstance(versions, list) else []


# -- commands ------------------------------------------------------------------------------


def parse_config(raw: bytes, command: str) -> dict[str, Any]:
    try:
        conf = loads(raw)
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
    if not isinstance(conf.get("rename", True), bool):
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
    """``runtimeConfig.deviceID`` (the runtime's, from the device plugin's allocation)
    wins; a top-level ``deviceID`` (Multus puts it there too, but a NAD author can
    write one) is used only without it, and may not contradict it."""
    runtime = conf.get("runtimeConfig")
    from_runtime = runtime.get("deviceID") if isinstance(runtime, dict) else None
    in_config = conf.get("deviceID")
    if from_runtime and in_config and str(in_config) != str(from_runtime):
        raise CniError(INVALID_CONFIG, f"deviceID {in_config!r} in the config contradicts "
                       f"runtimeConfig.deviceID {from_runtime!r}")
    return str(from_runtime or in_config or "")


def has_ipam(conf: dict[str, Any]) -> bool:
    return bool(conf.get("ipam") and conf["ipam"].get("type"))


def cmd_add(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> dict[str, Any]:
    request = {
        "op": "add", "deviceID": device_id(conf), "containerID": env["CNI_CONTAINERID"],
        "ifname": env["CNI_IFNAME"], "netns": env["CNI_NETNS"], "network": conf["name"],
        "pod": pod_from_args(env),
        "rename": bool(conf.get("rename", True)), "mtu": int(conf.get("mtu", 0)),
        "ipam": "follows" if has_ipam(conf) else None,
    }
    netns_fd = open_netns(env["CNI_NETNS"])  # before anything is done for the pod
    # IPAM runs while the daemon checks and moves the device (the move is most of
    # an ADD); its result follows the request on the same connection.
    child: Child | None = None
    ipam: dict[str, Any] = {}
    ipam_done = False  # addresses to give back if the ADD fails
    try:
        child = start_delegate("ADD", raw, conf, env) if has_ipam(conf) else None
        call = DaemonCall(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET))
        try:
            call.send(request, netns_fd)
            if child is not None:
                waiting, child = child, None
                try:
                    ipam = delegate_result(waiting, "ADD", conf)
                except CniError as e:
                    call.send({"ipam_failed": e.msg})  # the daemon brings the device home
                    try:
                        call.reply()
                    except CniError as daemon_error:
                        log("add_undone", code=daemon_error.code, msg=daemon_error.msg)
                    raise
                ipam_done = True
                call.send({"ipam": ipam})
            reply = call.reply()
        finally:
            call.close()
    except BaseException:
        if child is not None:  # the daemon could not be asked: IPAM's answer still counts
            try:
                delegate_result(child, "ADD", conf)
                ipam_done = True
            except CniError:
                pass
        if ipam_done:  # give the addresses back
            try:
                delegate("DEL", raw, conf, env)
            except CniError as e:
                log("ipam_rollback_failed", msg=e.msg)
        raise
    finally:
        posix.close(netns_fd)
    iface = reply["interface"]
    result: dict[str, Any] = {"cniVersion": conf["cniVersion"], "interfaces": [
        {"name": iface["name"], "mac": iface["mac"], "sandbox": env["CNI_NETNS"]}]}
    if ipam.get("ips"):
        result["ips"] = result_ips(ipam["ips"], conf["cniVersion"])
    for key in ("routes", "dns"):
        if ipam.get(key):
            result[key] = ipam[key]
    log("add", device=device_id(conf), container=env["CNI_CONTAINERID"], ifname=iface["name"])
    return result


def cmd_del(conf: dict[str, Any], raw: bytes, env: dict[str, str], log: Log) -> None:
    # IPAM's DEL runs while the daemon brings the device home: neither needs the other.
    ipam = start_delegate("DEL", raw, conf, env) if has_ipam(conf) else None
    try:
        daemon_call(conf.get("daemonSocket", DEFAULT_DAEMON_SOCKET), {
            "op": "del", "deviceID": device_id(conf), "containerID": env["CNI_CONTAINERID"],
            "ifname": env["CNI_IFNAME"]})
    except CniError as e:
        # DEL must succeed: the daemon reconciles what is left at its next start.
        log("del_daemon_skipped", code=e.code, msg=e.msg)
    if ipam is not None:
        delegate_result(ipam, "DEL", conf)
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
                        {"op": "gc", "network": conf["name"], "valid": valid})
    log("gc", network=conf["name"], released=",".join(reply.get("released", [])) or "-")
    # The spec: a plugin forwards GC to the plugins it delegates to, with the same
    # list.  An IPAM plugin that does not speak 1.1.0 (Debian 12's host-local stops
    # at 1.0.0) knows no GC: it is skipped, and says so in the log.
    if has_ipam(conf):
        if "1.1.0" in delegate_versions(conf, env):
            delegate("GC", raw, conf, env)
        else:
            log("ipam_gc_skipped", ipam=conf["ipam"]["type"], reason="no CNI 1.1.0 support")


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status,
            "GC": cmd_gc}


def run(env: dict[str, str], stdin: bytes, stdout: IO[str], stderr: IO[str]) -> int:
    command = env.get("CNI_COMMAND", "")
    version = "1.1.0"
    log = Log(stderr)
    try:
        if command == "VERSION":
            # The answer's cniVersion is the one given on stdin (when there is one).
            asked = _version_asked(stdin)
            stdout.write(dumps({"cniVersion": asked or SUPPORTED_VERSIONS[-1],
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
        since = COMMAND_SINCE.get(command)
        if since is not None and _vtuple(version) < _vtuple(since):
            raise CniError(INCOMPATIBLE_VERSION, f"{command} is not defined before CNI {since} "
                           f"(the config says {version})")
        if conf.get("logFile"):
            log = open_log(conf["logFile"])
        out = COMMANDS[command](conf, stdin, env, log)
        if out is not None:
            stdout.write(dumps(out) + "\n")
        return 0
    except CniError as e:
        log("error", command=command, code=e.code, msg=e.msg)
        stdout.write(dumps({"cniVersion": version, "code": e.code, "msg": e.msg,
                                 "details": e.details}) + "\n")
        return 1
    except Exception as e:  # never a traceback on stdout: a spec error instead
        log("internal_error", command=command, error=repr(e))
        stdout.write(dumps({"cniVersion": version, "code": TRY_AGAIN,
                                 "msg": "internal error in the afxdp CNI plugin",
                                 "details": repr(e)}) + "\n")
        return 1


def environ() -> dict[str, str]:
    """The environment as os.environ decodes it (UTF-8, undecodable bytes kept as
    surrogates)."""
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in posix.environ.items()}


def main() -> int:
    return run(environ(), sys.stdin.buffer.read() if not sys.stdin.isatty() else b"",
               sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
