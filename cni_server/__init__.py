"""The node daemon core: the UDS fd-handout server, allocations, the standalone daemon and CLI."""

from bpf.lean_imports import install

install()  # before any module of ours imports pyroute2 or prometheus_client: see bpf.lean_imports
