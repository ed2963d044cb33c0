"""Kubernetes front ends: the device-plugin gRPC server and the CNI plugin."""

from bpf.lean_imports import install

install()  # before any module of ours imports pyroute2 or prometheus_client: see bpf.lean_imports
