# The image the node daemon runs in.  No Docker engine is used in this
# project's CI; the build steps are the same commands scripts/setup.sh and the
# Makefile run (make bpf, then a wheel), which the test suite exercises.

# -- build: compile the BPF object, build the wheel that carries it -------------
FROM debian:12-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang llvm libbpf-dev linux-libc-dev gcc make \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml Makefile README.md ./
COPY bpf/ bpf/
COPY cni_server/ cni_server/
COPY plugin/ plugin/
# A build host behind a TLS-intercepting proxy passes its CA bundle as the
# optional secret pip-ca (scripts/image-test.sh does); nothing of it stays in a layer.
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && make bpf \
 && python3 -m venv /build-venv \
 && /build-venv/bin/pip install --no-cache-dir build grpcio-tools \
 && make proto PY=/build-venv/bin/python \
 && /build-venv/bin/python -m build --wheel --outdir /dist .

# -- runtime: Python, libbpf1, the package; no compiler ----------------------------
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libbpf1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /dist/ /tmp/dist/
# The BPF objects the package carries are also reachable at /opt/afxdp/bpf/, the
# path a pool's program.object names (docs/kubernetes.md).
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/afxdp \
 && /opt/afxdp/bin/pip install --no-cache-dir /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && ln -s "$(/opt/afxdp/bin/python -c 'import bpf, os; print(os.path.dirname(bpf.__file__))')" \
      /opt/afxdp/bpf
ENV PATH=/opt/afxdp/bin:$PATH
# Runs as uid 0, but with only the capabilities the DaemonSet adds (NET_ADMIN,
# SYS_ADMIN, NET_RAW, IPC_LOCK, SYS_PTRACE, CHOWN; docs/deploy.md says what each
# is for) and a read-only root: nothing here needs more.
ENTRYPOINT ["afxdp"]
CMD ["serve", "--config", "/etc/afxdp/config.yaml"]
