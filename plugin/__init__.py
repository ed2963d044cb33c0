"""Kubernetes front ends: the device-plugin gRPC server and the CNI plugin."""

from bpf.lean_pyroute2 import install

install()  # before any module of ours imports pyroute2: see bpf.lean_pyroute2
