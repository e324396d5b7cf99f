"""``--metrics ADDR``: serve ``Metrics.prometheus()`` over HTTP on the daemon's loop.

ADDR is a unix socket path (``/run/vfsd.metrics`` or ``unix:PATH``) or a
loopback TCP address (``PORT``, ``127.0.0.1:PORT``, ``localhost:PORT``,
``[::1]:PORT``).  Anything else is refused: the metrics reveal what the
guest does, and the daemon has no business listening on a network.

The server speaks just enough HTTP/1.x for Prometheus and curl: it reads
the request head, answers ``GET /metrics`` (or ``/``) with the text format
and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass

from virtiofsd_py.metrics import Metrics

log = logging.getLogger("virtiofsd_py.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        a = self.address
        if a.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(a.path) and not _is_socket(a.path):
                    raise OSError(f"{a.path} exists and is not a socket")
                os.unlink(a.path)
            old = os.umask(0o077)  # 0600: only the daemon's user reads the metrics
            try:
                self._server = await asyncio.start_unix_server(self._serve, a.path)
            finally:
                os.umask(old)
        else:
            self._server = await asyncio.start_server(self._serve, a.host, a.port)
        log.info("serving metrics on %s", self.bound())

    def bound(self) -> str:
        """The address actually bound (the real port when 0 was not asked for)."""
        if self.address.path is not None or self._server is None:
            return str(self.address)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(MetricsAddress(host=host, port=port))

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            status, body = self._respond(head)
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
