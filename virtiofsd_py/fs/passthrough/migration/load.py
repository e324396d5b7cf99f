"""Live migration of the passthrough backend's tables (docs/migration-format.md).

Source: every node is described by how to find it again -- its path relative
to the shared directory, read from ``/proc/self/fd/N`` (the kernel keeps it
current across renames) and confirmed with ``fstatat``; and, in
``file-handles`` mode or when it has no path (unlinked but open), its
``name_to_handle_at`` file handle.  Open handles keep their fh and flags;
locks the guest holds are read from ``/proc/self/fdinfo`` of the fds that
hold them.  Paths are worked out ahead of time once migration starts
(``prepare``), so the switch-over only re-checks what changed since.

Destination: nodes are opened by handle (when given and allowed) or by path,
one component at a time with O_NOFOLLOW from the shared directory, so a
hostile state cannot reach outside it; identities are checked; handles are
reopened; locks re-acquired (in the background while the source, on the same
host, still holds them).

With ``--inode-file-handles`` (mountfds.py) a node holds no fd: the source
sends the handle it keeps and opens it only to read the node's path; the
destination, when it runs with file handles too, keeps each node it found
as a handle and closes the fd.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from virtiofsd_py.fs.api import ROOT_ID, Lock
from virtiofsd_py.fs.passthrough.file_handles import NodeHandle
from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeKey
from virtiofsd_py.fs.passthrough.locks import OFFSET_MAX, flock_arg
from virtiofsd_py.fs.passthrough.migration.background import Background
from virtiofsd_py.fs.passthrough.migration.deferred import DeferredNodes
from virtiofsd_py.fs.passthrough.open_files import HandleData
from virtiofsd_py.host import syscalls as linux
from virtiofsd_py.host.fdbudget import DEFAULT_RESERVE, reserve_fd_table

if TYPE_CHECKING:
    from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS

log = logging.getLogger("virtiofsd_py.migration")

MigrationMode = Literal["find-paths", "file-handles"]
OnError = Literal["abort", "guest-error"]
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY
_S_IFMT = 0o170000
#: Last path components that are not a name in the directory before them.
_NOT_NAMES = frozenset((b"", b".", b".."))


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """The Rust virtiofsd's ``--migration-*`` options."""

    #: Source: what to send to find inodes again.
    mode: MigrationMode = "find-paths"
    #: Destination: a node that cannot be found fails the load, or becomes EIO.
    on_error: OnError = "abort"
    #: Destination: the inode found must have the very file handle the source sent.
    verify_handles: bool = False
    #: Source: re-check every path at switch-over even when nothing was renamed.
    confirm_paths: bool = False


class MigrationError(ValueError):
    pass


# -- source ---------------------------------------------------------------------------------
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
        root = _root_path(self.fs)
        cache: dict[int, bytes | None] = {}
        for node in self.fs.inodes:
            if self._stop.is_set():
                return
            if node.nodeid != ROOT_ID:
                cache[node.nodeid] = _path_of(self.fs, node, root)
        self.cache, self.generation = cache, generation
        log.info("migration: %d paths prepared in %.3f s", len(cache), time.monotonic() - t0)

    def path(self, node: InodeData, root: bytes, confirm: bool) -> bytes | None:
        fresh = not confirm and self.generation == self.fs.namespace_changes
        if fresh and node.nodeid in self.cache:
            return self.cache[node.nodeid]
        return _path_of(self.fs, node, root)


def _root_path(fs: PassthroughFS) -> bytes:
    return os.readlink(fs.proc_path(fs.inodes.root.fd).encode())


def _path_of(fs: PassthroughFS, node: InodeData, root: bytes) -> bytes | None:
    """The node's current path relative to the share, confirmed by identity."""
    try:
        with node.opened() as fd:
            where = os.readlink(fs.proc_path(fd).encode())
    except OSError:
        return None
    prefix = root.rstrip(b"/") + b"/"  # the share's root reads "/" inside a chroot
    if not where.startswith(prefix):
        return None
    rel = where[len(prefix) :]
    try:
        st = os.stat(rel, dir_fd=fs.inodes.root.fd, follow_symlinks=False)
    except OSError:
        return None  # unlinked (the link reads "... (deleted)") or moved meanwhile
    return rel if (st.st_dev, st.st_ino) == node.key[:2] else None


