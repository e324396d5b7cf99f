"""The composition root of the back-ends: the ``Filesystem`` the options ask for.

The one place that knows the concrete classes (``PassthroughFS``,
``MemoryFS``): it builds one from the options and the paths the sandbox
left the serving process (``SandboxView``), and hands the daemon and the
host mount what they need besides, as plain data: what FUSE_INIT may offer,
the fd directory and the table sizes the metrics show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from virtiofsd_py.app import custom_backend
from virtiofsd_py.app.errors import StartupError, describe
from virtiofsd_py.app.options import Options
from virtiofsd_py.confine.sandbox import SandboxView
from virtiofsd_py.fastops import FastOperations, for_passthrough
from virtiofsd_py.fs.api import Filesystem, Migratable
from virtiofsd_py.fs.awaiting import is_async
from virtiofsd_py.fs.memory import MemoryConfig, MemoryFS
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fs.passthrough.migration.schema import PassthroughState
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.fs.readonly import ReadOnlyFS
from virtiofsd_py.fuse.dispatcher import FuseConfig


@dataclass(frozen=True, slots=True)
class TableSizes:
    """How many nodes and open handles the guest holds (the metrics' gauges)."""

    inodes: Callable[[], int]
    handles: Callable[[], int]


@dataclass(frozen=True, slots=True)
class Backend:
    """A built back-end and what its users need to know about it."""

    fs: Filesystem
    #: Closes every fd the back-end holds (at exit; ``Filesystem`` has no such call).
    close: Callable[[], None]
    #: What FUSE_INIT offers the guest.
    fuse: FuseConfig
    #: This process's fd directory as it can name it (relative under --sandbox chroot).
    fd_dir: str
    #: None: the back-end keeps no tables worth showing.
    tables: TableSizes | None = None
    #: How its tables migrate; None: it cannot, and no migration is offered.
    migration: Migratable[PassthroughState] | None = None
    #: Requests it answers on its own tables before the dispatcher sees them
    #: (fastops/); None: every request goes to the dispatcher.  The dispatcher
    #: must report its session to ``fast_ops.session_changed``.
    fast_ops: FastOperations | None = None
    #: Coroutine methods: served through fuse/asyncbridge.py, each request in a greenlet.
    asynchronous: bool = False


def fuse_config(opts: Options, readdirplus: bool) -> FuseConfig:
    """What FUSE_INIT offers, from the options (``readdirplus``: the cache policy allows it)."""
    return FuseConfig(
        readdirplus=opts.readdirplus and readdirplus,
        writeback=opts.writeback,
        killpriv_v2=opts.killpriv_v2,
        posix_acl=opts.posix_acl,
        security_label=opts.security_label,
        allow_mmap=opts.allow_mmap,
        submounts=opts.announce_submounts,
        posix_locks=opts.posix_locks,
        flock_locks=opts.flock_locks,
    )


def memory_fs(opts: Options) -> MemoryFS:
    """``--backend memory``: the options that apply to it (cache, readonly, xattr)."""
    return MemoryFS(MemoryConfig(cache=opts.cache, readonly=opts.readonly, xattr=opts.xattr))


def passthrough_fs(opts: Options, view: SandboxView) -> PassthroughFS:
    """``--backend passthrough`` on the share as the sandbox shows it."""
    assert view.shared_dir is not None
    return PassthroughFS(
        PassthroughConfig(
            shared_dir=view.shared_dir,
            proc_self_fd=view.proc_self_fd,
            cache=opts.cache,
            xattr=opts.xattr,
            allow_direct_io=opts.allow_direct_io,
            xattrmap=XattrMap(opts.xattrmap) if opts.xattrmap is not None else None,
            posix_acl=opts.posix_acl,
            killpriv_v2=opts.killpriv_v2,
            announce_submounts=opts.announce_submounts,
            preserve_noatime=opts.preserve_noatime,
            uid_map=IdMap(opts.translate_uid),
            gid_map=IdMap(opts.translate_gid),
            inode_file_handles=opts.inode_file_handles,
        )
    )


def served(fs: Filesystem, opts: Options) -> Filesystem:
    """What the dispatcher serves: ``fs``, behind ``ReadOnlyFS`` with ``--readonly``."""
    return ReadOnlyFS(fs) if opts.readonly else fs


def custom_fuse_config(fs: Filesystem, opts: Options) -> FuseConfig:
    """What FUSE_INIT offers for a ``--backend MODULE:FACTORY`` back-end.

    As a libfuse mount of it would: locks only if it implements them (else
    the guest keeps them local), and for a pyfuse3 file system what pyfuse3
    asks of the kernel (READDIRPLUS always, write-back cache and ACLs as the
    ``Operations`` attributes say).
    """
    cfg = fuse_config(opts, readdirplus=True)
    cfg.submounts = False
    kind = type(fs)
    cfg.posix_locks = cfg.posix_locks and kind.setlk is not Filesystem.setlk
    cfg.flock_locks = cfg.flock_locks and kind.setlk is not Filesystem.setlk
    ops = getattr(fs, "ops", None)
    if ops is not None and getattr(fs, "asynchronous", False):
        cfg.readdirplus_auto = False
        cfg.writeback = cfg.writeback or bool(getattr(ops, "enable_writeback_cache", False))
        cfg.posix_acl = cfg.posix_acl or bool(getattr(ops, "enable_acl", False))
    return cfg


def custom(fs: Filesystem, opts: Options, view: SandboxView) -> Backend:
    """The ``Backend`` of a ``Filesystem`` made by a ``--backend MODULE:FACTORY``."""
    close = getattr(fs, "close", None)
    return Backend(
        served(fs, opts),
        close if callable(close) else (lambda: None),
        custom_fuse_config(fs, opts),
        view.proc_self_fd,
        asynchronous=is_async(fs),
    )


def load_custom(opts: Options) -> Filesystem | None:
    """Import and make a ``--backend MODULE:FACTORY`` back-end (before confinement);
    None for the built-in ones."""
    if not custom_backend.is_custom(opts.backend):
        return None
    return custom_backend.load(opts.backend, opts.backend_option)


def build(opts: Options, view: SandboxView, made: Filesystem | None = None) -> Backend:
    """The back-end ``--backend`` names; a failure is a :class:`StartupError`.

    ``made``: the ``--backend MODULE:FACTORY`` back-end, from :func:`load_custom`.
    """
    if custom_backend.is_custom(opts.backend):
        fs = made if made is not None else load_custom(opts)
        assert fs is not None
        return custom(fs, opts, view)
    if opts.backend == "memory":
        mem = memory_fs(opts)
        return Backend(
            served(mem, opts),
            mem.close,
            fuse_config(opts, mem.policy.readdirplus),
            view.proc_self_fd,
        )
    try:
        fs = passthrough_fs(opts, view)
    except OSError as e:
        raise StartupError(describe(e)) from None
    fast = for_passthrough(fs, readonly=opts.readonly)
    return Backend(
        served(fs, opts),
        fs.close,
        fuse_config(opts, fs.policy.readdirplus),
        view.proc_self_fd,
        TableSizes(fs.inodes.__len__, fs.handles.__len__),
        PassthroughMigration(
            fs,
            MigrationConfig(
                mode=opts.migration_mode,
                on_error=opts.migration_on_error,
                verify_handles=opts.migration_verify_handles,
                confirm_paths=opts.migration_confirm_paths,
            ),
        ),
        fast,
    )
