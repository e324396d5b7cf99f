"""The source side: the passthrough's tables described so that another daemon
can find every node again (docs/migration-format.md).

Every node is described by how to find it again -- its path relative to the
share (``PassthroughFS.share_path``: the kernel keeps ``/proc/self/fd/N``
current across renames, one fstatat confirms it) and, in ``file-handles``
mode or when it has no path (unlinked but open), its file handle.  Open
handles keep their fh and flags; locks the guest holds are read from
``/proc/self/fdinfo`` of the fds that hold them.  Nothing is changed: if the
migration fails the source goes on serving (vhost-user.rst, "Migrating
back-end state").

Paths are worked out ahead of time once migration starts (``Preparer``, on
LOG_ALL, while the guest still runs), so the switch-over only re-checks what
changed since.  With ``--inode-file-handles`` a node holds no fd: its stored
handle is sent, and the handle is opened only to read the node's path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time

from virtiofsd_py.fs.api import ROOT_ID
from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.inodes import InodeData
from virtiofsd_py.fs.passthrough.locks import OFFSET_MAX
from virtiofsd_py.fs.passthrough.migration.background import Background
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.schema import (
    HandleState,
    InodeState,
    LockState,
    PassthroughState,
)
from virtiofsd_py.host import syscalls

log = logging.getLogger("virtiofsd_py.migration")


class Preparer(Background):
    """Paths worked out while the guest still runs (from LOG_ALL on).

    ``namespace_changes`` of the backend counts guest renames/unlinks; a
    cached path is trusted at switch-over only if none happened since it was
    computed (host-side renames are caught by the destination's identity
    check and the file-handle fallback).
    """

    name = "vfsd-migration-prep"

    def __init__(self, fs: PassthroughFS) -> None:
        super().__init__()
        self.fs = fs
        self.cache: dict[int, bytes | None] = {}
        self.generation = -1

    def _run(self) -> None:
        t0 = time.monotonic()
        self.fs.settle_migration()
        generation = self.fs.namespace_changes
        root = self.fs.share_root()
        cache: dict[int, bytes | None] = {}
        for node in self.fs.inodes:
            if self._stop.is_set():
                return
            if node.nodeid != ROOT_ID:
                cache[node.nodeid] = path_of(self.fs, node, root)
        self.cache, self.generation = cache, generation
        log.info("migration: %d paths prepared in %.3f s", len(cache), time.monotonic() - t0)

    def path(self, node: InodeData, root: bytes, confirm: bool) -> bytes | None:
        fresh = not confirm and self.generation == self.fs.namespace_changes
        if fresh and node.nodeid in self.cache:
            return self.cache[node.nodeid]
        return path_of(self.fs, node, root)


def path_of(fs: PassthroughFS, node: InodeData, root: bytes) -> bytes | None:
    """The node's current path relative to the share (``root``: ``fs.share_root()``);
    None for the share itself (only the root node is that) and outside it."""
    try:
        with node.opened() as fd:
            return fs.share_path(fd, root, ident=node.key[:2]) or None
    except OSError:
        return None


def _handle_of(node: InodeData) -> bytes | None:
    if node.handle is not None:
        return node.handle
    try:
        return syscalls.name_to_handle(node.fd)[0]
    except OSError:
        return None


def _unlinked(node: InodeData) -> bool:
    try:
        with node.opened() as fd:
            return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


def _fd_locks(fs: PassthroughFS, fd: int) -> list[tuple[str, int, int, int]]:
    """(class, type, start, end) of each lock held through ``fd``'s open file."""
    out: list[tuple[str, int, int, int]] = []
    try:
        with open(fs.fdinfo_path(fd)) as f:
            lines = [line for line in f if line.startswith("lock:")]
    except OSError:
        return out
    for line in lines:
        words = line.split()
        # lock:  N: CLASS ADVISORY ACCESS PID MAJ:MIN:INO START END|EOF
        if len(words) < 9:
            continue
        kind = fcntl.F_WRLCK if words[4] == "WRITE" else fcntl.F_RDLCK
        end = OFFSET_MAX if words[8] == "EOF" else int(words[8])
        out.append((words[2], kind, int(words[7]), end))
    return out


def export_state(
    fs: PassthroughFS, cfg: MigrationConfig, prep: Preparer | None
) -> PassthroughState:
    """The tables of ``fs`` (device suspended; deferred nodes already settled)."""
    root = fs.share_root()
    inodes: list[InodeState] = []
    send_handles = cfg.mode == "file-handles"
    for node in fs.inodes:
        if node.nodeid == ROOT_ID:
            continue
        if prep is not None:
            path = prep.path(node, root, cfg.confirm_paths)
        else:
            path = path_of(fs, node, root)
        # A path was confirmed by fstatat (now, or at prepare time with no guest
        # unlink since): the node is linked; only path-less nodes need the fstat.
        unlinked = path is None and _unlinked(node)
        handle = _handle_of(node) if send_handles or path is None else None
        inodes.append(
            InodeState(
                node.nodeid,
                node.lookups,
                node.mode,
                node.key,
                node.parent,
                node.name,
                path,
                handle,
                unlinked,
            )
        )
    locks: list[LockState] = []
    for (nodeid, owner), ofd in fs.locks.owners():
        for kind, ltype, start, end in _fd_locks(fs, ofd.fd):
            if kind == "OFDLCK":
                locks.append(LockState(nodeid, owner, ltype, start, end, flock=False))
    handles = list(fs.handles)
    for h in handles:
        for kind, ltype, start, end in _fd_locks(fs, h.fd):
            if kind == "FLOCK":
                locks.append(LockState(h.nodeid, h.fh, ltype, start, end, flock=True))
    return PassthroughState(
        host=socket.gethostname(),
        root_key=fs.inodes.root.key,
        next_nodeid=fs.inodes.next_id,
        next_fh=fs.handles.next_fh,
        inodes=tuple(inodes),
        handles=tuple(HandleState(h.fh, h.nodeid, h.flags) for h in handles),
        locks=tuple(locks),
    )
