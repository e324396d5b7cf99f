"""The vhost-user I/O edge: the front-end's socket and the device-state pipe.

The only module that touches the front-end's unix socket.  Reads exactly one
header, then exactly its payload, with ``recvmsg`` so that file descriptors
(SCM_RIGHTS, sent with the first byte of a message) stay attached to the
message they came with.  Framing errors end the connection: after a corrupt
header the stream cannot be resynchronised (vhost-user.rst, "Message Specification").

When a reply asks for a device-state transfer, it is started here once the
reply is sent (vhost-user.rst, "Migrating back-end state": the front-end
touches the pipe only after the reply), runs while further messages are
served, and is cancelled when the connection ends.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket

from virtiofsd_py.host.fdwait import wait_fd
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost import transfer
from virtiofsd_py.vhost.backend import VhostUserBackend
from virtiofsd_py.vhost.transfer import TransferRequest
from virtiofsd_py.virtio.memory import close_fds

log = logging.getLogger("virtiofsd_py.vhost")

_ANC_SPACE = socket.CMSG_SPACE(p.MAX_FDS * array.array("i").itemsize)


class ConnectionClosed(Exception):
    pass


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class StateTransfers:
    """Runs the device-state transfers a back-end asks for, on the running loop.

    The back-end refuses a transfer while one runs, so there is at most one.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self, request: TransferRequest) -> None:
        """Run ``request`` in the background; its outcome reaches the back-end."""
        task = asyncio.ensure_future(transfer.run(request))
        # A task cancelled before its first step never enters ``run``.
        task.add_done_callback(lambda _: request.abandon())
        self._task = task

    async def cancel(self) -> None:
        """Stop a running transfer and wait until its fd is closed."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait((task,))


class VhostUserConnection:
    """Serves one connected front-end until it disconnects."""

    def __init__(self, sock: socket.socket, backend: VhostUserBackend) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._backend = backend
        self._parser = p.FrameParser()
        self._transfers = StateTransfers()

    async def receive(self) -> p.Message:
        """The next whole message; raises ConnectionClosed or ProtocolError."""
        while True:
            need = self._parser.next_read_size()
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(need, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self._sock.fileno(), writable=False)
                continue
            except ConnectionResetError as e:
                close_fds(self._parser.pending_fds())
                raise ConnectionClosed(str(e)) from e
            fds = _fds_from_ancillary(ancdata)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise p.ProtocolError("too many file descriptors in one message (truncated)")
            if not data:
                close_fds(fds)
                close_fds(self._parser.pending_fds())
                raise ConnectionClosed("front-end closed the connection")
            msgs = self._parser.feed(data, fds)
            if msgs:
                return msgs[0]

    async def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                n = self._sock.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self._sock.fileno(), writable=True)
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise ConnectionClosed(str(e)) from e
            view = view[n:]
            anc = []

    async def serve(self) -> None:
        """Handle messages one at a time until the front-end goes away."""
        try:
            while True:
                msg = await self.receive()
                log.debug(
                    "vhost-user <- %s flags=%#x size=%d fds=%d",
                    msg.name,
                    msg.flags,
                    len(msg.payload),
                    len(msg.fds),
                )
                reply = await self._backend.handle(msg)
                if reply is None:
                    continue
                try:
                    await self.send(reply.data, reply.fds)
                except BaseException:
                    if reply.transfer is not None:
                        reply.transfer.abandon()
                    raise
                if reply.transfer is not None:
                    self._transfers.start(reply.transfer)
        except ConnectionClosed as e:
            log.info("vhost-user connection ended: %s", e)
        except p.ProtocolError as e:
            log.error("vhost-user stream is corrupt, closing the connection: %s", e)
        finally:
            await self._transfers.cancel()
            await self._backend.close()
            self._sock.close()
