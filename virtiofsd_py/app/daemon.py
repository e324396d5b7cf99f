"""Process lifecycle: listening socket, pid lock, one front-end, clean exit.

Wires the layers together: the passthrough ``Filesystem`` behind the FUSE
``Dispatcher``, the dispatcher behind the ``QueueRunner``, the runner under
the vhost-user ``VhostUserBackend``, and the backend behind the socket
``VhostUserConnection``.  Serves exactly one front-end connection, as the
Rust virtiofsd does, and exits when it ends or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import resource
import signal
import socket
import stat
import tempfile
from dataclasses import dataclass

from virtiofsd_py.app import service
from virtiofsd_py.app.options import Options
from virtiofsd_py.app.service import ServiceHooks
from virtiofsd_py.confine.process import ConfinementError, confine, fs_paths
from virtiofsd_py.confine.sandbox import FORWARDED_SIGNALS, exit_like
from virtiofsd_py.fs.memory import MemoryFS, memory_fs_from_options
from virtiofsd_py.fs.passthrough.creds import drop_supplementary_groups
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig
from virtiofsd_py.host.fdbudget import FD_TABLE_AT_START, reserve_fd_table
from virtiofsd_py.migration.envelope import StateProvider
from virtiofsd_py.vhost.backend import BackendConfig, VhostUserBackend
from virtiofsd_py.vhost.connection import VhostUserConnection
from virtiofsd_py.virtio.runner import QueueRunner

log = logging.getLogger("virtiofsd_py")


class StartupError(Exception):
    """A problem that prevents serving; the message is for the operator."""


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    #: Files we created and remove at exit (socket path, pid file).
    created: list[str]
    lock_fd: int | None = None

    def close(self) -> None:
        self.sock.close()
        for path in self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _lock_pid_file(path: str) -> int:
    """Take ``path`` (flock) and write our pid: one daemon per socket."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"{path} is locked: another daemon is serving this socket") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def open_listener(opts: Options) -> Listener:
    if opts.fd is not None:
        try:
            sock = socket.socket(fileno=opts.fd)
        except OSError as e:
            raise StartupError(f"--fd {opts.fd}: {e.strerror}") from None
        if sock.family != socket.AF_UNIX or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise StartupError(f"--fd {opts.fd} is not a listening unix socket")
        return Listener(sock, [])
    assert opts.socket_path is not None
    path = os.path.abspath(opts.socket_path)
    pid_path = path + ".pid"
    lock_fd = _lock_pid_file(pid_path)
    created = [pid_path]
    # Bound and set up under a temporary name, then renamed into place: the
    # socket path appears only once it accepts connections with its final mode.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            sock.bind(tmp)
        except OSError as e:
            raise StartupError(f"cannot bind {tmp}: {e.strerror}") from None
        if opts.socket_group is not None:
            try:
                gid = grp.getgrnam(opts.socket_group).gr_gid
            except KeyError:
                raise StartupError(f"--socket-group {opts.socket_group}: no such group") from None
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o660)
        sock.listen(1)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StartupError(f"{path} exists and is not a socket")
        os.rename(tmp, path)  # replaces a stale socket: its owner no longer holds the lock
    except BaseException:
        sock.close()
        for p in (tmp, pid_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        os.close(lock_fd)
        raise
    created.insert(0, path)
    return Listener(sock, created, lock_fd)


def rejected_state_dir(opts: Options) -> str:
    """Where a migration state that failed to load is kept: the runtime
    directory systemd gives us, else beside the socket, else the temp dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return runtime.split(":")[0]
    if opts.socket_path:
        return os.path.dirname(os.path.abspath(opts.socket_path))
    return tempfile.gettempdir()


def open_rejected_state_dir(opts: Options) -> tuple[str, int] | None:
    """``rejected_state_dir`` and an fd of it, opened while the host's tree is
    visible (the sandbox hides it later)."""
    try:
        path = rejected_state_dir(opts)
        return path, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("rejected migration states will not be kept: %s", e)
        return None


def raise_nofile_limit(wanted: int | None) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if target == soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError) as e:
        if wanted is not None:
            raise StartupError(f"--rlimit-nofile {wanted}: {e}") from None
        log.warning("could not raise RLIMIT_NOFILE to %d: %s", target, e)


def fuse_config(opts: Options, fs: PassthroughFS | MemoryFS) -> FuseConfig:
    """What FUSE_INIT offers, from the options (shared with ``mount.py``)."""
    return FuseConfig(
        readdirplus=opts.readdirplus and fs.policy.readdirplus,
        writeback=opts.writeback,
        killpriv_v2=opts.killpriv_v2,
        posix_acl=opts.posix_acl,
        security_label=opts.security_label,
        allow_mmap=opts.allow_mmap,
        submounts=opts.announce_submounts,
        posix_locks=opts.posix_locks,
        flock_locks=opts.flock_locks,
    )


def build_filesystem(opts: Options) -> PassthroughFS | MemoryFS:
    if opts.backend == "memory":
        return memory_fs_from_options(opts)
    assert opts.shared_dir is not None
    shared_dir, proc_self_fd = fs_paths(opts.shared_dir)  # moved by the sandbox
    try:
        return PassthroughFS(
            PassthroughConfig(
                shared_dir=shared_dir,
                proc_self_fd=proc_self_fd,
                cache=opts.cache,  # type: ignore[arg-type]
                readonly=opts.readonly,
                xattr=opts.xattr,
                allow_direct_io=opts.allow_direct_io,
                xattrmap=XattrMap(opts.xattrmap) if opts.xattrmap is not None else None,
                posix_acl=opts.posix_acl,
                killpriv_v2=opts.killpriv_v2,
                announce_submounts=opts.announce_submounts,
                preserve_noatime=opts.preserve_noatime,
                uid_map=IdMap(opts.translate_uid),
                gid_map=IdMap(opts.translate_gid),
                inode_file_handles=opts.inode_file_handles,  # type: ignore[arg-type]
            )
        )
    except OSError as e:
        raise StartupError(str(e)) from None


def state_provider(
    opts: Options,
    dispatcher: Dispatcher,
    fs: PassthroughFS | MemoryFS,
    state_dir: tuple[str, int] | None,
) -> StateProvider | None:
    """What migrates the session and the tables; None for a backend that cannot
    migrate (the memory one): the front-end is then offered no migration."""
    if not isinstance(fs, PassthroughFS):
        log.info("the %s backend cannot migrate: migration is not offered", opts.backend)
        return None
    config = MigrationConfig(
        mode=opts.migration_mode,  # type: ignore[arg-type]
        on_error=opts.migration_on_error,  # type: ignore[arg-type]
        verify_handles=opts.migration_verify_handles,
        confirm_paths=opts.migration_confirm_paths,
    )
    return StateProvider(
        dispatcher,
        PassthroughMigration(fs, config),
        opts.shared_dir or "",
        *(state_dir or (None, None)),
    )


def run(opts: Options) -> int:
    """Start-up that must come before the event loop and its threads, then serve.

    The socket is opened on the host; ``confine`` then enters the sandbox
    (for ``namespace`` this process becomes the supervising parent and the
    child serves), drops capabilities and installs the seccomp filter.
    """
    import uvloop

    raise_nofile_limit(opts.rlimit_nofile)
    drop_supplementary_groups()  # CVE-2022-0358: never act with the operator's groups
    service.prepare(opts)  # sockets the sandbox would not let us open later
    # Held pending until serve() has its handlers: a SIGTERM as soon as the
    # socket exists must stop us cleanly (and pid 1 of a namespace would drop it).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    listener = open_listener(opts)
    state_dir = open_rejected_state_dir(opts)  # reachable from inside the sandbox
    try:
        where = confine(opts, listener)
    except ConfinementError as e:
        listener.close()
        raise StartupError(str(e)) from None
    if isinstance(where, int):  # the supervising parent: the child has ended
        return exit_like(where)
    try:
        return uvloop.run(serve(opts, listener, state_dir))
    finally:
        # The loop and its handlers are gone: a SIGTERM now must not turn the
        # exit under way into death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        listener.close()


async def serve(
    opts: Options, listener: Listener | None = None, state_dir: tuple[str, int] | None = None
) -> int:
    loop = asyncio.get_running_loop()
    if listener is None:  # not through run(): no confinement
        state_dir = open_rejected_state_dir(opts)
        raise_nofile_limit(opts.rlimit_nofile)
        drop_supplementary_groups()  # CVE-2022-0358: never act with the operator's groups
    reserve_fd_table(FD_TABLE_AT_START)  # before any thread: then it costs nothing
    try:
        fs = build_filesystem(opts)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    if listener is None:
        listener = open_listener(opts)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hooks = ServiceHooks(opts, loop)
    try:
        await hooks.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # see run()
        log.info("waiting for a vhost-user front-end on %s", opts.socket_path or f"fd {opts.fd}")
        hooks.listening(opts.socket_path or f"fd {opts.fd}")
        accept = asyncio.ensure_future(loop.sock_accept(listener.sock))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({accept, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if accept not in done:
            accept.cancel()
            log.info("terminated before a front-end connected")
            return 0
        stopped.cancel()
        conn_sock, _ = accept.result()
        listener.sock.close()  # one front-end per daemon
        log.info("front-end connected")
        dispatcher = Dispatcher(fs, fuse_config(opts, fs))
        runner = QueueRunner(
            loop,
            hooks.instrument(dispatcher.handle),
            thread_pool_size=opts.thread_pool_size,
            may_block=dispatcher.may_block,
            interrupt=fs.interrupt_waits,
        )
        backend = VhostUserBackend(
            runner,
            BackendConfig(tag=opts.tag),
            on_reset=dispatcher.reset,
            state=state_provider(opts, dispatcher, fs, state_dir),
        )
        hooks.serving(lambda: backend.rings, fs)
        conn = VhostUserConnection(conn_sock, backend)
        serving = asyncio.ensure_future(conn.serve())
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if serving not in done:
            log.info("terminating on signal")
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving  # its cleanup stops the rings and unmaps memory
        stopped.cancel()
        runner.close()
        fs.destroy()
        return 0
    finally:
        await hooks.close()
        listener.close()
        fs.close()
