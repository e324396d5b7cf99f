"""virtiofsd-py: a hackable virtio-fs vhost-user back-end in Python.

The names a backend author needs (docs/filesystem-api.md) are re-exported
here: the ``Filesystem`` seam and the values it takes and returns, the
``Migratable`` protocol, and the backends that ship with the daemon.
"""

from virtiofsd_py.fs.api import (
    NOW,
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Lock,
    Migratable,
    Opened,
    SessionInfo,
    SetAttr,
    StatxReply,
    dirent_type,
    fs_error,
    make_stat,
)
from virtiofsd_py.fs.memory import MemoryConfig, MemoryFS
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.readonly import ReadOnlyFS

__version__ = "0.1.0"

__all__ = [
    "NOW",
    "ROOT_ID",
    "AttrReply",
    "Context",
    "DirEntry",
    "Entry",
    "Filesystem",
    "Lock",
    "MemoryConfig",
    "MemoryFS",
    "Migratable",
    "Opened",
    "PassthroughConfig",
    "PassthroughFS",
    "ReadOnlyFS",
    "SessionInfo",
    "SetAttr",
    "StatxReply",
    "__version__",
    "dirent_type",
    "fs_error",
    "make_stat",
]
