"""The daemon's migratable state: what SET_DEVICE_STATE_FD carries.

One msgpack map with an explicit format name and version (schema in
docs/migration-format.md)::

    {"format": "virtiofsd-py/device-state", "version": 1,
     "source": {...},            # who wrote it, for humans and logs
     "fuse": {...} | None,       # the negotiated FUSE session (Dispatcher)
     "fs": {...}}                # the backend's tables (Filesystem.export_state)

``DaemonState`` is the ``DeviceState`` the vhost-user back-end calls: ``save``
on the source while the device is suspended, ``load`` on the destination.
Decoding is strict: anything that is not exactly a state of a version we know
is refused with a message naming what is wrong, before any of it is used.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any, Final

import msgpack

from virtiofsd_py.fs.api import Filesystem
from virtiofsd_py.fuse.dispatcher import Dispatcher

log = logging.getLogger("virtiofsd_py.migration")

FORMAT: Final = "virtiofsd-py/device-state"
VERSION: Final = 1


class StateError(ValueError):
    """A device state that cannot be loaded; the message says why."""


def encode(doc: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Parse and check the envelope of a saved state."""
    if not data:
        raise StateError("empty device state")
    try:
        # Bounds for hostile input: no single name/array/map can be larger.
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=1 << 16,
            max_bin_len=1 << 20,
            max_array_len=1 << 24,
            max_map_len=1 << 16,
        )
    except Exception as e:  # msgpack raises several unrelated types
        raise StateError(f"device state is not valid msgpack: {e}") from None
    if not isinstance(doc, dict):
        raise StateError(f"device state is a {type(doc).__name__}, not a map")
    if doc.get("format") != FORMAT:
        raise StateError(f"not a virtiofsd-py device state (format {doc.get('format')!r})")
    version = doc.get("version")
    if version != VERSION:
        raise StateError(f"device state version {version!r}; this daemon reads {VERSION}")
    if not isinstance(doc.get("fs"), dict):
        raise StateError("device state has no filesystem tables")
    fuse = doc.get("fuse")
    if fuse is not None and not isinstance(fuse, dict):
        raise StateError("device state: bad FUSE session")
    return doc


class DaemonState:
    """Save/load of the dispatcher session and backend tables (``DeviceState``)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        fs: Filesystem,
        shared_dir: str,
        dump_dir: str | None = None,
        dump_dir_fd: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.fs = fs
        self.shared_dir = shared_dir
        #: Where a state that could not be loaded is kept for inspection (the
        #: fd, opened before the sandbox, reaches it from inside; the path is
        #: what the log tells the operator).
        self.dump_dir = dump_dir
        self.dump_dir_fd = dump_dir_fd

    def save(self) -> bytes:
        t0, c0 = time.monotonic(), time.thread_time()
        with gc_paused():
            data = self._save()
        log.info(
            "device state: %d bytes in %.3f s (cpu %.3f s)",
            len(data), time.monotonic() - t0, time.thread_time() - c0,
        )  # fmt: skip
        return data

    def _save(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "source": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "shared_dir": self.shared_dir,
                "time": time.time(),
            },
            "fuse": self.dispatcher.export_session(),
            "fs": self.fs.export_state(),
        }
        return encode(doc)

    def load(self, data: bytes) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            with gc_paused():
                doc = decode(data)
                self.fs.import_state(doc["fs"])
        except (StateError, OSError, ValueError, TypeError, LookupError, ArithmeticError) as e:
            path = dump_rejected(data, self.dump_dir, self.dump_dir_fd)
            raise StateError(
                f"cannot load the device state: {e}"
                + (
                    f" (saved to {path}; inspect with: virtiofsd-py inspect-state {path})"
                    if path
                    else ""
                )
            ) from e
        self.dispatcher.restore_session(doc["fuse"])
        src = doc.get("source", {})
        log.info(
            "device state from %s pid %s loaded in %.3f s (cpu %.3f s)",
            src.get("host"), src.get("pid"), time.monotonic() - t0, time.thread_time() - c0,
        )  # fmt: skip

    def log_all_changed(self, enabled: bool) -> None:
        self.fs.prepare_migration(enabled)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while a state is built or taken apart: both run with the
    guest stopped and allocate objects per inode, enough to start collections
    that walk the daemon's whole heap (the data has no cycles to free)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def dump_rejected(data: bytes, directory: str | None, dir_fd: int | None = None) -> str | None:
    """Keep a rejected state for debugging; its path, or None."""
    if directory is None:
        return None
    name = f"virtiofsd-py-rejected-state-{os.getpid()}-{int(time.time())}"
    path = os.path.join(directory, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        if dir_fd is not None:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        else:
            fd = os.open(path, flags, 0o600)
    except OSError:
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(data[: 1 << 30])
    return path
