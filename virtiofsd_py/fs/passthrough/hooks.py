"""What the passthrough core calls on the objects live migration leaves in it.

The migration package (fs/passthrough/migration/) is built on the core and
the core never imports it: after a load it may install two objects in a
``PassthroughFS``, typed by these protocols.  ``deferred`` holds the nodes
still to be found; the request path tests that attribute once and calls it
only while it is set.  ``lock_restorer`` takes the guest's locks again.
``destroy`` stops both before it drops the tables they work on.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Protocol

from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeKey


class PendingNodes(Protocol):
    """Placeholders of migrated nodes, found after the switch-over."""

    @property
    def pending(self) -> Sized:
        """The nodes not found yet (each will hold an fd once found, unless
        nodes are kept as file handles)."""

    def ensure(self, node: InodeData) -> None:
        """Find ``node`` now if it is still a placeholder: before any use of it."""

    def before_lookup(self, key: InodeKey) -> None:
        """A LOOKUP reached the host inode ``key``: find its placeholders first."""

    def settle(self) -> None:
        """Find every node left (the guest is about to change the namespace)."""

    def cancel(self) -> None:
        """Stop finding (FUSE_DESTROY: the tables are being dropped)."""


class Stoppable(Protocol):
    """A background chore on the tables."""

    def stop(self) -> None:
        """End it and wait for it."""