def _handle_of(node: InodeData) -> bytes | None:
    if node.handle is not None:
        return node.handle
    try:
        return linux.name_to_handle(node.fd)[0]
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


def export_state(fs: PassthroughFS, prep: Preparer | None) -> dict[str, Any]:
    cfg = fs.migration
    root = _root_path(fs)
    root_node = fs.inodes.root
    inodes = []
    for node in fs.inodes:
        if node.nodeid == ROOT_ID:
            continue
        if prep is not None:
            path = prep.path(node, root, cfg.confirm_paths)
        else:
            path = _path_of(fs, node, root)
        # A path was confirmed by fstatat (now, or at prepare time with no guest
        # unlink since): the node is linked; only path-less nodes need the fstat.
        unlinked = path is None and _unlinked(node)
        handle = _handle_of(node) if cfg.mode == "file-handles" or path is None else None
        inodes.append(
            {
                "id": node.nodeid,
                "gen": 0,
                "lookups": node.lookups,
                "mode": node.mode,
                "key": list(node.key),
                "parent": node.parent,
                "name": node.name,
                "path": path,
                "handle": handle,
                "unlinked": unlinked,
            }
        )
    handles = [{"fh": h.fh, "inode": h.nodeid, "flags": h.flags} for h in fs.handles]
    locks: list[dict[str, Any]] = []
    for (nodeid, owner), ofd in fs.locks.owners():
        for kind, ltype, start, end in _fd_locks(fs, ofd.fd):
            if kind == "OFDLCK":
                locks.append(_lock(nodeid, owner, ltype, start, end, flock=False))
    for h in fs.handles:
        for kind, ltype, start, end in _fd_locks(fs, h.fd):
            if kind == "FLOCK":
                locks.append(_lock(h.nodeid, h.fh, ltype, start, end, flock=True))
    return {
        "kind": "passthrough",
        "host": socket.gethostname(),
        "root_key": list(root_node.key),
        "next_nodeid": fs.inodes.next_id,
        "next_fh": fs.handles.next_fh,
        "inodes": inodes,
        "handles": handles,
        "locks": locks,
    }


def _lock(
    nodeid: int, owner: int, ltype: int, start: int, end: int, *, flock: bool
) -> dict[str, Any]:
    """``owner`` is the guest lock owner for POSIX locks, the fh for flock locks."""
    return {
        "inode": nodeid,
        "owner": owner,
        "type": ltype,
        "start": start,
        "end": end,
        "flock": flock,
    }


