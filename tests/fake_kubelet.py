"""An in-process fake kubelet that speaks the real gRPC APIs over real Unix sockets.

- Registration on ``<plugins_dir>/kubelet.sock``: inside ``Register`` it dials
  the plugin's endpoint, calls ``GetDevicePluginOptions`` and opens
  ``ListAndWatch`` (consumed by a thread), as kubelet does, then returns.
- PodResourcesLister on its own socket: ``List`` returns the pods the test put.
- ``allocate`` / ``preferred`` call the plugin the way kubelet does.
- ``admit`` admits a whole pod as kubelet's device manager does: one ``Allocate``
  per container, init containers first, an init container's devices reused by the
  app containers, a sidecar's kept; then PodResources lists the pod.
- ``numa_nodes`` records each device's NUMA node as kubelet does (-1: none).
- ``restart`` behaves like a kubelet restart: stop, delete every file in the
  plugins directory but the checkpoint, come back with a new ``kubelet.sock``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from plugin.api import deviceplugin_v1beta1_pb2 as pb
from plugin.api import deviceplugin_v1beta1_pb2_grpc as pb_grpc
from plugin.api import podresources_v1_pb2 as pr
from plugin.api import podresources_v1_pb2_grpc as pr_grpc

CHECKPOINT = "kubelet_internal_checkpoint"


@dataclass
class Container:
    """A container of a pod spec, as far as devices go.  ``kind``: ``init`` (runs to
    completion before the others), ``sidecar`` (a restartable init container: keeps
    running), or ``app``."""

    name: str
    kind: str
    count: int


@dataclass
class Registered:
    request: pb.RegisterRequest
    options: pb.DevicePluginOptions
    channel: grpc.Channel
    stub: pb_grpc.DevicePluginStub
    lists: list[list[pb.Device]] = field(default_factory=list)


class _Registration(pb_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:
        k = self.kubelet
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad version {request.version}")
        channel = grpc.insecure_channel(f"unix://{k.plugins_dir / request.endpoint}")
        stub = pb_grpc.DevicePluginStub(channel)
        options = stub.GetDevicePluginOptions(pb.Empty(), timeout=10)  # dial back, synchronously
        reg = Registered(request, options, channel, stub)
        with k.cond:
            old = k.plugins.get(request.resource_name)
            k.plugins[request.resource_name] = reg
            k.registrations.append(request.resource_name)
            k.cond.notify_all()
        if old is not None:
            old.channel.close()
        threading.Thread(target=k._watch, args=(reg,), daemon=True).start()
        return pb.Empty()


class _PodResources(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    def List(self, request: pr.ListPodResourcesRequest, context: Any
             ) -> pr.ListPodResourcesResponse:
        with self.kubelet.cond:
            self.kubelet.list_calls += 1
            self.kubelet.cond.notify_all()
            snapshot = list(self.kubelet.pods.values())
            delay = self.kubelet.list_delay
        time.sleep(delay)  # a slow kubelet: the answer reflects when the call began
        return pr.ListPodResourcesResponse(pod_resources=snapshot)


class FakeKubelet:
    def __init__(self, plugins_dir: Path, pod_resources_socket: Path) -> None:
        self.plugins_dir = plugins_dir
        self.pod_resources_socket = pod_resources_socket
        self.cond = threading.Condition()
        self.plugins: dict[str, Registered] = {}
        self.registrations: list[str] = []
        # Kubelet lists every pod on the node, those with no devices too (and, before
        # 1.34, terminated ones): the plugin must find its owners among them.
        self.pods: dict[tuple[str, str], pr.PodResources] = {
            ("kube-system", "coredns-5d78c9869d-x2v4k"): pr.PodResources(
                name="coredns-5d78c9869d-x2v4k", namespace="kube-system",
                containers=[pr.ContainerResources(name="coredns")]),
            ("default", "job-done-7xk2p"): pr.PodResources(  # terminated, no devices
                name="job-done-7xk2p", namespace="default",
                containers=[pr.ContainerResources(name="main")]),
        }
        self.list_calls = 0
        self.list_delay = 0.0
        self._registration: grpc.Server | None = None
        self._podres: grpc.Server | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.plugins_dir.mkdir(parents=True, exist_ok=True)
        (self.plugins_dir / CHECKPOINT).write_text("{}")
        self._start_registration()
        self._start_podresources()

    def _start_podresources(self) -> None:
        self.pod_resources_socket.parent.mkdir(parents=True, exist_ok=True)
        self._podres = grpc.server(futures.ThreadPoolExecutor(4))
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), self._podres)
        self._podres.add_insecure_port(f"unix://{self.pod_resources_socket}")
        self._podres.start()

    def _stop_podresources(self) -> None:
        if self._podres is not None:
            self._podres.stop(0).wait()
            self._podres = None

    def _start_registration(self) -> None:
        self._registration = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_RegistrationServicer_to_server(_Registration(self), self._registration)
        self._registration.add_insecure_port(f"unix://{self.plugins_dir / 'kubelet.sock'}")
        self._registration.start()

    def _stop_registration(self) -> None:
        if self._registration is not None:
            self._registration.stop(0).wait()
            self._registration = None
        with self.cond:
            for reg in self.plugins.values():
                reg.channel.close()
            self.plugins.clear()

    def restart(self, down_for: float = 0.2) -> None:
        """Like a kubelet restart: plugin sockets deleted, a new kubelet.sock, and the
        PodResources socket down meanwhile too."""
        self._stop_registration()
        self._stop_podresources()
        for f in self.plugins_dir.iterdir():
            if f.name != CHECKPOINT:
                f.unlink()
        time.sleep(down_for)
        self._start_podresources()
        self._start_registration()

    def recreate_socket(self) -> None:
        """Only kubelet.sock goes and comes back (the plugins' sockets stay): one of
        the two signals of a kubelet restart, alone.  The new socket may get the old
        inode number, as it can with a real kubelet."""
        self._stop_registration()
        self._start_registration()

    def stop(self) -> None:
        self._stop_registration()
        self._stop_podresources()

    # -- device plugin side ----------------------------------------------------------

    def _watch(self, reg: Registered) -> None:
        try:
            for resp in reg.stub.ListAndWatch(pb.Empty()):
                with self.cond:
                    reg.lists.append(list(resp.devices))
                    self.cond.notify_all()
        except grpc.RpcError:
            pass
        with self.cond:
            # As kubelet does when the stream ends: every device of the resource is
            # unhealthy until the plugin registers again (running pods keep theirs).
            if reg.lists:
                reg.lists.append([pb.Device(ID=d.ID, health="Unhealthy", topology=d.topology)
                                  for d in reg.lists[-1]])
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise TimeoutError(f"fake kubelet: timed out waiting for {what or predicate}")

    def devices(self, resource: str) -> dict[str, pb.Device]:
        with self.cond:
            reg = self.plugins.get(resource)
            return {d.ID: d for d in reg.lists[-1]} if reg and reg.lists else {}

    def wait_devices(self, resource: str, predicate: Callable[[dict[str, pb.Device]], bool],
                     timeout: float = 10.0) -> dict[str, pb.Device]:
        self.wait(lambda: resource in self.plugins and bool(self.plugins[resource].lists)
                  and predicate({d.ID: d for d in self.plugins[resource].lists[-1]}),
                  timeout, f"a device list of {resource} that satisfies the test")
        return self.devices(resource)

    def stub(self, resource: str) -> pb_grpc.DevicePluginStub:
        self.wait(lambda: resource in self.plugins, 10, f"{resource} to register")
        return self.plugins[resource].stub

    def allocate(self, resource: str, device_ids: list[str]) -> pb.AllocateResponse:
        """What kubelet sends: one call per container, with one ContainerAllocateRequest."""
        return self.allocate_raw(resource, device_ids)

    def allocate_raw(self, resource: str, *containers: list[str]) -> pb.AllocateResponse:
        """Any AllocateRequest the API allows, e.g. several containers in one call
        (kubelet never sends that; a plugin must still answer it right)."""
        req = pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers])
        resp: pb.AllocateResponse = self.stub(resource).Allocate(req, timeout=30)
        return resp

    def preferred(self, resource: str, available: list[str], must: list[str], size: int
                  ) -> list[str]:
        """Called, as kubelet does, only when the plugin's options advertise it."""
        self.stub(resource)
        if not self.plugins[resource].options.get_preferred_allocation_available:
            raise AssertionError("kubelet would not call GetPreferredAllocation: not advertised")
        req = pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=available,
                                                   must_include_deviceIDs=must,
                                                   allocation_size=size)])
        resp = self.stub(resource).GetPreferredAllocation(req, timeout=10)
        return list(resp.container_responses[0].deviceIDs)

    def numa_nodes(self, resource: str) -> dict[str, int]:
        """Each advertised device's NUMA node as kubelet records it: the first node of
        its topology, -1 for a device without one."""
        return {dev_id: (dev.topology.nodes[0].ID if dev.topology.nodes else -1)
                for dev_id, dev in self.devices(resource).items()}

    def admit(self, namespace: str, name: str, resource: str, containers: list[Container]
              ) -> dict[str, pb.AllocateResponse]:
        """Admit a pod as kubelet's device manager does, container by container in spec
        order (init and sidecar containers first): each gets ``count`` devices, taken
        first from devices a finished init container held, then from healthy devices no
        other container holds (GetPreferredAllocation decides which, when advertised).
        One Allocate per container; then PodResources lists the pod, its sidecars and
        app containers with their devices (a finished init container is not listed).
        Returns each container's AllocateResponse."""
        order = sorted(containers, key=lambda c: c.kind == "app")
        held = {d for pod in self.pods.values() for c in pod.containers for cd in c.devices
                if cd.resource_name == resource for d in cd.device_ids}
        reusable: list[str] = []
        got: dict[str, list[str]] = {}
        responses: dict[str, pb.AllocateResponse] = {}
        for c in order:
            ids = reusable[:c.count]
            reusable = reusable[len(ids):]
            if len(ids) < c.count:
                free = sorted(d.ID for d in self.devices(resource).values()
                              if d.health == "Healthy" and d.ID not in held)
                need = c.count - len(ids)
                if len(free) < need:
                    raise AssertionError(f"kubelet would refuse {name}: {need} more {resource} "
                                         f"wanted, {len(free)} free")
                options = self.plugins[resource].options
                fresh = (self.preferred(resource, free, [], need)
                         if options.get_preferred_allocation_available else free[:need])
                held.update(fresh)
                ids += fresh
            responses[c.name] = self.allocate(resource, ids)
            got[c.name] = ids
            if c.kind == "init":
                reusable += ids
        with self.cond:
            self.pods[(namespace, name)] = pr.PodResources(
                name=name, namespace=namespace, containers=[
                    pr.ContainerResources(name=c.name, devices=[pr.ContainerDevices(
                        resource_name=resource, device_ids=[d]) for d in got[c.name]])
                    for c in order if c.kind != "init"])
        return responses

    # -- PodResources side -------------------------------------------------------------

    def add_pod(self, namespace: str, name: str, resource: str, device_ids: list[str],
                container: str = "app") -> None:
        with self.cond:
            # As kubelet lists them: one ContainerDevices entry per device.
            self.pods[(namespace, name)] = pr.PodResources(
                name=name, namespace=namespace, containers=[pr.ContainerResources(
                    name=container, devices=[pr.ContainerDevices(
                        resource_name=resource, device_ids=[dev]) for dev in device_ids])])

    def remove_pod(self, namespace: str, name: str) -> None:
        with self.cond:
            self.pods.pop((namespace, name), None)


@contextlib.contextmanager
def running(plugins_dir: Path, pod_resources_socket: Path) -> Any:
    k = FakeKubelet(plugins_dir, pod_resources_socket)
    k.start()
    try:
        yield k
    finally:
        k.stop()
