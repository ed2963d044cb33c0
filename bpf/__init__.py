"""The XDP redirect program (C, built with clang) and its loader over the distro's libbpf."""

from bpf.lean_imports import install

install()  # before any module of ours imports pyroute2 or prometheus_client: see bpf.lean_imports
