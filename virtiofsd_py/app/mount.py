"""Host mount mode: serve a backend through the host kernel's FUSE (/dev/fuse).

``virtiofsd-py mount [SHARED_DIR] MOUNTPOINT [options]`` builds the same
``Filesystem`` (same options, same ``PassthroughConfig``, same confinement)
and the same ``Dispatcher`` as the vhost-user daemon, and feeds it the FUSE
requests of the host kernel instead of a guest's: so a share can be tried
and debugged with ``ls``, ``strace`` and ``gdb`` on the host, without a VM.

Why not pyfuse3: it builds here, but its ``Operations`` API is a second,
parallel FUSE implementation (libfuse's lowlevel codec, trio, its own
``EntryAttributes``, inode and handle conventions).  An adapter onto our
``Filesystem`` would translate every call twice and test a path the guest
never takes.  /dev/fuse speaks exactly the FUSE protocol virtio-fs carries
(Documentation/filesystems/fuse.rst; virtio-fs only changes the transport),
so each request read from the device goes through ``Dispatcher.handle``,
the very code a guest's requests go through, and its reply is written back
with one ``write``.  The only new parts are the mount itself (mount(2) with
``fd=N,rootmode=...,user_id=...,group_id=...``, as root; ``fusermount3``
otherwise) and a few reader threads.

An async backend (coroutine methods) is served the daemon's way
(:class:`AsyncFuseMount`): an event loop thread runs each request in a
greenlet through ``fuse/asyncbridge.py``, so many are in flight and a
FUSE_INTERRUPT from the kernel reaches the coroutine it names; the reader
thread hands it requests in buffers of their own and the replies are
written as their coroutines finish.

Confinement: no sandbox (the mount must be made, and stay, in the host's
mount namespace, and the share is the host's tree anyway), but the same
seccomp filter as the daemon (``--seccomp``), installed once the mount
exists and before the reader threads start, plus :data:`MOUNT_SYSCALLS`.
Unmounting through ``fusermount3`` would need execve, so that helper is
started before the filter and waits on a pipe (:meth:`FuseMount.prepare_unmount`);
should the daemon die, the pipe closes and the helper unmounts all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Sequence
from typing import Final

from virtiofsd_py.app.errors import StartupError, describe
from virtiofsd_py.app.options import Options
from virtiofsd_py.app.startup import start_mount
from virtiofsd_py.confine.process import ConfinementError, install_seccomp
from virtiofsd_py.fs.awaiting import AwaitingFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.asyncbridge import AsyncRequests
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.host import syscalls

log = logging.getLogger("virtiofsd_py.app.mount")

#: Room above max_write in a read buffer: the kernel refuses reads into a
#: buffer smaller than fuse_in_header + fuse_write_in + max_write.
_READ_SLACK: Final = 64 * 1024
FSTYPE: Final = "fuse.virtiofsd-py"
_MS_NOSUID: Final = 2
_MS_NODEV: Final = 4
#: Calls the host mount mode makes beyond the daemon's allow-list: umount2
#: (root's unmount), wait4 (reaping the fusermount3 helper).
MOUNT_SYSCALLS: Final = frozenset({"umount2", "wait4"})
#: Errors of read(2) on /dev/fuse that just mean "try again": ENOENT is a
#: request interrupted before we read it (fuse_dev_do_read).
_RETRY: Final = frozenset({errno.EINTR, errno.EAGAIN, errno.ENOENT})
#: Replies of an async backend get buffers of the size they may need: the
#: requests that say how much (fuse_read_in.size, after the in header) and
#: the rest, whose largest replies are xattr values (XATTR_SIZE_MAX, 64 KiB).
_SIZED: Final = frozenset({abi.FUSE_READ, abi.FUSE_READDIR, abi.FUSE_READDIRPLUS})
_READ_SIZE_AT: Final = abi.IN_HEADER.size + 16
_OUT_HEADER: Final = abi.OUT_HEADER.size
_SMALL_REPLY: Final = _OUT_HEADER + (64 << 10) + 4096


class MountError(Exception):
    """The mount could not be set up; the message is for the operator."""


def mount_options(fd: int, rootmode: int, uid: int, gid: int, extra: Sequence[str] = ()) -> str:
    """The data string of mount(2) for a FUSE mount (fs/fuse/inode.c fuse_parse_param).

    ``default_permissions``: the kernel checks modes, as a virtio-fs guest
    does; ``allow_other``: every user of the host may use the mount (the
    backend acts with each caller's credentials).
    """
    opts = [
        f"fd={fd}",
        f"rootmode={stat.S_IFMT(rootmode):o}",
        f"user_id={uid}",
        f"group_id={gid}",
        "default_permissions",
        "allow_other",
        *extra,
    ]
    return ",".join(opts)


def _fusermount_open(mountpoint: str, options: str) -> int:
    """Mount through the set-uid ``fusermount3`` (no CAP_SYS_ADMIN needed).

    It opens /dev/fuse, mounts, and passes the fd back over the socket named
    by ``_FUSE_COMMFD`` (SCM_RIGHTS), as libfuse's fuse_mount_fusermount does.
    """
    tool = shutil.which("fusermount3")
    if tool is None:
        raise MountError("not root and no fusermount3: cannot mount")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        res = subprocess.run(
            [tool, "-o", options, "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise MountError(f"fusermount3 failed: {res.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise MountError("fusermount3 passed no file descriptor")
    return fds[0]


class FuseMount:
    """One FUSE mount served by reader threads that call ``dispatcher.handle``.

    Each thread owns its buffers: it reads one request (the kernel hands out
    whole requests), dispatches it and writes the reply.  Serving ends when
    the device says ENODEV: the file system was unmounted (by ``unmount``
    or by anyone with ``umount``) or the connection was aborted.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        mountpoint: str,
        *,
        fsname: str = "virtiofsd-py",
        threads: int = 4,
    ) -> None:
        self.dispatcher = dispatcher
        self.mountpoint = os.path.abspath(mountpoint)
        self.fsname = fsname
        self.threads = max(1, threads)
        self.fd = -1
        self._via_fusermount = False
        self._workers: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._dev: int | None = None
        self._unmounter: subprocess.Popen[bytes] | None = None
        cfg = dispatcher.config
        self._bufsize = max(cfg.max_write, cfg.max_read) + _READ_SLACK

    # -- setting up ---------------------------------------------------------
    def mount(self) -> None:
        """Mount the file system on ``mountpoint`` (root: mount(2); else fusermount3)."""
        try:
            rootmode = os.stat(self.mountpoint).st_mode
        except OSError as e:
            raise MountError(f"mount point {self.mountpoint}: {e.strerror}") from None
        if not stat.S_ISDIR(rootmode):
            raise MountError(f"mount point {self.mountpoint} is not a directory")
        if os.geteuid() != 0:
            opts = f"fsname={self.fsname},subtype=virtiofsd-py,default_permissions"
            self.fd = _fusermount_open(self.mountpoint, opts)
            self._via_fusermount = True
            return
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"/dev/fuse: {e.strerror}") from None
        data = mount_options(fd, stat.S_IFDIR, os.getuid(), os.getgid())
        try:
            syscalls.mount(self.fsname, self.mountpoint, FSTYPE, _MS_NOSUID | _MS_NODEV, data)
        except OSError as e:
            os.close(fd)
            raise MountError(f"mount {self.mountpoint}: {e.strerror}") from None
        self.fd = fd

    def prepare_unmount(self) -> None:
        """Start now what ``unmount`` needs to run a program (before seccomp forbids execve)."""
        if self._via_fusermount and self._unmounter is None:
            tool = shutil.which("fusermount3") or "fusermount3"
            self._unmounter = subprocess.Popen(
                ["sh", "-c", 'read -r _; exec "$0" -u -z -- "$1"', tool, self.mountpoint],
                stdin=subprocess.PIPE,
            )

    def start(self) -> None:
        """Start the reader threads; the kernel's INIT is the first request they serve."""
        for i in range(self.threads):
            t = threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def wait_ready(self) -> None:
        """Block until the kernel's INIT was answered (a stat of the root needs it)."""
        self._dev = os.stat(self.mountpoint).st_dev

    # -- serving --------------------------------------------------------------
    def _serve(self) -> None:
        inbuf = bytearray(self._bufsize)
        outbuf = bytearray(self._bufsize)
        inview, outview = memoryview(inbuf), memoryview(outbuf)
        handle = self.dispatcher.handle
        fd = self.fd
        try:
            while True:
                try:
                    n = os.readv(fd, [inbuf])
                except OSError as e:
                    if e.errno in _RETRY:
                        continue
                    if e.errno == errno.ENODEV:
                        return  # unmounted or aborted
                    raise
                if n == 0:
                    return
                used = handle([inview[:n]], [outview])
                if used == 0:
                    continue  # FORGET, BATCH_FORGET, INTERRUPT: no reply
                try:
                    os.write(fd, outview[:used])
                except OSError as e:
                    # ENOENT: the request was interrupted meanwhile; ENODEV: gone.
                    if e.errno not in (errno.ENOENT, errno.ENODEV):
                        raise
        except BaseException as e:  # reported through errors
            log.exception("FUSE reader thread failed")
            self._errors.append(e)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every reader thread ended; whether they all did."""
        for t in self._workers:
            t.join(timeout)
        return not any(t.is_alive() for t in self._workers)

    @property
    def errors(self) -> list[BaseException]:
        return list(self._errors)

    # -- tearing down -----------------------------------------------------------
    def unmount(self) -> None:
        """Unmount (lazily if busy); the readers then see ENODEV and end."""
        if self._via_fusermount:
            if self._unmounter is not None:
                assert self._unmounter.stdin is not None
                self._unmounter.stdin.close()  # end of input: it runs fusermount3 -u
                self._unmounter.wait()
                self._unmounter = None
                return
            tool = shutil.which("fusermount3") or "fusermount3"
            subprocess.run([tool, "-u", "-z", "--", self.mountpoint], check=False)
            return
        try:
            syscalls.umount2(self.mountpoint, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                syscalls.umount2(self.mountpoint, syscalls.MNT_DETACH)
            elif e.errno not in (errno.EINVAL, errno.ENOENT):
                raise

    def abort(self) -> None:
        """Abort the connection (fusectl): pending and future requests fail with ENOTCONN."""
        if self._dev is None:
            return
        with contextlib.suppress(OSError):
            path = f"/sys/fs/fuse/connections/{os.minor(self._dev)}/abort"
            with open(path, "w") as f:
                f.write("1")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AsyncFuseMount(FuseMount):
    """A mount of an async backend: one reader thread, requests run on ``loop``.

    ``loop`` is run by the caller in the main thread (a file system may hold
    objects bound to the thread that made it, as sqlite3 connections are).
    Each request is read into a buffer of its own (it may complete after
    later ones) and submitted to an ``AsyncRequests`` on the loop; its reply
    is written when it completes (writes to /dev/fuse do not block).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        mountpoint: str,
        loop: asyncio.AbstractEventLoop,
        *,
        fsname: str = "virtiofsd-py",
    ) -> None:
        super().__init__(dispatcher, mountpoint, fsname=fsname, threads=1)
        self.loop = loop
        self._bridge = AsyncRequests(loop, dispatcher.handle)

    def _serve(self) -> None:
        fd = self.fd
        inbuf = bytearray(self._bufsize)
        inview = memoryview(inbuf)
        try:
            while True:
                try:
                    n = os.readv(fd, [inbuf])
                except OSError as e:
                    if e.errno in _RETRY:
                        continue
                    if e.errno == errno.ENODEV:
                        return
                    raise
                if n == 0:
                    return
                # A copy of its own: the request may complete after later ones.
                self.loop.call_soon_threadsafe(self._submit, bytearray(inview[:n]))
        except BaseException as e:
            log.exception("FUSE reader thread failed")
            self._errors.append(e)

    def _reply_room(self, request: bytearray) -> int:
        """Bytes the reply to ``request`` may need: READ/READDIR(PLUS) say, others are small."""
        if len(request) >= _READ_SIZE_AT + 4:
            opcode = int.from_bytes(request[4:8], "little")
            if opcode in _SIZED:
                size = int.from_bytes(request[_READ_SIZE_AT : _READ_SIZE_AT + 4], "little")
                return min(self._bufsize, _OUT_HEADER + size)
        return min(self._bufsize, _SMALL_REPLY)

    def _submit(self, request: bytearray) -> None:
        out = memoryview(bytearray(self._reply_room(request)))
        used = self._bridge.submit([memoryview(request)], [out], lambda n: self._reply(out, n))
        if used is not None:
            self._reply(out, used)

    def _reply(self, out: memoryview, used: int) -> None:
        if used == 0 or self.fd < 0:
            return  # FORGET, BATCH_FORGET, INTERRUPT: no reply
        try:
            os.write(self.fd, out[:used])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("FUSE reply not written: %s", e)


