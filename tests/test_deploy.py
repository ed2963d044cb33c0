"""The manifests and the Dockerfile: valid, and in agreement with the code they deploy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from plugin import cni
from plugin.config import validate as validate_plugin_config
from tests.kernel import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ["1.30.0", "1.33.0"]  # the oldest and a recent supported release
CUSTOM_KINDS = {"NetworkAttachmentDefinition", "Kustomization"}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def find(kind: str, name: str = "") -> dict[str, Any]:
    for _, doc in documents():
        if doc["kind"] == kind and (not name or doc["metadata"]["name"] == name):
            return doc
    raise LookupError(f"no {kind} {name}")


def config() -> Any:
    raw = yaml.safe_load(find("ConfigMap", "afxdp-config")["data"]["config.yaml"])
    return validate_plugin_config(raw, node_name="node-1")


def daemon_container() -> dict[str, Any]:
    spec = find("DaemonSet", "afxdp")["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    return container


def mounts(container: dict[str, Any]) -> dict[str, str]:
    """mount path -> host path, through the pod's hostPath volumes."""
    spec = find("DaemonSet", "afxdp")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    return {m["mountPath"]: host[m["name"]] for m in container["volumeMounts"]
            if m["name"] in host}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_api(version: str) -> None:
    checked = 0
    for path, doc in documents():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{path.relative_to(ROOT)}: {doc['kind']}: {e}") from None
        checked += 1
    assert checked >= 8


def test_kustomizations_list_files_that_exist() -> None:
    for path in DEPLOY.rglob("kustomization.yaml"):
        for res in yaml.safe_load(path.read_text())["resources"]:
            assert (path.parent / res).exists(), f"{path}: {res}"


def test_the_configmap_is_a_valid_daemon_config() -> None:
    cfg = config()
    assert [p.name for p in cfg.pools] == ["pool1"]


def test_daemonset_mounts_every_path_the_config_uses_at_the_same_place() -> None:
    cfg = config()
    m = mounts(daemon_container())
    for path in (cfg.socket_root, cfg.state_dir, cfg.device_plugins_dir,
                 cfg.pod_resources_socket.parent, cfg.cni_socket.parent,
                 cfg.control_socket.parent if cfg.control_socket else cfg.state_dir):
        assert m.get(str(path)) == str(path), f"{path} is not mounted from the host as itself"
    assert any(str(cfg.bpffs_root).startswith(p) for p in m if p.startswith("/sys/fs/bpf"))
    args = daemon_container()["args"]
    assert args[:2] == ["daemon", "--config"]
    cm_mount = next(v["mountPath"] for v in daemon_container()["volumeMounts"]
                    if v["name"] == "config")
    assert args[2] == f"{cm_mount}/config.yaml"


def test_probes_and_port_match_the_metrics_address() -> None:
    c = daemon_container()
    assert config().metrics_address == "127.0.0.1:9402"  # loopback unless told otherwise
    # The DaemonSet tells it the node's address, where the probes arrive.
    i = c["args"].index("--metrics-address")
    assert c["args"][i + 1] == "$(NODE_IP):9402"
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} \
        in c["env"]
    assert c["ports"][0]["containerPort"] == 9402
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_daemon_runs_with_exactly_the_capabilities_it_needs_and_unprivileged() -> None:
    sc = daemon_container()["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    # Why each is there (and no other): tests/test_capabilities.py.
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "IPC_LOCK", "SYS_ADMIN",
                                              "SYS_PTRACE", "CHOWN"}
    spec = find("DaemonSet", "afxdp")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and not spec.get("hostPID")
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["automountServiceAccountToken"] is False


def test_no_rbac_because_the_daemon_never_calls_the_api_server() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    assert find("ServiceAccount", "afxdp")["automountServiceAccountToken"] is False


def test_init_container_installs_the_cni_plugin_into_the_hosts_cni_bin() -> None:
    spec = find("DaemonSet", "afxdp")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    dest = init["command"][init["command"].index("--dest") + 1]
    assert init["command"][:2] == ["afxdp", "install-cni"]
    assert mounts(init)[dest] == "/opt/cni/bin"


def test_network_attachment_is_wired_to_the_resource_and_the_daemon() -> None:
    nad = find("NetworkAttachmentDefinition", "afxdp-net")
    cfg = config()
    assert nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"] == \
        cfg.resource_name(cfg.pools[0])
    conf = cni.parse_config(nad["spec"]["config"].encode(), "DEL")  # the plugin's own parser
    assert conf["type"] == "afxdp" and conf["daemonSocket"] == str(cfg.cni_socket)
    assert conf.get("capabilities") == {"deviceID": True}  # Multus' runtimeConfig.deviceID
    # The pod sees the netdev as CNI_IFNAME (net1), which is what the example pods pass
    # DPDK as iface=, with the allocated netdev's socket as dp_path=.
    assert conf.get("rename", True) is True
    for pod in ("dpdk-use-cni", "dpdk-pinned-map"):
        args = " ".join(find("Pod", pod)["spec"]["containers"][0]["args"])
        assert "iface=net1," in args and "dp_path=/tmp/afxdp_dp/$(AFXDP_DEVICES_POOL1)/" in args


@pytest.mark.parametrize("name,caps", [("dpdk-use-cni", {"NET_RAW", "IPC_LOCK"}),
                                       ("dpdk-pinned-map", {"NET_RAW", "IPC_LOCK"}),
                                       ("xsk-socket-receiver", set())])
def test_example_pods_ask_for_only_what_their_mode_needs(name: str, caps: set[str]) -> None:
    pod = find("Pod", name)
    cfg = config()
    c = pod["spec"]["containers"][0]
    assert set(c["securityContext"]["capabilities"].get("add", [])) == caps
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    resource = cfg.resource_name(cfg.pools[0])
    assert c["resources"]["limits"][resource] == "1"
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "afxdp-net"
    assert pod["spec"]["securityContext"]["runAsUser"] == cfg.pools[0].uid  # owns the socket
    assert cfg.pools[0].env_name() in json.dumps(c)


def test_dockerfile_builds_in_one_stage_and_runs_without_a_compiler() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2
    build, runtime = stages
    assert "make bpf" in build and "make proto" in build and "clang" in build
    assert not re.search(r"\b(clang|gcc|llvm|make)\b", runtime.split("ENTRYPOINT")[0]
                         .replace("--from=build", ""))
    assert "libbpf1" in runtime and "COPY --from=build /dist/" in runtime
    assert 'ENTRYPOINT ["afxdp"]' in runtime
    # The image the manifests name runs this entrypoint with these arguments.
    assert daemon_container()["args"][0] == "daemon"
