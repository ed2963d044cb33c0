"""Kubernetes front ends: the device-plugin gRPC server and the CNI plugin (issues 3 and 4)."""
