"""Generic kubelet device-plugin plumbing (v1beta1) on grpc.aio: serve, register, stream, re-register.

Knows nothing of AF_XDP: a :class:`Backend` supplies the device list,
allocations and preferences.  One :class:`PluginServer` per resource.

kubelet facts this follows (docs/kubelet-api.md): ``Register`` is
synchronous and kubelet dials the plugin's socket inside it, so the plugin
serves first; ListAndWatch sends the full list at once and on every change; on
restart kubelet deletes the plugins' sockets and re-creates ``kubelet.sock``,
and plugins must serve and register again.  grpcio removes its own socket file
when a server stops, which must not be mistaken for a kubelet restart: the
supervisor only reacts to a *changed* ``kubelet.sock`` or a missing socket of
ours while we believe we are serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import grpc

from cni_server.lifecycle import cancel_tasks
from plugin.api import deviceplugin_v1beta1_pb2 as pb
from plugin.api import deviceplugin_v1beta1_pb2_grpc as pb_grpc
from plugin.dirwatch import CREATED, REMOVED, DirWatch

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


class AllocateError(Exception):
    """Refuse an Allocate with a gRPC status and a message that says which device and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class Backend(Protocol):
    def devices(self) -> list[pb.Device]: ...

    async def allocate(self, requests: list[pb.ContainerAllocateRequest]
                       ) -> list[pb.ContainerAllocateResponse]: ...

    def preferred(self, request: pb.ContainerPreferredAllocationRequest) -> list[str]: ...


