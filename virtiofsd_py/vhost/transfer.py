"""Moving the device state through the pipe QEMU hands over (SET_DEVICE_STATE_FD).

vhost-user.rst, "Migrating back-end state": the writing end writes all of the
state and closes; the reading end reads until EOF.  QEMU reads (SAVE) or
writes (LOAD) only after our reply to SET_DEVICE_STATE_FD, in chunks of up to
1 MiB, so both directions stream without blocking the event loop: a state
bigger than the pipe buffer would otherwise deadlock the daemon.
"""

from __future__ import annotations

import os

from virtiofsd_py.host.fdwait import wait_fd


class TransferError(Exception):
    pass


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking-capable ``fd`` (closed by the caller)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[: 1 << 20])
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
            chunk = os.read(fd, 1 << 20)
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
