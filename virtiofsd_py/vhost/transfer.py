"""Moving the device state through the pipe QEMU hands over (SET_DEVICE_STATE_FD).

vhost-user.rst, "Migrating back-end state": the writing end writes all of the
state and closes; the reading end reads until EOF.  QEMU reads (SAVE) or
writes (LOAD) only after our reply to SET_DEVICE_STATE_FD, in chunks of up to
1 MiB, so both directions stream without blocking the event loop: a state
bigger than the pipe buffer would otherwise deadlock the daemon.

The back-end state machine only asks for a transfer (a ``TransferRequest``
in its reply); the connection runs it with ``run`` once the reply is sent,
and the outcome comes back to the back-end through ``TransferRequest.outcome``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from virtiofsd_py.host.fdwait import wait_fd
from virtiofsd_py.vhost.protocol import DEVICE_STATE_SAVE

log = logging.getLogger("virtiofsd_py.vhost")

#: Largest write or read per system call (QEMU's own chunk size).
CHUNK = 1 << 20


class TransferError(Exception):
    pass


class StateStore(Protocol):
    """Where the state moved through the pipe comes from and goes to."""

    def save(self) -> bytes:
        """Serialize the state (called while the device is suspended)."""

    def load(self, data: bytes) -> None:
        """Adopt a serialized state; raise with a clear message if it is unusable."""


@dataclass(slots=True, eq=False)
class TransferRequest:
    """One transfer the back-end asked for: which way, through which fd.

    Whoever runs it owns ``fd``; ``outcome`` gets None on success, or the
    exception that ended the transfer, or is cancelled with the connection.
    """

    #: ``DEVICE_STATE_SAVE`` (we write) or ``DEVICE_STATE_LOAD`` (we read).
    direction: int
    fd: int
    state: StateStore
    #: Largest state accepted on LOAD (a hostile or broken front-end).
    limit: int
    outcome: asyncio.Future[BaseException | None]

    def close_fd(self) -> None:
        """Close our end of the pipe once (on SAVE, the front-end's EOF)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def abandon(self) -> None:
        """Never run, or cancelled: release the fd and cancel the outcome."""
        self.close_fd()
        if not self.outcome.done():
            self.outcome.cancel()


async def run(req: TransferRequest) -> None:
    """Move the state through ``req.fd`` and close it; never raises but for a cancel.

    The blocking halves (serializing, adopting) run in the default executor
    so that the loop keeps answering messages meanwhile.
    """
    loop = asyncio.get_running_loop()
    try:
        if req.direction == DEVICE_STATE_SAVE:
            data = await loop.run_in_executor(None, req.state.save)
            await write_all(req.fd, data)
            req.close_fd()
            log.info("device state saved: %d bytes", len(data))
        else:
            data = await read_all(req.fd, req.limit)
            req.close_fd()
            await loop.run_in_executor(None, req.state.load, data)
            log.info("device state loaded: %d bytes", len(data))
    except asyncio.CancelledError:
        req.abandon()
        raise
    except Exception as e:  # reported at CHECK_DEVICE_STATE
        req.close_fd()
        if not req.outcome.done():
            req.outcome.set_result(e)
    else:
        if not req.outcome.done():
            req.outcome.set_result(None)


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking-capable ``fd`` (closed by the caller)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:CHUNK])
        except (BlockingIOError, InterruptedError):
            await wait_fd(fd, writable=True)
            continue
        except OSError as e:
            done = len(data) - len(view)
            raise TransferError(f"writing the state failed after {done} bytes: {e}") from e
        view = view[n:]


async def read_all(fd: int, limit: int) -> bytes:
    """Read until EOF; refuse more than ``limit`` bytes (a hostile or broken peer)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            await wait_fd(fd, writable=False)
            continue
        except OSError as e:
            raise TransferError(f"reading the state failed after {total} bytes: {e}") from e
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise TransferError(f"state larger than the limit of {limit} bytes")
        chunks.append(chunk)
