"""Start and stop a virtio-fs back-end daemon process for tests and benchmarks.

The command is a template with ``{socket}`` and ``{shared_dir}``; by default
it runs this project's daemon.  Setting ``VIRTIOFSD_PY_TEST_DAEMON`` (for
example to the Rust virtiofsd) runs the same tests against another daemon
as a differential check.  The daemon's stdout and stderr go to a log file,
for assertions and for printing when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ENV_DAEMON = "VIRTIOFSD_PY_TEST_DAEMON"

DEFAULT_COMMAND = (
    f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
    " --shared-dir {shared_dir} --sandbox none --log-level debug --xattr --tag testfs"
)


class DaemonError(Exception):
    """The daemon did not start, or did not stop as expected."""


def daemon_command_template() -> str:
    """The command template in force: ``$VIRTIOFSD_PY_TEST_DAEMON`` or our daemon."""
    return os.environ.get(ENV_DAEMON) or DEFAULT_COMMAND


def is_own_daemon() -> bool:
    """Whether the tests run against this project's daemon (not an override)."""
    return not os.environ.get(ENV_DAEMON)


class DaemonProcess:
    """One daemon process: started by :meth:`start`, stopped by :meth:`stop`.

    ``workdir`` holds the socket (``vhost.sock``) and the log (``daemon.log``).
    """

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        template: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.shared_dir = Path(shared_dir)
        self.workdir = Path(workdir)
        self.socket_path = self.workdir / "vhost.sock"
        self.log_path = self.workdir / "daemon.log"
        self.template = template or daemon_command_template()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        fields = {"socket": str(self.socket_path), "shared_dir": str(self.shared_dir)}
        return [word.format(**fields) for word in shlex.split(self.template)] + self.extra_args

    @property
    def pid(self) -> int:
        return self._proc().pid

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise DaemonError("daemon not started")
        return self.proc

    def start(self, timeout: float = 10.0) -> DaemonProcess:
        """Start the daemon and wait until its socket exists (it is then listening)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        env = dict(os.environ)
        # Our daemon must be importable from the checkout, wherever pytest runs.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None:
                raise DaemonError(
                    f"daemon exited with status {self.proc.returncode} before listening:\n"
                    f"{self.log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(f"daemon socket did not appear within {timeout}s:\n{self.log()}")
            time.sleep(0.01)
        return self

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def returncode(self) -> int | None:
        """Exit status once the daemon has exited (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 5.0) -> int | None:
        """Wait for the daemon to exit by itself; its exit status, or None on timeout."""
        try:
            return self._proc().wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then wait; the exit status, or None if it did not exit in time."""
        proc = self._proc()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL the daemon's process group (it runs in its own session)."""
        proc = self._proc()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()

    def stop(self, timeout: float = 5.0) -> int:
        """Wait for a clean exit (after a disconnect), else SIGTERM, else SIGKILL.

        Returns the exit status; a negative status means a signal ended it.
        """
        status = self.wait(timeout)
        if status is None:
            status = self.terminate(timeout)
        if status is None:
            status = self.kill()
        return status

    def fd_count(self) -> int:
        """How many fds the daemon holds open (``/proc/PID/fd``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_targets(self) -> list[str]:
        """What each open fd of the daemon points at (for leak diagnostics)."""
        out = []
        base = f"/proc/{self.pid}/fd"
        for name in sorted(os.listdir(base), key=int):
            with contextlib.suppress(OSError):
                out.append(f"{name} -> {os.readlink(os.path.join(base, name))}")
        return out
