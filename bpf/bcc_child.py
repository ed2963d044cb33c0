"""Compile C source with bcc, load one XDP function, send its fd to the parent.

Run by ``bpf.bcc`` with the *system* Python (Debian's python3-bpfcc is not on
PyPI, so it is not in our venv), in its own process so that LLVM's memory and
any crash inside bcc stay out of the daemon.  Standard library and bcc only:
this file is not imported as part of the package.

    python3 -I bcc_child.py SOURCE FUNCTION XSKMAP_SIZE SOCKET_FD

On success it sends the program fd over SOCKET_FD and prints ``{"ok": true}``;
otherwise it prints ``{"error": KIND, "message": TEXT}`` (bcc's and clang's
diagnostics go to stderr, which the parent keeps).
"""

from __future__ import annotations

import json
import socket
import sys


def main(argv: list[str]) -> int:
    source, function, size, sock_fd = argv[1], argv[2], int(argv[3]), int(argv[4])
    try:
        from bcc import BPF  # type: ignore[import-not-found]
        from bcc.libbcc import lib  # type: ignore[import-not-found]
    except ImportError as e:
        return fail("no_bcc", f"bcc's Python bindings cannot be imported ({e})")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return fail("source", f"cannot read {source}: {e}")
    try:
        bpf = BPF(text=text, cflags=[f"-DAFXDP_XSKMAP_SIZE={size}"])
    except Exception as e:  # bcc raises bare Exception for compile errors
        return fail("compile", str(e))
    if not lib.bpf_function_start(bpf.module, function.encode()):
        return fail("function", f"{source} defines no function named {function!r}")
    try:
        fn = bpf.load_func(function, BPF.XDP)
    except Exception as e:  # the verifier's log is on stderr
        return fail("load", str(e))
    with socket.socket(fileno=sock_fd) as s:
        socket.send_fds(s, [b"p"], [fn.fd])
    print(json.dumps({"ok": True}))
    return 0


def fail(kind: str, message: str) -> int:
    print(json.dumps({"error": kind, "message": message}))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
