"""Pools whose program is C source compiled on the node by bcc.

bcc is Debian's python3-bpfcc (scripts/setup.sh installs it).  It compiles
against the running kernel's headers.  When the running kernel has no headers
package (the CI VM runs a custom 6.x kernel: no /lib/modules/$(uname -r)/build,
no CONFIG_IKHEADERS), these tests point bcc at the *distro's* headers instead:
Debian splits them into linux-headers-<ver>-<arch> and linux-headers-<ver>-common,
so the fixture merges the pair into one symlink tree and passes it as the pool's
``kernelHeaders``.  An XDP program only needs the uapi and networking headers,
which do not depend on the exact kernel version.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf import bcc
from bpf.errors import BpfError, ObjectInvalid
from bpf.program import ProgramSpec, prog_name
from tests.k8s_env import RESOURCE, K8s, healthy, write_config
from tests.kernel import ROOT
from tests.test_programs import assert_only_port_4789_reaches_the_pod, scratch_links

pytestmark = pytest.mark.kernel
EXAMPLE = ROOT / "bpf" / "examples" / "udp_steer_bcc.c"


def _has_bcc() -> bool:
    probe = subprocess.run([str(bcc.system_python()), "-I", "-c", "import bcc"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def _merged_distro_headers(into: Path) -> Path | None:
    """One tree from Debian's linux-headers-<v>-<arch> and its -common sibling."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for arch_dir in sorted(Path("/usr/src").glob(f"linux-headers-*-{arch}"), reverse=True):
        common = arch_dir.with_name(arch_dir.name.removesuffix(arch) + "common")
        if not (common / "include" / "linux" / "kconfig.h").is_file():
            continue
        for tree in (common, arch_dir):  # arch last: its generated headers win
            subprocess.run(["cp", "-rsf", f"{tree}/.", f"{into}/"], check=True)
        return into
    return None


@pytest.fixture(scope="module")
def kernel_headers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """None when bcc finds the running kernel's headers itself, else a merged distro tree."""
    if os.geteuid() != 0:
        pytest.skip("loading XDP programs needs root")
    if not _has_bcc():
        pytest.skip(f"bcc is not importable by {bcc.system_python()}: "
                    "scripts/setup.sh installs python3-bpfcc")
    if bcc.headers_problem(None) is None:
        yield None
        return
    tree = _merged_distro_headers(tmp_path_factory.mktemp("kernel-headers"))
    if tree is None:
        pytest.skip("no kernel headers: scripts/setup.sh installs the distro's")
    yield tree


def source_program(kernel_headers: Path | None, **extra: object) -> dict[str, object]:
    program: dict[str, object] = {"source": str(EXAMPLE), "name": "udp_steer", **extra}
    if kernel_headers is not None:
        program["kernelHeaders"] = str(kernel_headers)
    return program


def test_a_pool_program_from_source_steers_its_port_to_the_pod_and_is_adopted(
        k8s: K8s, kernel_headers: Path | None) -> None:
    k8s.config = write_config(k8s.work, program=source_program(
        kernel_headers, mapKeys={"udp_ports": [4789]}))
    first = k8s.start()
    assert f"event=program_verified pool=pool1 source={EXAMPLE}" in first.log()
    assert scratch_links(k8s) == []
    k = k8s.kubelet
    k.wait_devices(RESOURCE, lambda d: healthy(d, "p0"))
    mount = k.allocate(RESOURCE, ["p0"]).container_responses[0].mounts[0]
    k.add_pod("default", "pod-a", RESOURCE, ["p0"])
    prog = k8s.ns.xdp_prog_id("p0")
    assert prog_name(prog) == "udp_steer"
    sock = Path(mount.host_path) / "afxdp.sock"
    assert_only_port_4789_reaches_the_pod(k8s, sock)
    assert first.stop() == 0
    second = k8s.start()
    assert "allocations=1 dropped=0" in second.log()
    assert k8s.ns.xdp_prog_id("p0") == prog  # adopted, not compiled and attached again
    assert "event=xdp_adopted netdev=p0" in second.log()


