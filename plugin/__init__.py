"""Kubernetes front ends: the device-plugin gRPC server and the CNI plugin."""
