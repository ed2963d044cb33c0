"""XDP programs from C source, compiled on this node by bcc.

bcc is an optional, system-provided backend (Debian's ``python3-bpfcc``; it is
not on PyPI): only ``program: {source: ...}`` needs it, never our default
program.  We never import it into the daemon: ``bcc_child.py`` runs under the
system Python, compiles and loads the program there, and passes the program's
fd back over a socketpair.  That keeps LLVM's memory and any crash inside bcc
out of the daemon and gives us clang's and the verifier's messages on the
child's stderr.

Sizing: the source sizes its XSKMAP with the ``AFXDP_XSKMAP_SIZE`` macro, which
is defined on the compiler's command line as the netdev's queue count::

    BPF_XSKMAP(xsks_map, AFXDP_XSKMAP_SIZE);
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from bpf.errors import BpfError, ObjectInvalid

SIZE_MACRO = "AFXDP_XSKMAP_SIZE"
PYTHON_ENV = "AFXDP_BCC_PYTHON"  # the interpreter that has bcc; default Debian's
COMPILE_TIMEOUT = 120.0
_CHILD = Path(__file__).with_name("bcc_child.py")
_INSTALL = "install Debian's python3-bpfcc (apt-get install python3-bpfcc)"
_LOG_LINES = 60


class BccMissing(BpfError):
    """bcc (or the Python that has it) is not installed."""


class KernelHeadersMissing(BpfError):
    """bcc cannot find headers for the running kernel."""


class SourceInvalid(BpfError):
    """The C source does not compile, or the verifier rejects the program."""


def system_python() -> Path:
    return Path(os.environ.get(PYTHON_ENV, "/usr/bin/python3"))


def headers_problem(kernel_headers: Path | None) -> str | None:
    """Why bcc would find no kernel headers, or None when it will.

    bcc looks in $BCC_KERNEL_SOURCE, then /lib/modules/$(uname -r)/build, then
    the kheaders module's /sys/kernel/kheaders.tar.xz.
    """
    release = os.uname().release
    if kernel_headers is not None:
        if not (kernel_headers / "include" / "linux" / "kconfig.h").is_file():
            return (f"{kernel_headers} is not a kernel header tree (it has no "
                    "include/linux/kconfig.h; on Debian the arch and -common header "
                    "packages must be merged into one tree)")
        return None
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return None
    if Path(f"/lib/modules/{release}/build").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists():
        return None
    return (f"bcc needs the headers of the running kernel {release}: install "
            f"linux-headers-{release}, build the kernel with CONFIG_IKHEADERS, or set "
            "program.kernelHeaders to a kernel header tree")


def compile_and_load(source: Path, function: str, map_entries: int,
                     kernel_headers: Path | None = None,
                     timeout: float = COMPILE_TIMEOUT) -> int:
    """Compile ``source`` with bcc and load ``function`` as an XDP program.

    Returns a program fd the caller owns.  Raises BccMissing,
    KernelHeadersMissing, SourceInvalid or ObjectInvalid with what to do.
    """
    python = system_python()
    if not os.access(python, os.X_OK):
        raise BccMissing(f"program.source needs bcc, run by {python}, which does not exist: "
                         f"{_INSTALL}, or set {PYTHON_ENV} to a Python that has bcc")
    if not source.is_file():
        raise SourceInvalid(f"C source {source} not found")
    problem = headers_problem(kernel_headers)
    if problem:
        raise KernelHeadersMissing(problem)
    env = dict(os.environ)
    if kernel_headers is not None:
        env["BCC_KERNEL_SOURCE"] = str(kernel_headers)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent:
        try:
            proc = subprocess.run(
                [str(python), "-I", str(_CHILD), str(source), function, str(map_entries),
                 str(child.fileno())],
                pass_fds=(child.fileno(),), env=env, capture_output=True, text=True,
                timeout=timeout, check=False, errors="replace",
            )
        except subprocess.TimeoutExpired:
            raise SourceInvalid(f"compiling {source} with bcc took longer than "
                                f"{timeout:.0f} s") from None
        finally:
            child.close()
        _raise_for(proc, source, python)
        parent.setblocking(False)
        try:
            _, fds, _, _ = socket.recv_fds(parent, 16, 4)
        except BlockingIOError:
            fds = []
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SourceInvalid(f"bcc compiled {source} but handed back {len(fds)} program fds")
    return fds[0]


def _raise_for(proc: subprocess.CompletedProcess[str], source: Path, python: Path) -> None:
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode == 0 and result.get("ok"):
        return
    log = _tail(proc.stderr)
    kind, message = result.get("error", ""), result.get("message", "")
    if kind == "no_bcc":
        raise BccMissing(f"program.source needs bcc, which {python} cannot import: {_INSTALL}")
    if "Unable to find kernel headers" in proc.stderr:
        raise KernelHeadersMissing(headers_problem(None) or f"bcc found no kernel headers\n{log}")
    if kind == "function":
        raise ObjectInvalid(message)
    if kind == "compile":
        raise SourceInvalid(f"bcc cannot compile {source}:\n{log}")
    if kind == "load":
        raise SourceInvalid(f"the kernel refused the program compiled from {source} "
                            f"({message}):\n{log}")
    raise SourceInvalid(f"compiling {source} with bcc failed ({message or f'exit {proc.returncode}'})"
                        + (f":\n{log}" if log else ""))


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-_LOG_LINES:])