def _serve_threads(fm: FuseMount, source: str) -> None:
    """Serve until unmounted or SIGTERM/SIGINT: reader threads call the dispatcher."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fm.start()
    fm.wait_ready()
    print(f"virtiofsd-py: serving {source} on {fm.mountpoint}", flush=True)

    def watch() -> None:  # unmounted from outside: stop too
        fm.wait()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    stop.wait()
    _unmount(fm)


def _unmount(fm: FuseMount) -> None:
    fm.unmount()
    if not fm.wait(timeout=5.0):
        log.warning("mount still busy after a lazy unmount: aborting the connection")
        fm.abort()
        fm.wait(timeout=5.0)


async def _serve_loop(fm: AsyncFuseMount, source: str) -> None:
    """The same for an async backend, its requests on this (the main) thread's loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fm.start()
    await loop.run_in_executor(None, fm.wait_ready)  # its INIT is served by this loop
    print(f"virtiofsd-py: serving {source} on {fm.mountpoint}", flush=True)

    def watch() -> None:
        fm.wait()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, daemon=True).start()
    await stop.wait()
    await loop.run_in_executor(None, _unmount, fm)


def run(opts: Options) -> int:
    """``virtiofsd-py mount``: mount, serve until unmounted or signalled, clean up.

    Raises ``StartupError`` when the mount cannot be set up.
    """
    assert opts.mountpoint is not None
    backend = start_mount(opts)
    fs = AwaitingFS(backend.fs) if backend.asynchronous else backend.fs
    source = (opts.shared_dir if opts.backend == "passthrough" else opts.backend) or "virtiofsd-py"
    dispatcher = Dispatcher(fs, backend.fuse)
    loop = asyncio.new_event_loop() if backend.asynchronous else None
    fm: FuseMount
    if loop is not None:
        fm = AsyncFuseMount(dispatcher, opts.mountpoint, loop, fsname=source)
    else:
        fm = FuseMount(
            dispatcher, opts.mountpoint, fsname=source, threads=opts.thread_pool_size or 4
        )
    try:
        fm.mount()
    except MountError as e:
        backend.close()
        raise StartupError(str(e)) from None
    try:
        fm.prepare_unmount()
        install_seccomp(opts.seccomp, MOUNT_SYSCALLS)
    except (OSError, ConfinementError) as e:
        fm.unmount()
        fm.close()
        backend.close()
        raise StartupError(describe(e) if isinstance(e, OSError) else str(e)) from None
    try:
        if isinstance(fm, AsyncFuseMount):
            fm.loop.run_until_complete(_serve_loop(fm, source))
        else:
            _serve_threads(fm, source)
    finally:
        fm.close()
        fs.destroy()
        backend.close()
        if loop is not None:
            loop.close()
    return 1 if fm.errors else 0