# -- destination ----------------------------------------------------------------------------
def _field(d: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = d.get(key) if type(d) is dict else None
    if type(value) is kind:  # the common case, once per field of every inode
        return value
    if not isinstance(d, dict):
        raise MigrationError(f"{what}: not a map")
    value = d.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MigrationError(f"{what}: field {key!r} missing or of the wrong type")
    return value


class Loader:
    def __init__(self, fs: PassthroughFS, state: dict[str, Any]) -> None:
        self.fs = fs
        self.cfg = fs.migration
        self.state = state
        root_key = state.get("root_key")
        self.same_fs = (
            state.get("host") == socket.gethostname()
            and isinstance(root_key, list)
            and root_key[:2] == list(fs.inodes.root.key[:2])
        )
        self.mount_fd = -1
        self.failed: list[str] = []
        #: Path -> the directory nodes found so far with an fd (b"": the share):
        #: a child is then one openat away instead of a walk.
        self.dirs: dict[bytes, InodeData] = {b"": fs.inodes.root}
        handles = fs.file_handles
        self._make_handle = handles.make if handles.enabled else None

    def _mount_fd(self) -> int:
        if self.mount_fd < 0:
            self.mount_fd = os.open(
                os.fspath(self.fs.config.shared_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        return self.mount_fd

    def _by_handle(self, handle: bytes) -> int:
        if not linux.well_formed_handle(handle):
            raise OSError(errno.EINVAL, "malformed file handle")
        fd = linux.open_by_handle(self._mount_fd(), handle, os.O_PATH | os.O_NOFOLLOW)
        # A file handle names any file of the file system: keep only what lies
        # inside the share (or is unlinked, reachable only through open fds).
        try:
            if os.fstat(fd).st_nlink != 0 and self.fs.share_path(fd) is None:
                raise OSError(errno.EACCES, "file handle names a file outside the shared directory")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_node(self, d: dict[str, Any]) -> int:
        handle = d.get("handle")
        path = d.get("path")
        problems = ""
        if handle and type(handle) is bytes:
            try:
                return self._by_handle(handle)
            except OSError as e:
                problems = f"file handle: {e.strerror or e}; "
        if type(path) is bytes:
            try:
                return self._by_path(path)
            except OSError as e:
                problems += f"path {path!r}: {e.strerror or e}"
            except ValueError as e:  # a NUL byte: no such name
                problems += f"path {path!r}: {e}"
        raise MigrationError(problems.removesuffix("; ") or "neither a path nor a file handle")

    def _by_path(self, path: bytes) -> int:
        """``open_beneath`` from the share, or from the node of the path's
        directory when it was loaded already (it was found the same strict way)."""
        parent, _, name = path.rpartition(b"/")
        dir_node = self.dirs.get(parent)
        dir_fd = dir_node.fd if dir_node is not None else -1
        if dir_fd < 0 or name in _NOT_NAMES or path[:1] == b"/":
            return linux.open_beneath(self.fs.inodes.root.fd, path)
        return os.open(name, _O_PATH, dir_fd=dir_fd)

    def check_identity(self, fd: int, d: dict[str, Any]) -> tuple[int, InodeKey]:
        """The mode and key of ``fd``, once it is known to be the node ``d`` describes."""
        mode, dev, ino, mnt_id = linux.stat_identity(fd)
        if (mode ^ d["mode"]) & _S_IFMT:
            raise MigrationError(
                f"file type {mode & _S_IFMT:o} is not the source's {d['mode'] & _S_IFMT:o}"
            )
        if self.same_fs:
            key = d.get("key")
            if type(key) is list and (len(key) < 2 or key[0] != dev or key[1] != ino):
                raise MigrationError("found a different inode than the source had")
        if self.cfg.verify_handles:
            handle = d.get("handle")
            mine = linux.name_to_handle(fd)[0]
            if not isinstance(handle, bytes) or handle != mine:
                raise MigrationError("file handle differs from the source's")
        return mode, (dev, ino, mnt_id)

    def find(self, d: dict[str, Any]) -> tuple[int, InodeKey, int, NodeHandle | None]:
        """Open and check the node ``d`` describes: OSError or MigrationError if it
        cannot be found.  With ``--inode-file-handles`` the result keeps the handle
        and no fd (the fd is closed)."""
        fd = self.open_node(d)
        try:
            mode, key = self.check_identity(fd, d)
            handle = self._make_handle(fd, mode) if self._make_handle is not None else None
        except BaseException:
            os.close(fd)
            raise
        if handle is not None:
            os.close(fd)
            fd = -1
        return fd, key, mode, handle

    @staticmethod
    def reason(d: dict[str, Any], e: Exception) -> str:
        return f"inode {d.get('id')} ({_describe(d)}): {e}"

    def failed_to_find(self, d: dict[str, Any], e: Exception) -> None:
        """Record (guest-error) or raise (abort) that the node ``d`` was not found."""
        if self.cfg.on_error == "abort":
            raise MigrationError(self.reason(d, e)) from None
        self.failed.append(self.reason(d, e))

    def remember_dir(self, node: InodeData, d: dict[str, Any]) -> None:
        """Children of a directory found with an fd are then opened from it."""
        if node.mode & _S_IFMT == stat.S_IFDIR and node.fd >= 0:
            path = d.get("path")
            if type(path) is bytes:
                self.dirs[path] = node

    def node(self, d: dict[str, Any], ids: set[int], deferred: bool) -> InodeData:
        """The node ``d`` describes: found now, or (``deferred``) a placeholder
        that ``DeferredNodes`` finds after the switch-over."""
        nodeid = d["id"]  # checked by import_state
        mode = d.get("mode")
        lookups = d.get("lookups")
        if type(mode) is not int or type(lookups) is not int or not 0 <= mode <= 0xFFFF_FFFF:
            raise MigrationError(f"inode {nodeid}: mode or lookups missing or out of range")
        parent = d.get("parent")
        name = d.get("name")
        if type(parent) is not int or (parent not in ids and parent != ROOT_ID):
            parent, name = ROOT_ID, b""
        if type(name) is not bytes:
            name = b""
        node = InodeData(nodeid, -1, (0, 0, 0), mode, parent, name)
        node.lookups = lookups if lookups > 0 else 0
        if not deferred:
            try:
                found = self.find(d)
            except (OSError, MigrationError) as e:
                self.failed_to_find(d, e)
            else:
                node.attach(*found)
                self.remember_dir(node, d)
        return node

    def close(self) -> None:
        self.dirs.clear()
        fd, self.mount_fd = self.mount_fd, -1
        if fd >= 0:
            os.close(fd)


def _describe(d: dict[str, Any]) -> str:
    path = d.get("path")
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return "unlinked" if d.get("unlinked") else "no path"


def _break_cycles(nodes: dict[int, InodeData]) -> None:
    """Re-root nodes whose parent chain does not reach the root (hostile state)."""
    for node in nodes.values():
        seen = {node.nodeid}
        cur = node.parent
        while cur != ROOT_ID:
            if cur in seen or cur not in nodes:
                node.parent, node.name = ROOT_ID, b""
                break
            seen.add(cur)
            cur = nodes[cur].parent


def import_state(fs: PassthroughFS, state: dict[str, Any]) -> None:
    if state.get("kind") != "passthrough":
        raise MigrationError(f"state of a {state.get('kind')!r} backend, not passthrough")
    raw_inodes = _field(state, "inodes", list, "state")
    raw_handles = _field(state, "handles", list, "state")
    raw_locks = state.get("locks", [])
    if not isinstance(raw_locks, list):
        raise MigrationError("state: locks is not a list")
    ids: set[int] = set()
    for d in raw_inodes:
        nodeid = _field(d, "id", int, "inode")
        if nodeid <= ROOT_ID or nodeid in ids or nodeid >= 1 << 63:
            raise MigrationError(f"inode id {nodeid} is invalid or repeated")
        ids.add(nodeid)
    if not fs.file_handles.enabled:  # each node will hold an fd: one table grow for all
        reserve_fd_table(len(ids) + len(raw_handles) + fs.inodes.fd_nodes + DEFAULT_RESERVE)
    loader = Loader(fs, state)
    # Found now: nodes with open files or locks (reopened / re-taken below), and
    # every node unless a node not found may just give the guest errors.
    defer = loader.same_fs and loader.cfg.on_error == "guest-error"
    eager = _held_nodes(raw_handles, raw_locks) if defer else ids
    nodes: dict[int, InodeData] = {}
    pending: dict[int, dict[str, Any]] = {}
    try:
        for d in raw_inodes:
            nodeid = d["id"]
            node = loader.node(d, ids, deferred=nodeid not in eager)
            nodes[nodeid] = node
            if nodeid not in eager:
                pending[nodeid] = d
        _break_cycles(nodes)
        handles = [_reopen(fs, nodes, d, loader) for d in raw_handles]
    except BaseException:
        for n in nodes.values():
            n.close()
        loader.close()
        raise
    next_id = state.get("next_nodeid")
    next_fh = state.get("next_fh")
    fs.inodes.restore(list(nodes.values()), next_id if isinstance(next_id, int) else 0)
    fs.handles.restore(
        [h for h in handles if h is not None], next_fh if isinstance(next_fh, int) else 0
    )
    for reason in loader.failed:
        log.error("migration: %s; the guest gets errors for it", reason)
    log.info(
        "migration: %d inodes, %d handles restored (%d unusable, %d to find after the load)",
        len(nodes), len(handles), len(loader.failed), len(pending),
    )  # fmt: skip
    if pending:
        fs.deferred = DeferredNodes(fs, loader, pending)
        fs.deferred.start()
    else:
        loader.close()
    if raw_locks:
        fs.lock_restorer = LockRestorer(fs, raw_locks)
        fs.lock_restorer.start()


def _held_nodes(raw_handles: list[Any], raw_locks: list[Any]) -> set[int]:
    """Node ids the state's open handles and locks refer to."""
    return {
        d["inode"]
        for d in (*raw_handles, *raw_locks)
        if isinstance(d, dict) and isinstance(d.get("inode"), int)
    }


def _reopen(
    fs: PassthroughFS, nodes: dict[int, InodeData], d: Any, loader: Loader
) -> HandleData | None:
    fh = _field(d, "fh", int, "handle")
    nodeid = _field(d, "inode", int, f"handle {fh}")
    flags = _field(d, "flags", int, f"handle {fh}")
    if fh <= 0 or fh >= 1 << 63:
        raise MigrationError(f"handle {fh} is invalid")
    node = nodes.get(nodeid)
    if node is None:
        raise MigrationError(f"handle {fh} refers to unknown inode {nodeid}")
    if not node.usable:
        return HandleData(fh, nodeid, -1, flags)
    host = flags & ~_REOPEN_DROP | os.O_CLOEXEC
    if stat.S_ISDIR(node.mode):
        host = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    elif not stat.S_ISREG(node.mode):
        raise MigrationError(f"handle {fh} is open on a node that is not a file or directory")
    try:
        fd = fs.reopen_node(node, host)
    except OSError as e:
        reason = f"handle {fh} of inode {nodeid}: reopen failed: {e.strerror}"
        if loader.cfg.on_error == "abort":
            raise MigrationError(reason) from None
        loader.failed.append(reason)
        fd = -1
    return HandleData(fh, nodeid, fd, flags)


class LockRestorer(Background):
    """Takes the guest's locks again, waiting while the source still holds them."""

    name = "vfsd-lock-restore"

    def __init__(self, fs: PassthroughFS, locks: list[Any], timeout: float = 120.0) -> None:
        super().__init__()
        self.fs = fs
        self.locks = locks
        self.timeout = timeout

    def _run(self) -> None:
        pending = []
        for d in self.locks:
            try:
                nodeid = _field(d, "inode", int, "lock")
                owner = _field(d, "owner", int, "lock")
                ltype = _field(d, "type", int, "lock")
                start = _field(d, "start", int, "lock")
                end = _field(d, "end", int, "lock")
            except MigrationError as e:
                log.error("migration: skipping a lock: %s", e)
                continue
            if ltype not in (fcntl.F_RDLCK, fcntl.F_WRLCK) or not 0 <= start <= end:
                log.error("migration: skipping an invalid lock on inode %d", nodeid)
                continue
            pending.append((nodeid, owner, ltype, start, end, bool(d.get("flock"))))
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while pending and time.monotonic() < deadline:
            pending = [lk for lk in pending if not self._try(*lk)]
            if pending and self._stop.wait(delay):
                return
            delay = min(delay * 2, 0.2)
        for nodeid, owner, *_ in pending:
            log.error("migration: could not re-take a lock on inode %d (owner %#x)", nodeid, owner)
        if not pending and self.locks:
            log.info("migration: %d guest locks re-taken", len(self.locks))

    def _try(self, nodeid: int, owner: int, ltype: int, start: int, end: int, flock: bool) -> bool:
        fs = self.fs
        node = fs.inodes.get(nodeid)
        if node is None or not node.usable:
            return True  # forgotten meanwhile: nothing to hold
        try:
            if flock:
                h = fs.handles.get(owner, nodeid)
                op = fcntl.LOCK_EX if ltype == fcntl.F_WRLCK else fcntl.LOCK_SH
                fcntl.flock(h.fd, op | fcntl.LOCK_NB)
            else:
                fd = fs.lock_owner_fd(node, owner, ltype == fcntl.F_WRLCK)
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_arg(Lock(start, end, ltype)))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            log.error("migration: lock on inode %d: %s", nodeid, e)
            return True
        return True
