"""The vhost-user socket: receive framed messages with their fds, send replies.

The only module that touches the front-end's unix socket.  Reads exactly one
header, then exactly its payload, with ``recvmsg`` so that file descriptors
(SCM_RIGHTS, sent with the first byte of a message) stay attached to the
message they came with.  Framing errors end the connection: after a corrupt
header the stream cannot be resynchronised (vhost-user.rst, "Message format").
"""

from __future__ import annotations

import array
import logging
import socket

from virtiofsd_py.host.fdwait import wait_fd
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.backend import VhostUserBackend
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


class VhostUserConnection:
    """Serves one connected front-end until it disconnects."""

    def __init__(self, sock: socket.socket, backend: VhostUserBackend) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._backend = backend
        self._parser = p.FrameParser()

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
                if reply is not None:
                    await self.send(reply.data, reply.fds)
        except ConnectionClosed as e:
            log.info("vhost-user connection ended: %s", e)
        except p.ProtocolError as e:
            log.error("vhost-user stream is corrupt, closing the connection: %s", e)
        finally:
            await self._backend.close()
            self._sock.close()
