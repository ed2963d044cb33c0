"""The XDP redirect program (C, built with clang) and its loader over the distro's libbpf."""
