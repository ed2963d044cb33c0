#!/usr/bin/env bash
# Install everything the project needs on a Debian 12 machine, then build it.
# Idempotent: a second run only checks.  Must run as root (apt, and the tests
# need CAP_NET_ADMIN/CAP_BPF anyway).
#
#   scripts/setup.sh          # apt packages, .venv, BPF object, /usr/local/bin/afxdp
#
# The venv is built on Debian's /usr/bin/python3 on purpose: tests run clients
# as uid 65534, which must be able to execute the interpreter (a pyenv build
# under /root is not reachable by that user).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 linux-libc-dev   # build the XDP program
  python3 python3-venv python3-dev               # the venv (Debian's Python 3.11)
  iproute2 util-linux ethtool                    # ip netns/link, nsenter/setpriv
  containernetworking-plugins                    # host-local/host-device for CNI tests
  libxdp1                                        # libxdp's AF_XDP program, a benchmark peer
  python3-bpfcc                                  # bcc: pools with program.source (optional backend)
  make
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt/dpkg (unattended-upgrades, a first boot) instead of failing.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
fi

# bcc compiles against kernel headers: the running kernel's package when Debian
# has one, else the distro's current ones (the bcc tests merge that split
# arch + -common pair into one tree and point bcc at it).
arch=$(dpkg --print-architecture)
if ! dpkg-query -W -f='${Status} ${Package}\n' 'linux-headers-*' 2>/dev/null \
    | grep -qE "install ok installed linux-headers-($(uname -r)|.*-$arch)\$"; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  headers=linux-headers-$(uname -r)
  apt-cache show "$headers" >/dev/null 2>&1 || headers=linux-headers-$arch
  echo "setup: installing $headers (kernel headers for bcc)"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "$headers" >/dev/null
fi

PY=/usr/bin/python3
if [[ ! -x .venv/bin/python ]] || [[ "$(readlink -f .venv/bin/python)" != "$(readlink -f $PY)" ]]; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
# Reinstall only when the dependency list changed.
stamp=.venv/.afxdp-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp ]] || [[ "$(cat $stamp)" != "$want" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi

make -s bpf proto

# `afxdp` on PATH: a link to this checkout's venv, unless something else (a
# packaged install) already owns that name.
link=/usr/local/bin/afxdp
target=$(pwd)/.venv/bin/afxdp
if [[ $(id -u) -eq 0 ]] && { [[ ! -e $link && ! -L $link ]] || [[ -L $link && $(readlink "$link") == */.venv/bin/afxdp ]]; }; then
  ln -sfn "$target" "$link"
elif [[ "$(readlink -f "$link" 2>/dev/null)" != "$(readlink -f "$target")" ]]; then
  echo "setup: $link is not this checkout's; run $target, or link it yourself" >&2
fi
