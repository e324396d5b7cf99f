"""The destination side: a decoded state becomes this daemon's tables.

Rules (docs/migration-format.md; QEMU docs/interop/vhost-user.rst,
"Migrating back-end state").  The load runs between SET_DEVICE_STATE_FD
(LOAD) and the reply to CHECK_DEVICE_STATE, with the guest stopped; the
reply says whether "the transfer and processing was successful", and after
a success the guest driver continues "as if no migration had occurred".  So
every node id and fh the source gave out must answer here as it did there,
or the load must fail -- unless ``--migration-on-error guest-error`` lets a
node that cannot be found answer EIO instead.

The states of a node of the state::

    PLACEHOLDER --found--> FOUND
        |
        +--not found--> FAILED

* FOUND: its host inode (an O_PATH fd, or a file handle) is attached, its
  identity checked (find.py: the file type; on the source's host and file
  system st_dev and st_ino; with --migration-verify-handles the handle).
* FAILED: not found.  It stays in the table with its id, lookups and
  parent, and every request on it gets EIO (``InodeData.opened``).
* PLACEHOLDER: id, lookups and parent, no inode yet (``DeferredNodes``
  owns it).  Only with guest-error, only for a state from this host and
  file system (``NodeFinder.same_fs``: there keys and handles still name the
  same inodes), and only for nodes no open handle or lock refers to.

During the load (before CHECK_DEVICE_STATE is answered):

1. the whole state has been decoded and checked (schema.py); a malformed
   state fails the load whatever --migration-on-error says;
2. the fd table grows once for every node and handle to come;
3. each node is found (FOUND; not found: FAILED with guest-error, the load
   fails with abort) or becomes a PLACEHOLDER;
4. each handle is reopened from its node with the source's flags (a reopen
   that fails is a FAILED handle or fails the load, as for nodes; a handle
   of a FAILED node gives EIO too);
5. the tables are installed, if this daemon's are still empty.

After the switch-over (the guest runs):

* PLACEHOLDER becomes FOUND or FAILED, found exactly as in step 3: by a
  background pass in the state's order; at once by a request that needs
  the node (``ensure``) or by a LOOKUP that reaches its host inode
  (``before_lookup``: the guest keeps one node id per inode); and all of
  them before a guest RENAME, UNLINK or RMDIR or a save of this daemon
  (``settle``: the state's paths are the source's).
* the guest's locks are taken again (relock.py), waiting while the source,
  on the same host, still holds them.
* FUSE_DESTROY stops both: the tables are dropped.
"""

from __future__ import annotations

import logging
import os
import stat

from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.inodes import InodeData
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.deferred import DeferredNodes
from virtiofsd_py.fs.passthrough.migration.find import NodeFinder
from virtiofsd_py.fs.passthrough.migration.relock import LockRestorer
from virtiofsd_py.fs.passthrough.migration.schema import (
    HandleState,
    InodeState,
    MigrationError,
    PassthroughState,
)
from virtiofsd_py.fs.passthrough.open_files import HandleData
from virtiofsd_py.host.fdbudget import DEFAULT_RESERVE, reserve_fd_table

log = logging.getLogger("virtiofsd_py.migration")

_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


def import_state(fs: PassthroughFS, cfg: MigrationConfig, state: PassthroughState) -> None:
    """Install ``state`` as the tables of ``fs`` (steps 2-5 above); MigrationError
    or OSError when it cannot be."""
    if not fs.file_handles.enabled:  # each node will hold an fd: one table grow for all
        reserve_fd_table(
            len(state.inodes) + len(state.handles) + fs.inodes.fd_nodes + DEFAULT_RESERVE
        )
    finder = NodeFinder(fs, cfg, state)
    held: set[int] | None = None  # None: every node is found now
    if finder.same_fs and cfg.on_error == "guest-error":
        held = {h.inode for h in state.handles} | {lk.inode for lk in state.locks}
    nodes: dict[int, InodeData] = {}
    pending: dict[int, InodeState] = {}
    try:
        for i in state.inodes:
            node = InodeData(i.id, -1, (0, 0, 0), i.mode, i.parent, i.name)
            node.lookups = i.lookups
            nodes[i.id] = node
            if held is None or i.id in held:
                _find_now(finder, node, i)
            else:
                pending[i.id] = i
        handles = [_reopen(fs, finder, nodes[h.inode], h) for h in state.handles]
    except BaseException:
        for n in nodes.values():
            n.close()
        finder.close()
        raise
    fs.inodes.restore(list(nodes.values()), state.next_nodeid)
    fs.handles.restore(handles, state.next_fh)
    for reason in finder.failed:
        log.error("migration: %s; the guest gets errors for it", reason)
    for reason in state.skipped_locks:
        log.error("migration: skipping a lock: %s", reason)
    log.info(
        "migration: %d inodes, %d handles restored (%d unusable, %d to find after the load)",
        len(nodes), len(handles), len(finder.failed), len(pending),
    )  # fmt: skip
    if pending:
        deferred = DeferredNodes(fs, finder, pending)
        fs.deferred = deferred
        deferred.start()
    else:
        finder.close()
    if state.locks:
        restorer = LockRestorer(fs, state.locks)
        fs.lock_restorer = restorer
        restorer.start()


def _find_now(finder: NodeFinder, node: InodeData, i: InodeState) -> None:
    try:
        found = finder.find(i)
    except (OSError, MigrationError) as e:
        finder.failed_to_find(i, e)
    else:
        node.attach(*found)
        finder.remember_dir(node, i)


def _reopen(fs: PassthroughFS, finder: NodeFinder, node: InodeData, h: HandleState) -> HandleData:
    if not node.usable:
        return HandleData(h.fh, h.inode, -1, h.flags)
    host = h.flags & ~_REOPEN_DROP | os.O_CLOEXEC
    if stat.S_ISDIR(node.mode):
        host = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    elif not stat.S_ISREG(node.mode):
        raise MigrationError(f"handle {h.fh} is open on a node that is not a file or directory")
    try:
        fd = fs.reopen_node(node, host)
    except OSError as e:
        reason = f"handle {h.fh} of inode {h.inode}: reopen failed: {e.strerror}"
        if finder.cfg.on_error == "abort":
            raise MigrationError(reason) from None
        finder.failed.append(reason)
        fd = -1
    return HandleData(h.fh, h.inode, fd, h.flags)
