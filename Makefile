# Build glue.  The README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH)
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(MULTIARCH)
BPF_OBJS := $(patsubst %.bpf.c,%.bpf.o,$(wildcard bpf/*.bpf.c))

.PHONY: setup bpf demo test unit lint bench clean

setup:
	scripts/setup.sh

bpf: $(BPF_OBJS)

bpf/%.bpf.o: bpf/%.bpf.c
	clang $(BPF_CFLAGS) -c $< -o $@

demo: setup
	$(PY) scripts/demo.py

test: setup lint
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests -m "not kernel"

lint:
	.venv/bin/ruff check bpf cni_server plugin tests benchmarks scripts
	.venv/bin/mypy

bench: setup
	$(PY) benchmarks/handshake.py

clean:
	rm -f bpf/*.bpf.o
