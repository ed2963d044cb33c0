# Build glue.  The README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH)
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(MULTIARCH)
BPF_OBJS := $(patsubst %.bpf.c,%.bpf.o,$(wildcard bpf/*.bpf.c))
PROTOS := $(wildcard plugin/api/*.proto)
PROTO_PY := $(patsubst %.proto,%_pb2.py,$(PROTOS))

.PHONY: setup bpf proto demo test unit lint bench clean image-test

setup:
	scripts/setup.sh

bpf: $(BPF_OBJS)

bpf/%.bpf.o: bpf/%.bpf.c
	clang $(BPF_CFLAGS) -c $< -o $@

# kubelet's gRPC APIs: Python modules generated from our .proto files (not committed).
proto: $(PROTO_PY)

plugin/api/%_pb2.py: plugin/api/%.proto
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $<

demo: setup
	$(PY) scripts/demo.py

test: setup lint
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q tests -m "not kernel"

# The image built with podman, and the capability tests run with the daemon in it
# (not part of `make test`: it downloads Debian packages and takes minutes).
image-test: setup
	scripts/image-test.sh

# Dead code: vulture over the product and what uses it (tests, benchmarks, scripts).
# Names used by frameworks rather than by our code: pytest's, gRPC servicer methods, logging's
# module switches, ctypes structure fields the kernel reads, fields read via __dict__.
VULTURE_IGNORE := pytestmark,pytest_*,PreStartContainer,_srcfile,logThreads,logProcesses,logMultiprocessing,map_ids,rx_*,tx_*,object_hook,object_pairs_hook,parse_float,parse_int,parse_constant

lint:
	.venv/bin/ruff check bpf cni_server plugin tests benchmarks scripts
	.venv/bin/vulture bpf cni_server plugin tests benchmarks scripts --min-confidence 60 \
	  --exclude plugin/api --ignore-names '$(VULTURE_IGNORE)' --ignore-decorators '@pytest.fixture'
	.venv/bin/mypy
	.venv/bin/hadolint Dockerfile

bench: setup
	$(PY) benchmarks/handshake.py

clean:
	rm -f bpf/*.bpf.o plugin/api/*_pb2*.py plugin/api/*_pb2.pyi
