"""An in-memory ``Filesystem``: the second backend, and the example of writing one.

Everything lives in Python objects: a table of nodes keyed by node id (which
is also the inode number the guest sees; ids are never reused, so the FUSE
generation is always 0), file data in ``bytearray``, directories as ordered
``name -> (cookie, node id)`` maps.  Files, directories, symlinks, fifos,
sockets and device nodes, hard links, xattrs, rename (with NOREPLACE and
EXCHANGE), setattr, tmpfile, readdir with stable cookies and statfs are
supported; locks are not (``supports_locks`` is False, so the daemon does
not offer POSIX_LOCKS/FLOCK_LOCKS and the guest keeps locks local).

Thread safety is one re-entrant lock around every operation: each one is a
few dict and bytearray operations, so finer locking would buy nothing in
CPython.  Permission checks are the guest kernel's job (virtio-fs always
mounts with ``default_permissions``, and so does ``virtiofsd-py mount``).

A node lives while a directory entry names it, the guest holds a lookup
count on it, or a handle is open on it (an unlinked file stays readable
through its open handles), as on any POSIX file system.

The package is laid out as the passthrough is: nodes.py (what is stored),
core.py (the tables and shared helpers), one module per group of operations
(names.py, files.py, dirs.py, xattrs.py), composed here.
"""

from __future__ import annotations

from virtiofsd_py.fs.memory.dirs import DirOps
from virtiofsd_py.fs.memory.files import FileOps
from virtiofsd_py.fs.memory.names import NameOps
from virtiofsd_py.fs.memory.xattrs import XattrOps


class MemoryFS(NameOps, FileOps, DirOps, XattrOps):
    """A complete POSIX-ish file system held in memory; see the module docstring."""
