"""The XDP redirect program (C, built with clang) and its loader over the distro's libbpf."""

from bpf.lean_pyroute2 import install

install()  # before any module of ours imports pyroute2: see bpf.lean_pyroute2
