"""The daemon's migratable state: what SET_DEVICE_STATE_FD carries.

One msgpack map with an explicit format name and version (schema in
docs/migration-format.md)::

    {"format": "virtiofsd-py/device-state", "version": 1,
     "source": {...},            # who wrote it, for humans and logs
     "fuse": {...} | None,       # the negotiated FUSE session (Dispatcher)
     "fs": {...}}                # the backend's tables (fs/passthrough/migration/schema.py)

``Envelope`` is that map typed; ``decode`` is the one way from bytes to it
and is strict: anything that is not exactly a state of a version we know is
refused with a message naming what is wrong, before any of it is used.
``StateProvider`` is what the vhost-user back-end calls for it (its
``DeviceState``): ``save`` on the source while the device is suspended,
``load`` on the destination.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from virtiofsd_py.fs.api import Migratable
from virtiofsd_py.fs.passthrough.migration import schema
from virtiofsd_py.fs.passthrough.migration.schema import MigrationError, PassthroughState
from virtiofsd_py.fuse.dispatcher import Dispatcher, SessionState

log = logging.getLogger("virtiofsd_py.migration")

FORMAT: Final = "virtiofsd-py/device-state"
VERSION: Final = 1


class StateError(ValueError):
    """A device state that cannot be loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class Source:
    """Who wrote the state: for logs and humans only (a field of the wrong type is None)."""

    host: str | None
    pid: int | None
    shared_dir: str | None
    time: float | None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One device state of ``VERSION``."""

    source: Source
    #: The negotiated FUSE session; None if the guest had not mounted.
    fuse: SessionState | None
    fs: PassthroughState


def encode(env: Envelope) -> bytes:
    src = env.source
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "source": {
            "host": src.host,
            "pid": src.pid,
            "shared_dir": src.shared_dir,
            "time": src.time,
        },
        "fuse": None if env.fuse is None else env.fuse.to_dict(),
        "fs": schema.encode(env.fs),
    }
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    return data


def decode(data: bytes) -> Envelope:
    """Parse and check a saved state (StateError if it is not one we can load)."""
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
    try:
        session = None if fuse is None else SessionState.from_dict(fuse)
    except ValueError as e:
        raise StateError(f"device state: bad FUSE session: {e}") from None
    try:
        tables = schema.decode(doc["fs"])
    except MigrationError as e:
        raise StateError(str(e)) from None
    return Envelope(_source(doc.get("source")), session, tables)


def _source(raw: object) -> Source:
    d: dict[Any, Any] = raw if isinstance(raw, dict) else {}

    def typed(key: str, *kinds: type) -> Any:
        value = d.get(key)
        return value if type(value) in kinds else None

    return Source(
        typed("host", str), typed("pid", int), typed("shared_dir", str), typed("time", float, int)
    )


class StateProvider:
    """The vhost-user back-end's ``DeviceState``: the dispatcher's session and a
    backend's tables, in one ``Envelope``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        backend: Migratable[PassthroughState],
        shared_dir: str,
        dump_dir: str | None = None,
        dump_dir_fd: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.backend = backend
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
        source = Source(socket.gethostname(), os.getpid(), self.shared_dir, time.time())
        return encode(Envelope(source, self.dispatcher.session, self.backend.export_state()))

    def load(self, data: bytes) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            with gc_paused():
                env = decode(data)
                self.backend.import_state(env.fs)
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
        self.dispatcher.restore_session(None if env.fuse is None else env.fuse.to_dict())
        log.info(
            "device state from %s pid %s loaded in %.3f s (cpu %.3f s)",
            env.source.host, env.source.pid, time.monotonic() - t0, time.thread_time() - c0,
        )  # fmt: skip

    def log_all_changed(self, enabled: bool) -> None:
        self.backend.prepare_migration(enabled)


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