def test_a_program_from_source_the_verifier_rejects_fails_the_start_with_its_log(
        k8s: K8s, kernel_headers: Path | None) -> None:
    bad = k8s.work / "unchecked.c"
    bad.write_text(UNCHECKED)
    k8s.config = write_config(k8s.work, program={**source_program(kernel_headers),
                                                 "source": str(bad), "name": "unchecked"})
    d = k8s.start(wait=False)
    assert d.proc.wait(60) == 1
    log = d.log()
    assert f"pool pool1: program 'unchecked' from source {bad}" in log, log[-2000:]
    assert "invalid access to packet" in log, log[-2000:]
    assert scratch_links(k8s) == []
    assert all(k8s.ns.xdp_prog_id(f"p{i}") == 0 for i in range(3))


HEADER = "#include <uapi/linux/bpf.h>\n"
XSKMAP = "BPF_XSKMAP(xsks_map, AFXDP_XSKMAP_SIZE);\n"
REDIRECT = "return xsks_map.redirect_map(ctx->rx_queue_index, XDP_PASS);"
UNCHECKED = (HEADER + XSKMAP + "int unchecked(struct xdp_md *ctx) {\n"
             "  unsigned char *d = (void *)(long)ctx->data;\n"
             f"  if (d[20] == 7) return XDP_DROP;\n  {REDIRECT}\n}}\n")


@pytest.mark.parametrize("text,name,error,expect", [
    (HEADER + "int f(struct xdp_md *ctx) { return XDP_PASS }\n", "f", bcc.SourceInvalid,
     "expected ';' after return statement"),
    (HEADER + XSKMAP + f"int f(struct xdp_md *ctx) {{ {REDIRECT} }}\n", "g", ObjectInvalid,
     "defines no function named 'g'"),
    (HEADER + "int f(struct xdp_md *ctx) { return XDP_PASS; }\n", "f", ObjectInvalid,
     "uses no map named 'xsks_map'"),
    (HEADER + f"BPF_XSKMAP(xsks_map, 1);\nint f(struct xdp_md *ctx) {{ {REDIRECT} }}\n", "f",
     ObjectInvalid, "has 1 entries, fewer than the 4 queues to serve: size it with "
     "BPF_XSKMAP(xsks_map, AFXDP_XSKMAP_SIZE)"),
    (UNCHECKED, "unchecked", bcc.SourceInvalid, "invalid access to packet"),
])
def test_a_bad_source_gets_an_error_that_says_what_is_wrong(
        tmp_path: Path, kernel_headers: Path | None, text: str, name: str,
        error: type[BpfError], expect: str) -> None:
    source = tmp_path / "prog.c"
    source.write_text(text)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(error) as e:
        ProgramSpec(name, source_path=source, kernel_headers=kernel_headers).load(4)
    assert expect in str(e.value)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_sizing_with_the_macro_gives_one_slot_per_queue(kernel_headers: Path | None) -> None:
    spec = ProgramSpec("udp_steer", source_path=EXAMPLE, kernel_headers=kernel_headers)
    with spec.load(6) as program:
        assert (program.name, program.map_entries) == ("udp_steer", 6)


def test_without_bcc_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, kernel_headers: Path | None) -> None:
    monkeypatch.setenv(bcc.PYTHON_ENV, str(ROOT / ".venv" / "bin" / "python"))  # has no bcc
    with pytest.raises(bcc.BccMissing, match="apt-get install python3-bpfcc"):
        ProgramSpec("udp_steer", source_path=EXAMPLE, kernel_headers=kernel_headers).load(1)
    monkeypatch.setenv(bcc.PYTHON_ENV, "/nonexistent/python3")
    with pytest.raises(bcc.BccMissing, match="python3-bpfcc"):
        ProgramSpec("udp_steer", source_path=EXAMPLE, kernel_headers=kernel_headers).load(1)


def test_without_kernel_headers_the_error_names_the_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    release = "6.99.0-nothere"
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(
        ("Linux", "n", release, "#1", "x86_64")))
    with pytest.raises(bcc.KernelHeadersMissing, match=f"install linux-headers-{release}"):
        ProgramSpec("udp_steer", source_path=EXAMPLE).load(1)
    with pytest.raises(bcc.KernelHeadersMissing, match="not a kernel header tree"):
        ProgramSpec("udp_steer", source_path=EXAMPLE, kernel_headers=tmp_path).load(1)
