"""Requests that make the passthrough use path-based syscalls, under the
default seccomp filter (kill): SETATTR without a handle goes through
/proc/self/fd paths (truncate(2), chmod(2)), which CPython issues in their
path forms.  A missing allow-list entry kills the daemon with SIGSYS."""

from __future__ import annotations

import os
import stat

import pytest
from daemon_support import HostTree

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.frontend.fuse_client import FuseClient

pytestmark = pytest.mark.ours_only


def setattr_args(valid: int, *, size: int = 0, mode: int = 0) -> bytes:
    return abi.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0)


def test_setattr_without_a_handle_survives_the_filter(
    fuse: FuseClient, host_tree: HostTree
) -> None:
    path = host_tree.path("small.txt")
    entry = fuse.lookup(abi.FUSE_ROOT_ID, "small.txt")
    fuse.call(abi.FUSE_SETATTR, entry.nodeid, setattr_args(abi.FATTR_SIZE, size=5),
              abi.ATTR_OUT.size)  # fmt: skip
    assert path.read_bytes() == host_tree.small[:5]
    fuse.call(abi.FUSE_SETATTR, entry.nodeid, setattr_args(abi.FATTR_MODE, mode=0o600),
              abi.ATTR_OUT.size)  # fmt: skip
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert fuse.getattr(entry.nodeid).size == 5
