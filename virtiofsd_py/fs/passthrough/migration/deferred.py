"""Migrated nodes found after the switch-over instead of during it.

The guest stays stopped while the destination loads the device state, and
finding every inode again (open, statx, checks) is most of that load.  With
``--migration-on-error guest-error`` a node that cannot be found only gives
the guest errors, whenever that is noticed, so the destination may install
placeholders, answer CHECK_DEVICE_STATE, and find the nodes afterwards: a
background pass walks them in the source's order, and a request that needs
one first finds it on the spot.  Nodes with open handles or locks are still
found during the load (docs/migration-format.md).

What keeps this equal to finding everything at once:

* A node is found exactly as the eager load finds it (``NodeFinder.find``:
  by handle or by path from the share, identity checked), on the same host
  and file system only (``NodeFinder.same_fs``), where handles and (st_dev,
  st_ino) still name the same inodes.
* Paths are the source's: a guest RENAME, UNLINK or RMDIR would change
  them, so each first finds every node left (``settle``).
* A LOOKUP that reaches a placeholder's inode (same st_dev, st_ino as the
  source sent) finds the placeholder first, so the guest keeps one node id
  per inode.
* A placeholder is never used as a node: every way to a node id goes
  through ``ensure`` first, and a node leaves ``pending`` only once found.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeKey
from virtiofsd_py.fs.passthrough.migration.background import Background
from virtiofsd_py.fs.passthrough.migration.find import NodeFinder
from virtiofsd_py.fs.passthrough.migration.schema import InodeState

log = logging.getLogger("virtiofsd_py.migration")


class DeferredNodes(Background):
    """The placeholders of one load and the thread that finds them
    (``PassthroughFS.deferred``, a ``hooks.PendingNodes``)."""

    name = "vfsd-migration-find"

    def __init__(
        self, fs: PassthroughFS, finder: NodeFinder, pending: dict[int, InodeState]
    ) -> None:
        super().__init__()
        self.fs = fs
        self.finder = finder
        #: node id -> its state entry, until found (or given up).
        self.pending = pending
        #: The source's (st_dev, st_ino) -> node ids, for LOOKUPs that reach them
        #: (more than one when the source had a stale file-handle node too).
        self.by_inode: dict[tuple[int, int], list[int]] = {}
        for nodeid, i in pending.items():
            if i.key is not None:
                self.by_inode.setdefault(i.key[:2], []).append(nodeid)
        self._lock = threading.Lock()
        #: Set once the background pass is over (every node found, or cancelled).
        self.finished = threading.Event()
        self._started = time.monotonic()

    def ensure(self, node: InodeData) -> None:
        """Find ``node`` now if it is still a placeholder."""
        if node.nodeid in self.pending:
            self._find(node.nodeid)

    def before_lookup(self, key: InodeKey) -> None:
        """A LOOKUP found the host inode ``key``: find its placeholder first."""
        for nodeid in self.by_inode.get((key[0], key[1]), ()):
            if nodeid in self.pending:
                self._find(nodeid)

    def settle(self) -> None:
        """Find every node left (before the guest changes the namespace)."""
        for nodeid in list(self.pending):
            self._find(nodeid)

    def cancel(self) -> None:
        """Stop the background pass (FUSE_DESTROY: the tables are being dropped)."""
        self.stop()
        self._close()

    def _close(self) -> None:
        """No more finding: under the lock, so that no find is using the finder."""
        with self._lock:
            self.pending.clear()
            self.finder.close()

    def _find(self, nodeid: int) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            i = self.pending.get(nodeid)
            if i is None:
                return  # found by the other thread while this one waited
            try:
                self._find_locked(nodeid, i)
            finally:
                # Only now: a request that saw the node pending waits on the lock.
                del self.pending[nodeid]

    def _find_locked(self, nodeid: int, i: InodeState) -> None:
        finder = self.finder
        node = self.fs.inodes.get(nodeid)
        if node is None:
            return  # forgotten by the guest meanwhile
        try:
            found = finder.find(i)
        except Exception as e:  # OSError, MigrationError; anything else is a bug, logged
            finder.failed.append(finder.reason(i, e))
            log.error(
                "migration: %s; the guest gets errors for it",
                finder.failed[-1],
                exc_info=not isinstance(e, (OSError, ValueError)),
            )
            return
        if not self.fs.inodes.found(node, found):
            if found[0] >= 0:
                os.close(found[0])
            return
        finder.remember_dir(node, i)

    def _run(self) -> None:
        cpu = time.thread_time()
        try:
            for nodeid in list(self.pending):
                if self._stop.is_set():
                    break
                self._find(nodeid)
        finally:
            if self.fs.deferred is self:
                self.fs.deferred = None
            self._close()
            self.finished.set()
        log.info(
            "migration: placeholders found in %.3f s after the load (thread cpu %.3f s), "
            "%d unusable",
            time.monotonic() - self._started,
            time.thread_time() - cpu,
            len(self.finder.failed),
        )
