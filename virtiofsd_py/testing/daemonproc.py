"""Run a virtio-fs daemon process (ours or another) for guest tests and benchmarks.

The command is a template with ``{socket}`` and ``{shared_dir}``; by default
it runs this package's daemon. ``VIRTIOFSD_PY_TEST_DAEMON`` overrides it, so
the same guest tests run against e.g. the Rust virtiofsd as a differential
check.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

DEFAULT_TEMPLATE = (
    f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}} "
    "--shared-dir {shared_dir} --cache auto --sandbox none"
)


def daemon_template() -> str:
    """The daemon command template in force (env ``VIRTIOFSD_PY_TEST_DAEMON``)."""
    return os.environ.get("VIRTIOFSD_PY_TEST_DAEMON") or DEFAULT_TEMPLATE


def daemon_argv(template: str, socket: Path, shared_dir: Path) -> list[str]:
    """Split a command template and fill in its placeholders."""
    return [
        arg.format(socket=str(socket), shared_dir=str(shared_dir))
        for arg in shlex.split(template)
    ]


class DaemonError(Exception):
    """The daemon did not start; the message carries its log."""


class DaemonProcess:
    """A daemon serving ``shared_dir`` on the vhost-user socket ``socket``."""

    def __init__(
        self,
        shared_dir: Path,
        socket: Path,
        log: Path,
        template: str | None = None,
        timeout: float = 30,
        cwd: Path | None = None,
    ) -> None:
        self.socket = socket
        self.log = log
        self.argv = daemon_argv(template or daemon_template(), socket, shared_dir)
        socket.unlink(missing_ok=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, cwd=cwd
            )
        try:
            self._wait_for_socket(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self, timeout: float) -> None:
        # The socket appearing is the event; the pidfd wakes us if the daemon
        # dies first. Short select timeouts re-check the socket's existence.
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while not self.socket.exists():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonError(self._describe("did not create its socket in time"))
                ready, _, _ = select.select([pidfd], [], [], min(remaining, 0.02))
                if ready:
                    self.proc.wait()
                    raise DaemonError(self._describe(f"exited with {self.proc.returncode}"))
        finally:
            os.close(pidfd)

    def _describe(self, what: str) -> str:
        return f"daemon {shlex.join(self.argv)} {what}\n--- daemon log ---\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the daemon's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def stop(self, grace: float = 2) -> int:
        """Give the daemon ``grace`` seconds to exit by itself (it may, once
        QEMU has gone), then SIGTERM, then SIGKILL; return its exit status."""
        for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            if self.proc.poll() is not None:
                break
            if sig is not None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
