"""Boot and drive a real Linux guest under QEMU with vhost-user-fs devices.

Used by tests/guest and by benchmarks. A guest gets:

- guest RAM as ``memory-backend-memfd,share=on`` (vhost-user needs shared
  memory; so does migration of a vhost-user-fs device),
- one ``vhost-user-fs-pci`` per (tag, socket) pair,
- the kernel console on ttyS0, written to ``console.log`` (shown when boot
  fails),
- a virtio-serial port used only for commands: the initramfs's init serves
  it (see ``initramfs.py``), so command output is never mixed with kernel
  messages,
- a QMP socket (:class:`QMP`, QEMU's own ``qemu.qmp`` client), for
  migration tests.

QEMU connects to sockets this process listens on (chardev ``server=off``),
so there is no race with socket creation. Every wait selects on the socket
and a pidfd of QEMU with a deadline: a guest that panics (``panic=-1`` plus
``-no-reboot`` makes QEMU exit) or a QEMU that fails fails fast, with the
console log in the exception.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import Message, QMPClient, QMPError, Runstate

from virtiofsd_py.testing.qemu.image import load_image, qemu_binary, unavailable_reason
from virtiofsd_py.testing.qemu.initramfs import CONTROL_PORT, READY_MARK

__all__ = ["QMP", "CmdResult", "Guest", "GuestError", "accel_args", "unavailable_reason"]

_T = TypeVar("_T")

KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 oops=panic reboot=t tsc=reliable no_timer_check "
    "i8042.noaux i8042.nokbd i8042.nopnp rcupdate.rcu_expedited=1 mitigations=off"
)


class GuestError(Exception):
    """The guest or QEMU failed; the message includes the console tail."""


@dataclass(frozen=True)
class CmdResult:
    """Exit status and raw output of a guest shell command."""

    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        """stdout as text (non-UTF-8 bytes kept as surrogate escapes)."""
        return self.stdout.decode("utf-8", "surrogateescape")

    @property
    def err(self) -> str:
        """stderr as text."""
        return self.stderr.decode("utf-8", "surrogateescape")

    def check(self) -> CmdResult:
        """Return self, or raise GuestError if the command failed."""
        if self.rc != 0:
            raise GuestError(f"guest command failed with rc={self.rc}: {self.err.strip()}")
        return self


def kvm_usable() -> bool:
    """Whether /dev/kvm is a real KVM a stock kernel can boot under.

    The PVM flavour of KVM (``/sys/module/kvm_pvm``) only runs PVM-enabled
    guest kernels, so it counts as no KVM.
    """
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not Path("/sys/module/kvm_pvm").exists()


def accel_args() -> list[str]:
    """Accelerator and CPU arguments (env ``VIRTIOFSD_PY_GUEST_ACCEL`` = kvm|tcg)."""
    forced = os.environ.get("VIRTIOFSD_PY_GUEST_ACCEL")
    if forced == "kvm" or (forced is None and kvm_usable()):
        return ["-accel", "kvm", "-cpu", "host"]
    # Without erms/fsrm the guest's memcpy avoids "rep movsb", which TCG
    # emulates byte by byte: copies run about 3x faster.
    return ["-accel", "tcg,thread=multi", "-cpu", "max,-erms,-fsrm"]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(none)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class QMP:
    """QEMU's QMP client (``qemu.qmp.QMPClient``, qmp-spec.rst) for synchronous callers.

    Each call drives the client on a loop of its own (``asyncio.Runner``) until
    its result is in, so nothing depends on the caller's thread having an event
    loop, or on which one.  The client queues events as they are read;
    ``wait_event`` keeps those of other names for later waits.

    Errors: ``qemu.qmp.ExecuteError`` (a QMPError) when QEMU answers a command
    with an error (``error_class``, the message is its ``desc``); other
    QMPErrors for protocol and connection state (a command cut off by a
    hang-up is ``ExecInterruptedError``); ``ConnectionError`` when QEMU hangs
    up during ``wait_event``; ``TimeoutError``.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        """Take over ``sock``: read the greeting and negotiate capabilities."""
        self._runner = asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)
        self._client = QMPClient("guest")
        self._kept: list[dict[str, Any]] = []
        self._closed = False
        try:
            self._run(self._client.connect(sock), timeout, "greeting")
        except BaseException:
            self._runner.close()
            raise

    def _run(self, step: Awaitable[_T], timeout: float, what: str) -> _T:
        try:
            return self._runner.run(asyncio.wait_for(step, timeout))
        except TimeoutError:
            raise TimeoutError(f"QMP: no {what} within {timeout:g} s") from None

    def execute(self, command: str, timeout: float = 60, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value."""
        return self._run(
            self._client.execute(command, arguments or None), timeout, f"answer to {command}"
        )

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """Remove and return the first received or arriving event ``name``."""
        for i, event in enumerate(self._kept):
            if event["event"] == name:
                return self._kept.pop(i)
        return self._run(self._next_event(name), timeout, f"{name} event")

    def clear_events(self) -> None:
        """Forget the events received so far."""
        self._kept.clear()
        self._client.events.clear()

    async def _next_event(self, name: str) -> dict[str, Any]:
        while True:
            event = dict(await self._event())
            if event["event"] == name:
                return event
            self._kept.append(event)

    async def _event(self) -> Message:
        """The next event; ConnectionError once the connection is down, not a wait."""
        get = asyncio.ensure_future(self._client.events.get())
        try:
            while not get.done():
                if self._client.runstate is not Runstate.RUNNING:
                    raise ConnectionError("QMP connection closed")
                changed = asyncio.ensure_future(self._client.runstate_changed())
                try:
                    await asyncio.wait((get, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
            return get.result()
        finally:
            get.cancel()

    def close(self) -> None:
        """Hang up and release the loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            # Re-raises whatever ended a connection that failed: of no use here.
            self._run(self._client.disconnect(), 5, "hang-up")
        self._runner.close()


class Guest:
    """A running QEMU guest; create with ``Guest.boot``."""

    def __init__(self, workdir: Path, proc: subprocess.Popen[bytes], keep: bool) -> None:
        self.workdir = workdir
        self.proc = proc
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self._keep = keep
        self._pidfd = os.pidfd_open(proc.pid)
        self._ctl: socket.socket | None = None
        self._buf = b""
        self._qmp: QMP | None = None
        self.release = ""

    # -- construction ------------------------------------------------------

    @classmethod
    def boot(
        cls,
        *,
        vhost_sockets: dict[str, str],
        mem_mib: int = 512,
        num_request_queues: int = 1,
        queue_size: int = 1024,
        qmp: bool = True,
        incoming: str | None = None,
        extra_args: Sequence[str] = (),
        smp: int = 2,
        kernel_args: str = "",
        timeout: float | None = None,
    ) -> Guest:
        """Start QEMU and, unless ``incoming`` is set, wait for the guest's shell.

        With ``incoming`` (e.g. ``"defer"``) the guest only runs after a
        migration into it; commands work once it has completed. ``kernel_args``
        are appended to the kernel command line.
        """
        image = load_image()
        if timeout is None:
            timeout = float(os.environ.get("VIRTIOFSD_PY_GUEST_BOOT_TIMEOUT", "180"))
        workdir = Path(tempfile.mkdtemp(prefix="vfg-"))
        listeners = {"ctl": cls._listen(workdir / "ctl.sock")}
        if qmp:
            listeners["qmp"] = cls._listen(workdir / "qmp.sock")
        argv = [
            qemu_binary(),
            *accel_args(),
            "-machine", "q35",
            "-smp", str(smp),
            "-m", f"{mem_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
            "-numa", "node,memdev=mem",
            "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initramfs),
            "-append", f"{KERNEL_CMDLINE} {kernel_args}".strip(),
            "-chardev", f"file,id=con,path={workdir / 'console.log'}",
            "-serial", "chardev:con",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=ctl,path={workdir / 'ctl.sock'}",
            "-device", f"virtserialport,bus=vser.0,chardev=ctl,name={CONTROL_PORT}",
        ]  # fmt: skip
        for i, (tag, path) in enumerate(vhost_sockets.items()):
            dev = f"vhost-user-fs-pci,chardev=vfs{i},tag={tag},queue-size={queue_size}"
            if num_request_queues != 1:
                dev += f",num-request-queues={num_request_queues}"
            argv += ["-chardev", f"socket,id=vfs{i},path={path}", "-device", dev]
        if qmp:
            argv += ["-chardev", f"socket,id=qmp,path={workdir / 'qmp.sock'}"]
            argv += ["-mon", "chardev=qmp,mode=control"]
        if incoming is not None:
            argv += ["-incoming", incoming]
        argv += list(extra_args)
        (workdir / "cmdline").write_text(" ".join(argv) + "\n")
        keep = os.environ.get("VIRTIOFSD_PY_GUEST_KEEP") == "1"
        with open(workdir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        guest = cls(workdir, proc, keep)
        try:
            deadline = time.monotonic() + timeout
            guest._ctl = guest._accept(listeners["ctl"], deadline)
            if qmp:
                conn = guest._accept(listeners["qmp"], deadline)
                try:
                    guest._qmp = QMP(conn, timeout=max(1.0, deadline - time.monotonic()))
                except (QMPError, OSError) as e:
                    conn.close()
                    raise guest._failure(f"QMP handshake failed: {e}", exiting=True) from e
            if incoming is None:
                guest.release = guest._wait_ready(deadline)
        except BaseException:
            guest.kill()
            raise
        finally:
            for lst in listeners.values():
                lst.close()
        return guest

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(1)
        return sock

    def _failure(self, what: str, exiting: bool = False) -> GuestError:
        if exiting:
            # A closed channel usually means QEMU is on its way out: let it
            # finish, so that its status and last words are in the report.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        status = self.proc.poll()
        state = "running" if status is None else f"exited with status {status}"
        try:
            console = self.console_log.read_text(errors="replace")
        except OSError:
            console = ""
        panic = [line for line in console.splitlines() if "Kernel panic" in line]
        return GuestError(
            f"{what} (QEMU {state}; VIRTIOFSD_PY_GUEST_KEEP=1 keeps {self.workdir})\n"
            + "".join(f"{line}\n" for line in panic)
            + f"--- QEMU output ---\n{_tail(self.qemu_log, 20)}\n"
            f"--- guest console (last lines) ---\n{_tail(self.console_log)}"
        )

    def _wait_readable(self, sock: socket.socket, deadline: float, what: str) -> None:
        """Block until ``sock`` is readable; raise if QEMU exits or time runs out."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(f"timed out waiting for {what}")
            ready, _, _ = select.select([sock.fileno(), self._pidfd], [], [], remaining)
            if sock.fileno() in ready:
                return
            if self._pidfd in ready:
                self.proc.wait()
                raise self._failure(f"QEMU exited while waiting for {what}")

    def _accept(self, listener: socket.socket, deadline: float) -> socket.socket:
        self._wait_readable(listener, deadline, "QEMU to connect")
        conn, _ = listener.accept()
        return conn

    def _readline(self, deadline: float, what: str) -> bytes:
        assert self._ctl is not None
        while b"\n" not in self._buf:
            self._wait_readable(self._ctl, deadline, what)
            chunk = self._ctl.recv(1 << 16)
            if not chunk:
                raise self._failure(
                    f"control channel closed while waiting for {what}", exiting=True
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _wait_ready(self, deadline: float) -> str:
        mark = READY_MARK.encode()
        while True:
            line = self._readline(deadline, "the guest to boot")
            if line.startswith(mark):
                return line[len(mark) :].strip().decode()

    # -- use ---------------------------------------------------------------

    def run(self, cmd: str | bytes, timeout: float = 60) -> CmdResult:
        """Run ``cmd`` with ``sh`` in the guest; return its status and output."""
        if self._ctl is None:
            raise GuestError("guest has no control channel")
        script = cmd.encode("utf-8", "surrogateescape") if isinstance(cmd, str) else cmd
        token = secrets.token_hex(8).encode()
        self._ctl.sendall(token + b" " + base64.b64encode(script) + b"\n")
        deadline = time.monotonic() + timeout
        sections: dict[bytes, list[bytes]] = {}
        current: list[bytes] | None = None
        what = f"guest command {script[:60]!r}"
        while True:
            line = self._readline(deadline, what)
            head, _, rest = line.partition(b" ")
            if head == token:
                if rest.startswith(b"END "):
                    return CmdResult(
                        rc=int(rest[4:]),
                        stdout=base64.b64decode(b"".join(sections.get(b"OUT", []))),
                        stderr=base64.b64decode(b"".join(sections.get(b"ERR", []))),
                    )
                current = sections.setdefault(rest, [])
            elif current is not None and b" " not in line:
                current.append(line)
            # Anything else is left over from an earlier, timed-out command.

    def qmp(self, command: str, **args: Any) -> Any:
        """Execute a QMP command; return its result."""
        if self._qmp is None:
            raise GuestError("guest was booted without QMP")
        return self._qmp.execute(command, **args)

    @property
    def qmp_client(self) -> QMP:
        """The QMP client, for events (``wait_event``)."""
        if self._qmp is None:
            raise GuestError("guest was booted without QMP")
        return self._qmp

    # -- teardown ----------------------------------------------------------

    def shutdown(self, timeout: float = 30) -> None:
        """Power the guest off cleanly; quit or kill QEMU if that does not work."""
        if self.proc.poll() is None:
            running = True
            if self._qmp is not None:
                try:
                    running = bool(self._qmp.execute("query-status", timeout=5)["running"])
                except (QMPError, OSError):
                    running = False
            try:
                if running and self._ctl is not None:
                    self._ctl.sendall(b"poweroff " + base64.b64encode(b"sync; poweroff -f") + b"\n")
                elif self._qmp is not None:
                    self._qmp.execute("quit", timeout=5)
            except (QMPError, OSError):
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """Stop QEMU at once and release everything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        for closeable in (self._ctl, self._qmp):
            if closeable is not None:
                closeable.close()
        self._ctl = self._qmp = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