class _Servicer(pb_grpc.DevicePluginServicer):
    def __init__(self, plugin: PluginServer) -> None:
        self.plugin = plugin

    async def GetDevicePluginOptions(self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]
                                     ) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=False,
                                      get_preferred_allocation_available=True)

    async def ListAndWatch(self, request: pb.Empty, context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[pb.ListAndWatchResponse]:
        plugin = self.plugin
        seen = -1
        while True:
            async with plugin.changed:
                while plugin.version == seen:
                    await plugin.changed.wait()
                seen = plugin.version
            devices = plugin.backend.devices()
            log.debug("event=list_and_watch resource=%s devices=%d", plugin.resource_name,
                      len(devices))
            yield pb.ListAndWatchResponse(devices=devices)

    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> pb.AllocateResponse:
        try:
            responses = await self.plugin.backend.allocate(list(request.container_requests))
        except AllocateError as e:
            log.warning("event=allocate_refused resource=%s error=%r", self.plugin.resource_name,
                        str(e))
            await context.abort(e.code, str(e))
        except Exception as e:
            log.exception("event=allocate_failed resource=%s", self.plugin.resource_name)
            await context.abort(grpc.StatusCode.INTERNAL, f"allocation failed: {e}")
        return pb.AllocateResponse(container_responses=responses)

    async def GetPreferredAllocation(self, request: pb.PreferredAllocationRequest,
                                     context: grpc.aio.ServicerContext[Any, Any]
                                     ) -> pb.PreferredAllocationResponse:
        return pb.PreferredAllocationResponse(container_responses=[
            pb.ContainerPreferredAllocationResponse(deviceIDs=self.plugin.backend.preferred(r))
            for r in request.container_requests])

    async def PreStartContainer(self, request: pb.PreStartContainerRequest,
                                context: grpc.aio.ServicerContext[Any, Any]
                                ) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()


class PluginServer:
    """Serves one resource to kubelet and keeps it registered."""

    def __init__(self, resource_name: str, endpoint: str, plugins_dir: Path,
                 backend: Backend, *, supervise_interval: float = 1.0) -> None:
        self.resource_name = resource_name
        self.endpoint = endpoint
        self.plugins_dir = plugins_dir
        self.backend = backend
        self.supervise_interval = supervise_interval
        self.version = 0
        self.changed = asyncio.Condition()
        self.registered = False
        self.registrations = 0
        self._server: grpc.aio.Server | None = None
        self._our_inode: int | None = None
        self._kubelet_inode: int | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # inotify on the plugins directory: kubelet.sock re-created (a kubelet
        # restart, whatever its inode) or our socket removed wakes the supervisor
        # at once; the periodic check is only a safety net.
        self._watch: DirWatch | None = None
        self._kubelet_recreated = False
        self._kick = asyncio.Event()

    @property
    def socket_path(self) -> Path:
        return self.plugins_dir / self.endpoint

    @property
    def kubelet_socket(self) -> Path:
        return self.plugins_dir / KUBELET_SOCKET

    async def start(self) -> None:
        """Serve, then register (when kubelet is up), then keep watching for kubelet restarts."""
        await self._serve()
        self._start_watch()
        await self._try_register()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"dp-{self.endpoint}")

    async def stop(self) -> None:
        await cancel_tasks(self._supervisor)
        self._supervisor = None
        self._stop_watch()
        await self._unserve()

    def _start_watch(self) -> None:
        try:
            self._watch = DirWatch(self.plugins_dir)
        except OSError as e:  # the periodic check still works
            log.warning("event=plugins_dir_unwatched dir=%s error=%r", self.plugins_dir, str(e))
            return
        asyncio.get_running_loop().add_reader(self._watch.fileno(), self._on_dir_events)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            asyncio.get_running_loop().remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None

    def _on_dir_events(self) -> None:
        assert self._watch is not None
        for mask, name in self._watch.read():
            if name == KUBELET_SOCKET and mask & CREATED:
                self._kubelet_recreated = True
                self._kick.set()
            elif name == self.endpoint and mask & REMOVED:
                self._kick.set()  # _check decides by what is there now (our own re-serve too)
        if self._watch.gone:  # the directory itself went away: watch the new one
            self._stop_watch()
            self._kick.set()

    async def notify(self) -> None:
        """The device list changed: every ListAndWatch stream sends the full list again."""
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    # -- serving and registering -------------------------------------------------

    async def _serve(self) -> None:
        self.plugins_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        pb_grpc.add_DevicePluginServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self._server = server
        self._our_inode = os.stat(self.socket_path).st_ino
        log.info("event=plugin_serving resource=%s socket=%s", self.resource_name,
                 self.socket_path)

    async def _unserve(self) -> None:
        server, self._server = self._server, None
        self._our_inode = None
        if server is not None:
            await server.stop(grace=1.0)
        self.registered = False

    async def _try_register(self) -> bool:
        try:
            kubelet_inode = os.stat(self.kubelet_socket).st_ino
        except FileNotFoundError:
            log.info("event=kubelet_absent socket=%s", self.kubelet_socket)
            return False
        request = pb.RegisterRequest(
            version=API_VERSION, endpoint=self.endpoint, resource_name=self.resource_name,
            options=pb.DevicePluginOptions(get_preferred_allocation_available=True))
        try:
            async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
                await pb_grpc.RegistrationStub(channel).Register(request, timeout=15)
        except grpc.aio.AioRpcError as e:
            log.error("event=register_failed resource=%s code=%s detail=%r", self.resource_name,
                      e.code().name, e.details())
            return False
        self._kubelet_inode = kubelet_inode
        self.registered = True
        self.registrations += 1
        log.info("event=registered resource=%s endpoint=%s", self.resource_name, self.endpoint)
        return True

    async def _supervise(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.supervise_interval)
            self._kick.clear()
            try:
                if self._watch is None and self.plugins_dir.is_dir():
                    self._start_watch()
                await self._check()
            except Exception:
                log.exception("event=supervise_error resource=%s", self.resource_name)

    async def _check(self) -> None:
        try:
            kubelet_inode: int | None = os.stat(self.kubelet_socket).st_ino
        except FileNotFoundError:
            kubelet_inode = None
        try:
            ours: int | None = os.stat(self.socket_path).st_ino
        except FileNotFoundError:
            ours = None
        if kubelet_inode is None:
            return  # kubelet is down; act when it is back
        # A re-created kubelet.sock may have the old inode number: the inotify event
        # says so; the inode comparison is the safety net without one.
        recreated, self._kubelet_recreated = self._kubelet_recreated, False
        kubelet_restarted = self.registered and (recreated or kubelet_inode != self._kubelet_inode)
        socket_gone = ours != self._our_inode
        if socket_gone or kubelet_restarted:
            log.warning("event=kubelet_restart_detected resource=%s socket_gone=%s "
                        "kubelet_socket_changed=%s", self.resource_name, socket_gone,
                        kubelet_restarted)
            await self._unserve()
            await self._serve()
        if not self.registered or kubelet_restarted or socket_gone:
            await self._try_register()
