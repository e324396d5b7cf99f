"""What the passthrough's tables tell a mirror of them kept outside Python.

Compiled fast operations (virtiofsd_py/fast/) answer requests on worker
threads without the GIL, so they cannot read ``InodeTable`` or
``HandleTable``: they keep a copy in C of what they need (node id -> O_PATH
fd, fh -> open fd) and the tables report every change to it.  The rule that
makes this safe: a ``*_dropped`` / ``*_cleared`` call returns only once no
fast operation uses the fds dropped, and it is made while the table still
holds the entry, so Python closes an fd only after the mirror let go of it
(an fd number reused for another file is never read or written by mistake).

Only nodes that hold an fd are reported (a node kept as a file handle, or a
migrated one not found yet, has none): the mirror has no entry for the
others and the fast operations leave their requests to the Python path.
"""

from __future__ import annotations

from typing import Protocol


class TableMirror(Protocol):
    """The receiving side; every call is made with the reporting table's lock held."""

    def node_added(self, nodeid: int, fd: int) -> None:
        """Node ``nodeid`` now holds the O_PATH ``fd``."""

    def node_dropped(self, nodeid: int) -> None:
        """Node ``nodeid`` is gone: returns once no fast operation uses its fd."""

    def nodes_cleared(self) -> None:
        """Every node but the root is gone (as ``node_dropped`` for each)."""

    def handle_added(self, fh: int, nodeid: int, fd: int, flags: int) -> None:
        """Handle ``fh`` of node ``nodeid`` is the open ``fd`` (opened with ``flags``)."""

    def handle_dropped(self, fh: int) -> None:
        """Handle ``fh`` is gone: returns once no fast operation uses its fd."""

    def handles_cleared(self) -> None:
        """Every handle is gone (as ``handle_dropped`` for each)."""

    def lock_owners(self, count: int) -> None:
        """The lock table now holds ``count`` owners' OFDs."""

    def detached(self) -> None:
        """No more reports: forget everything (the root too) once unused."""
