"""The node daemon core: the UDS fd-handout server, allocations, the standalone daemon and CLI."""

from bpf.lean_pyroute2 import install

install()  # before any module of ours imports pyroute2: see bpf.lean_pyroute2
