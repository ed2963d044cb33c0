"""Real-kernel test fixtures: network namespaces, veth pairs, daemons, unprivileged clients.

Everything created here is removed in ``finally`` blocks, so a failing test
leaves no netns, veth, XDP program, bpffs mount or process behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_server.netns import Netns, setns
from cni_server.ownership import run_dir

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()
UNPRIV = 65534

# setpriv arguments: uid/gid 65534, no supplementary groups, only these capabilities.
def setpriv(*caps: str) -> list[str]:
    keep = ",".join(f"+{c}" for c in caps)
    args = ["setpriv", f"--reuid={UNPRIV}", f"--regid={UNPRIV}", "--clear-groups"]
    if caps:
        args += [f"--inh-caps=-all,{keep}", f"--ambient-caps=-all,{keep}",
                 f"--bounding-set=-all,{keep}"]
    else:
        args += ["--inh-caps=-all", "--bounding-set=-all"]
    return [*args, "--"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"


@dataclass
class NsFixture:
    """A named netns (``ip netns``) holding veth pairs for one test."""

    name: str
    links: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def veth(self, a: str = "va", b: str = "vb", queues: int = 1) -> tuple[str, str]:
        """A veth pair a<->b inside the netns, both up, with ``queues`` RX/TX queues each."""
        q = ["numrxqueues", str(queues), "numtxqueues", str(queues)]
        run("ip", "-n", self.name, "link", "add", a, *q, "type", "veth", "peer", b, *q)
        for dev in (a, b):
            run("ip", "-n", self.name, "link", "set", dev, "up")
        self.links += [a, b]
        return a, b

    def cmd(self, *args: str) -> list[str]:
        """argv that runs ``args`` in this netns (same mount namespace: bpffs mounts are shared)."""
        return ["nsenter", f"--net={self.path}", "--", *args]

    def xdp_prog_id(self, dev: str) -> int:
        out = run("ip", "-n", self.name, "-j", "-d", "link", "show", dev).stdout
        xdp = json.loads(out)[0].get("xdp", {})
        return int(xdp.get("prog", {}).get("id", 0)) if xdp else 0

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move this (main) thread into the netns for the block, then back."""
        with Netns.current() as home, Netns.open(self.path) as target:
            setns(target.fileno())
            try:
                yield
            finally:
                setns(home.fileno())


def veth_pairs(ns: NsFixture, n: int) -> float:
    """``n`` single-queue veth pairs p<i>/q<i>, up, in one ``ip -batch`` (for the
    benchmarks' hundreds; they go with the netns).  Returns the seconds it took."""
    t0 = time.perf_counter()
    batch = "".join(f"link add p{i} numrxqueues 1 numtxqueues 1 type veth peer q{i} "
                    f"numrxqueues 1 numtxqueues 1\nlink set p{i} up\nlink set q{i} up\n"
                    for i in range(n))
    subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=batch, text=True, check=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def make_netns() -> Iterator[NsFixture]:
    ns = NsFixture(unique("afxt"))
    run("ip", "netns", "add", ns.name)
    try:
        run("ip", "-n", ns.name, "link", "set", "lo", "up")
        # No IPv6 on the test links: a new link sends MLD reports and router
        # solicitations, which our program would redirect to a socket that
        # counts frames.
        run("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w",
            "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        yield ns
    finally:
        # Kill anything still running inside, then delete (veths go with it).
        pids = run("ip", "netns", "pids", ns.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        # Claims our daemons left by dying (SIGKILL) in this netns.
        with contextlib.suppress(OSError):
            inode = ns.path.stat().st_ino
            for lock in (run_dir() / "netdevs").glob(f"{inode}-*.lock"):
                lock.unlink()
        run("ip", "netns", "del", ns.name, check=False)


class ClientRuntime:
    """A world-readable copy of the client code, so uid 65534 can run it.

    The checkout (and its venv) may live where uid 65534 cannot read, e.g.
    under /root; the copy holds our two packages and the libraries they import.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="afxdp-client-"))
        os.chmod(self.dir, 0o755)
        import pyroute2
        import yaml

        for pkg in (ROOT / "bpf", ROOT / "cni_server", Path(yaml.__file__).parent,
                    Path(pyroute2.__file__).parent):
            shutil.copytree(pkg, self.dir / pkg.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.o"))
        for p in self.dir.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.python = os.path.realpath(sys.executable)

    def argv(self, *args: str) -> list[str]:
        return [self.python, "-s", "-B", "-m", "cni_server.cli", *args]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(self.dir),
                "HOME": "/"}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """``afxdp serve`` as a child process inside a netns."""

    def __init__(self, ns: NsFixture, workdir: Path, *args: str, wait: bool = True,
                 mode: str = "serve", control: Path | None = None,
                 wrap: tuple[str, ...] = (), program: tuple[str, ...] | None = None,
                 output: int | None = None) -> None:
        """``wrap``: a command prefix run inside the netns before the daemon's
        interpreter (setpriv, prlimit, a read-only root...).  ``program``: what runs
        ``afxdp`` (default: this interpreter on the source tree; ``()`` when ``wrap``
        ends in it, e.g. an image whose entrypoint it is).  ``output``: where its
        stdout and stderr go instead of the log file (``subprocess.PIPE``: a pipe,
        as under a container runtime; then ``log()`` is empty)."""
        self.ns = ns
        self.ready = workdir / f"ready-{next(_counter)}.json"
        self.log_path = workdir / f"daemon-{next(_counter)}.log"
        self.control = control or workdir / f"control-{next(_counter)}.sock"
        extra = ["--control-socket", str(self.control)] if mode == "serve" else []
        if program is None:
            program = (sys.executable, "-m", "cni_server.cli")
        argv = ns.cmd(*wrap, *program, mode, "--ready-file",
                      str(self.ready), *extra, *args)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log if output is None else output,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists():
                status: dict[str, object] = json.loads(self.ready.read_text())
                return status
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def wait_for(path: Path, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None
             ) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"process exited with {proc.returncode}: {out}{err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def compile_test_program(name: str, out: Path) -> Path:
    """Build tests/bpf/<name>.bpf.c with clang into ``out``."""
    arch = run("gcc", "-print-multiarch").stdout.strip()
    run("clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
        str(Path(__file__).parent / "bpf" / f"{name}.bpf.c"), "-o", str(out))
    return out


def held_bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, map ids) that process ``pid`` holds fds for, from /proc/PID/fdinfo.

    This is how tests judge "what the daemon under test loaded": other copies of
    the product may run on the same host, so a host-wide count proves nothing.
    """
    progs: set[int] = set()
    maps: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        with contextlib.suppress(OSError):
            for line in entry.read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "prog_id":
                    progs.add(int(value))
                elif key == "map_id":
                    maps.add(int(value))
    return progs, maps


def program_exists(prog_id: int) -> bool:
    """Whether BPF program ``prog_id`` is still loaded (freed programs disappear by id)."""
    from bpf import libbpf
    from bpf.errors import LibbpfError

    try:
        fd = libbpf.check(libbpf.call("bpf_prog_get_fd_by_id", prog_id), "opening")
    except LibbpfError:
        return False
    os.close(fd)
    return True


def build_c(source: Path, work: Path) -> Path:
    """Compile a benchmark's C helper with the system C compiler; the executable's path."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit(f"no C compiler (cc/gcc/clang) to build {source.name}")
    out = work / source.stem
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(source)], check=True)
    return out
