"""``--metrics ADDR``: serve ``Metrics.prometheus()`` over HTTP on the daemon's loop.

ADDR is a unix socket path (``/run/vfsd.metrics`` or ``unix:PATH``) or a
loopback TCP address (``PORT``, ``127.0.0.1:PORT``, ``localhost:PORT``,
``[::1]:PORT``).  Anything else is refused: the metrics reveal what the
guest does, and the daemon has no business listening on a network.

The server speaks just enough HTTP/1.x for Prometheus and curl: it reads
the request head, answers ``GET /metrics`` (or ``/``) with the text format
and closes the connection.  A head without the blank line that ends it
(the client half-closed) is answered as far as it goes.  It is ours, not
``prometheus_client``'s, because that one binds a TCP address itself and
serves from threads: see docs/ARCHITECTURE.md, "Hand-written where a
library would do".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from virtiofsd_py.app.metrics import Metrics

log = logging.getLogger("virtiofsd_py.app.metrics")

#: What ``Metrics.prometheus()`` writes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: A request head larger than this, or slower than this, is dropped.
MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0


class AddressError(ValueError):
    """ADDR is malformed or not a loopback/unix address."""


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where to listen: ``path`` for a unix socket, else ``host``:``port``."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(addr: str) -> MetricsAddress:
    """Parse ``--metrics``; raises AddressError for anything not local."""
    if addr.startswith("unix:"):
        addr = addr[5:]
        if not addr:
            raise AddressError("--metrics unix: needs a path")
        return MetricsAddress(path=addr)
    if addr.startswith(("/", "./")):
        return MetricsAddress(path=addr)
    host, sep, port_s = addr.rpartition(":")
    if not sep:
        host, port_s = "127.0.0.1", addr
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_s, 10)
    except ValueError:
        raise AddressError(f"--metrics {addr!r}: expected PATH, unix:PATH or [HOST:]PORT") from None
    if not 0 < port < 65536:
        raise AddressError(f"--metrics {addr!r}: port out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"--metrics {addr!r}: host must be a loopback address") from None
    if not ip.is_loopback:
        raise AddressError(
            f"--metrics {addr!r}: refusing a non-loopback address; use a unix socket or "
            "127.0.0.1/::1 and forward it if needed"
        )
    return MetricsAddress(host=str(ip), port=port)


class MetricsServer:
    """The listening server; ``close`` stops it and removes its socket file."""

    def __init__(self, metrics: Metrics, address: MetricsAddress) -> None:
        self.metrics = metrics
        self.address = address
        self._accepting: asyncio.Future[None] | None = None
        self._conns: set[asyncio.Future[None]] = set()
        self._sock: socket.socket | None = None
        self._dir_fd: int | None = None

    def open(self) -> None:
        """Bind and listen, synchronously: the daemon does this before it enters
        its sandbox, where the path may be out of reach (pivot_root) and a TCP
        address would be in the sandbox's own network namespace."""
        if self._sock is not None:
            return
        a = self.address
        if a.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if not _is_socket(a.path):
                    raise OSError(f"{a.path} exists and is not a socket")
                os.unlink(a.path)  # a stale one: the pid lock on the vhost socket is ours
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o077)  # 0600: only the daemon's user reads the metrics
            try:
                sock.bind(a.path)
                # Removed at exit through this fd: the path may be out of reach
                # by then (sandbox).
                self._dir_fd = os.open(
                    os.path.dirname(os.path.abspath(a.path)),
                    os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                )
            except OSError:
                sock.close()
                raise
            finally:
                os.umask(old)
        else:
            family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((a.host, a.port))
            except OSError:
                sock.close()
                raise
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock

    async def start(self) -> None:
        """Serve on the loop (opening the socket first if ``open`` was not called).

        Connections are taken with ``sock_accept`` on the socket ``open``
        made listen.
        """
        self.open()
        assert self._sock is not None
        self._accepting = asyncio.ensure_future(self._accept_loop(self._sock))
        log.info("serving metrics on %s", self.bound())

    def bound(self) -> str:
        """The address actually bound (the real port when 0 was not asked for)."""
        if self.address.path is not None or self._sock is None:
            return str(self.address)
        host, port = self._sock.getsockname()[:2]
        return str(MetricsAddress(host=host, port=port))

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._accepting = None
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        if self._dir_fd is not None:
            assert self.address.path is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.basename(self.address.path), dir_fd=self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = None

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                log.warning("metrics: accept failed: %s", e)
                continue
            task = asyncio.ensure_future(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            head = await asyncio.wait_for(self._read_head(loop, conn), HEAD_TIMEOUT)
            status, body = self._respond(head)
            payload = body.encode()
            await loop.sock_sendall(
                conn,
                f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload,
            )
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            conn.close()

    @staticmethod
    async def _read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                break
            head += chunk
        return head

    def _respond(self, head: bytes) -> tuple[str, str]:
        if len(head) > MAX_HEAD:
            return "431 Request Header Fields Too Large", ""
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", "bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "only GET\n"
        if target not in (b"/metrics", b"/"):
            return "404 Not Found", "try /metrics\n"
        body = self.metrics.prometheus()
        return "200 OK", "" if method == b"HEAD" else body


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)
