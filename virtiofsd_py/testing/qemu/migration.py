"""Live-migrate a real guest between two QEMUs, each with its own virtio-fs daemon.

A :class:`MigrationPair` keeps one running *source* (a daemon and a booted
QEMU on the shared directory) and, on demand, a *destination*: a second
daemon on the same directory and a QEMU started with ``-incoming defer``
with the same device configuration (same memory size, queues, tag), guest RAM
in ``memory-backend-memfd,share=on`` on both (QEMU refuses to migrate a
vhost-user-fs device otherwise).

:meth:`MigrationPair.migrate` moves the guest over a unix socket and waits
for the real outcome: MIGRATION events on both sides, then ``query-status``
of the destination. Both QEMUs get the ``return-path`` capability: without
it a source whose destination fails to load the back-end state still reports
"completed" and quits, and the guest is lost; with it the source sees the
failure and resumes the guest. On success the old source is retired (QEMU
quit, its daemon expected to exit by itself) and the destination becomes the
source, so calling ``migrate`` again migrates back. On failure the source
keeps running, the destination is torn down, and :class:`MigrationError`
carries both QEMUs' errors and both daemons' logs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.qemu.guest import Guest, GuestError

__all__ = ["MigrationError", "MigrationPair", "MigrationResult", "RetiredSide", "Side"]

#: QMP migration capabilities turned on at both ends (see the module docstring;
#: ``events`` makes QEMU emit MIGRATION status events to wait on).
CAPABILITIES = ("return-path", "events")
#: Final states of a migration (qapi/migration.json, MigrationStatus).
_FINAL = ("completed", "failed", "cancelled")
#: Daemon log lines that mean a crash rather than an orderly exit.
TRACEBACK = "Traceback (most recent call last)"


class MigrationError(Exception):
    """A migration failed or timed out; the message is a full report.

    ``source_running`` says whether the guest was running on the source
    afterwards (a failed migration must leave it running).
    """

    def __init__(self, message: str, *, status: str, source_running: bool) -> None:
        super().__init__(message)
        self.status = status
        self.source_running = source_running


@dataclass
class Side:
    """One end: a daemon and the QEMU connected to it."""

    label: str
    workdir: Path
    daemon: DaemonProcess
    guest: Guest

    @property
    def migration_socket(self) -> Path:
        """Where this side listens as a destination."""
        return self.workdir / "mig.sock"

    def log_report(self, what: str) -> str:
        """This side's QEMU output and daemon log, for failure reports."""
        return (
            f"--- {what} {self.label}: QEMU output ---\n{_read_tail(self.guest.qemu_log)}\n"
            f"--- {what} {self.label}: daemon log ---\n{_tail_text(self.daemon.log())}"
        )


@dataclass(frozen=True)
class RetiredSide:
    """A source that handed the guest over: how its daemon ended."""

    label: str
    daemon_status: int
    daemon_log: str

    def problems(self) -> list[str]:
        """What went wrong at the end of this side (empty if it ended cleanly)."""
        out = []
        if self.daemon_status != 0:
            out.append(f"daemon {self.label} exited with status {self.daemon_status}")
        if TRACEBACK in self.daemon_log:
            out.append(f"daemon {self.label} logged a Python traceback")
        return out


@dataclass(frozen=True)
class MigrationResult:
    """A completed migration as the source saw it (``query-migrate``)."""

    source: str
    destination: str
    total_time_ms: int
    downtime_ms: int
    info: dict[str, Any] = field(repr=False)


def _tail_text(text: str, chars: int = 6000) -> str:
    text = text.strip()
    if not text:
        return "(empty)"
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _read_tail(path: Path) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"))
    except OSError:
        return "(none)"


class MigrationPair:
    """A guest that can be live-migrated back and forth; see the module docstring.

    ``daemon_args`` go to every daemon; ``prepare_destination`` can override
    them (and the shared directory) for one destination, to make it fail.
    """

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        tag: str = "share",
        mem_mib: int = 512,
        num_request_queues: int = 1,
        queue_size: int = 1024,
        daemon_args: Sequence[str] = (),
        daemon_template: str | None = None,
        extra_qemu_args: Sequence[str] = (),
        kernel_args: str = "",
    ) -> None:
        self.shared_dir = Path(shared_dir)
        self.workdir = Path(workdir)
        self.tag = tag
        self.mem_mib = mem_mib
        self.num_request_queues = num_request_queues
        self.queue_size = queue_size
        self.daemon_args = list(daemon_args)
        self.daemon_template = daemon_template
        self.extra_qemu_args = list(extra_qemu_args)
        self.kernel_args = kernel_args
        self._source: Side | None = None
        self.destination: Side | None = None
        self.retired: list[RetiredSide] = []
        self.results: list[MigrationResult] = []
        self._generation = 0

    # -- sides -------------------------------------------------------------

    @property
    def source(self) -> Side:
        """The side the guest runs on now."""
        if self._source is None:
            raise RuntimeError("MigrationPair not started")
        return self._source

    @property
    def guest(self) -> Guest:
        """The running guest (on the current source)."""
        return self.source.guest

    def _next_label(self) -> str:
        if self._source is None:
            return "A"
        return "B" if self._source.label == "A" else "A"

    def _start_side(
        self,
        *,
        incoming: bool,
        shared_dir: Path | None = None,
        daemon_args: Sequence[str] | None = None,
    ) -> Side:
        label = self._next_label()
        self._generation += 1
        workdir = self.workdir / f"{self._generation:02d}-{label}"
        workdir.mkdir(parents=True)
        daemon = DaemonProcess(
            shared_dir or self.shared_dir,
            workdir,
            template=self.daemon_template,
            extra_args=self.daemon_args if daemon_args is None else daemon_args,
        ).start(timeout=30)
        try:
            guest = Guest.boot(
                vhost_sockets={self.tag: str(daemon.socket_path)},
                mem_mib=self.mem_mib,
                num_request_queues=self.num_request_queues,
                queue_size=self.queue_size,
                qmp=True,
                incoming="defer" if incoming else None,
                extra_args=self.extra_qemu_args,
                kernel_args=self.kernel_args,
            )
        except BaseException as e:
            daemon.stop(timeout=2)
            if isinstance(e, GuestError):
                raise GuestError(f"{e}\n--- daemon {label} log ---\n{daemon.log()}") from e
            raise
        side = Side(label, workdir, daemon, guest)
        try:
            self._set_capabilities(guest)
            if incoming:
                guest.qmp("migrate-incoming", uri=f"unix:{side.migration_socket}")
        except BaseException:
            self._discard(side)
            raise
        return side

    @staticmethod
    def _set_capabilities(guest: Guest) -> None:
        caps = [{"capability": c, "state": True} for c in CAPABILITIES]
        guest.qmp("migrate-set-capabilities", capabilities=caps)

    def start(self) -> MigrationPair:
        """Start daemon A and boot guest A; the guest is at its shell on return."""
        if self._source is not None:
            raise RuntimeError("MigrationPair already started")
        self._source = self._start_side(incoming=False)
        return self

    def prepare_destination(
        self, *, shared_dir: Path | None = None, daemon_args: Sequence[str] | None = None
    ) -> Side:
        """Start the next destination (daemon + ``-incoming defer`` QEMU), listening.

        ``shared_dir`` and ``daemon_args`` override the pair's for this side
        only (e.g. to make it refuse the state). ``migrate`` calls this
        itself when no destination is prepared.
        """
        if self.destination is not None:
            raise RuntimeError("a destination is already prepared")
        self.destination = self._start_side(
            incoming=True, shared_dir=shared_dir, daemon_args=daemon_args
        )
        return self.destination

    # -- migration ---------------------------------------------------------

    def migrate(
        self,
        *,
        timeout: float = 120.0,
        while_active: Callable[[Side], None] | None = None,
    ) -> MigrationResult:
        """Migrate the guest from the source to the destination; swap the roles.

        ``while_active(source)`` runs once the migration has started (the
        guest still runs on the source), e.g. to observe or steer it with
        ``migrate-set-parameters``; if it raises, the migration is cancelled
        and the exception propagates.

        Raises :class:`MigrationError` (with both sides' logs) if the
        migration fails or does not finish within ``timeout`` seconds; the
        guest then still runs on the source, which stays the source.
        """
        src = self.source
        dst = self.destination or self.prepare_destination()
        deadline = time.monotonic() + timeout
        src.guest.qmp_client.clear_events()
        try:
            src.guest.qmp("migrate", uri=f"unix:{dst.migration_socket}")
            if while_active is not None:
                try:
                    while_active(src)
                except BaseException:
                    self._cancel(src, dst)
                    raise
            status = self._wait_final(src.guest, deadline)
        except (QMPError, OSError, TimeoutError) as e:
            status = f"error: {e}"
        if status != "completed":
            raise self._failed(src, dst, status)
        try:
            dst_status = self._wait_final(dst.guest, deadline)
            running = bool(dst.guest.qmp("query-status")["running"])
        except (QMPError, OSError, TimeoutError) as e:
            dst_status, running = f"error: {e}", False
        if dst_status != "completed" or not running:
            # The source completed but the destination did not run: the guest is lost.
            report = self._report(src, dst)
            self._discard(dst)
            self.destination = None
            raise MigrationError(
                f"source {src.label} completed but destination {dst.label} is "
                f"{dst_status!r}, running={running}\n{report}",
                status=dst_status,
                source_running=False,
            )
        info = src.guest.qmp("query-migrate")
        result = MigrationResult(
            source=src.label,
            destination=dst.label,
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            info=info,
        )
        self.results.append(result)
        self._retire(src)
        self._source, self.destination = dst, None
        return result

    @staticmethod
    def _wait_final(guest: Guest, deadline: float) -> str:
        """Wait for a final MIGRATION event on ``guest``; its status.

        Events are not missed: the capability is set before any migration,
        and ``wait_event`` keeps events that arrived during other commands.
        A status found by ``query-migrate`` is also accepted, so that an
        event consumed earlier cannot leave us waiting.
        """
        client = guest.qmp_client
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("migration did not finish in time")
            status = guest.qmp("query-migrate").get("status", "none")
            if status in _FINAL:
                return str(status)
            with contextlib.suppress(TimeoutError):
                ev = client.wait_event("MIGRATION", timeout=min(remaining, 5.0))
                if ev["data"]["status"] in _FINAL:
                    return str(ev["data"]["status"])

    def _cancel(self, src: Side, dst: Side) -> None:
        """Cancel a running migration; tear the destination down."""
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            src.guest.qmp("migrate_cancel")
            self._wait_final(src.guest, time.monotonic() + 30)
        self._discard(dst)
        self.destination = None

    def _failed(self, src: Side, dst: Side, status: str) -> MigrationError:
        """Tear down the destination after a failure; check the source resumed."""
        details = []
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            if status.startswith("error: migration did not finish"):
                src.guest.qmp("migrate_cancel")
                self._wait_final(src.guest, time.monotonic() + 30)
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            info = src.guest.qmp("query-migrate")
            details.append(f"source query-migrate: {info}")
        # The destination QEMU exits after a failed load; give it a moment to
        # write its last words before they go into the report.
        with contextlib.suppress(Exception):
            dst.guest.proc.wait(5)
        report = self._report(src, dst)
        self._discard(dst)
        self.destination = None
        running = self._source_resumes(src, time.monotonic() + 30)
        details.append(f"source running afterwards: {running}")
        return MigrationError(
            f"migration {src.label} -> {dst.label} ended with {status!r}\n"
            + "\n".join(details)
            + f"\n{report}",
            status=status,
            source_running=running,
        )

    @staticmethod
    def _source_resumes(src: Side, deadline: float) -> bool:
        """Whether the source guest runs again (QEMU restarts it after a failure)."""
        while time.monotonic() < deadline:
            try:
                if src.guest.qmp("query-status")["running"]:
                    return True
                src.guest.qmp_client.wait_event("RESUME", timeout=1.0)
            except TimeoutError:
                continue
            except (QMPError, OSError):
                return False
        return False

    @staticmethod
    def _report(src: Side, dst: Side) -> str:
        dst_state = dst.guest.proc.poll()
        return (
            f"destination QEMU {'running' if dst_state is None else f'exited ({dst_state})'}\n"
            f"{dst.log_report('destination')}\n{src.log_report('source')}"
        )

    def _retire(self, side: Side) -> None:
        """Quit a source after hand-over; its daemon should then exit by itself."""
        side.guest.shutdown(timeout=30)
        status = side.daemon.stop(timeout=10)
        self.retired.append(RetiredSide(side.label, status, side.daemon.log()))

    @staticmethod
    def _discard(side: Side) -> None:
        side.guest.kill()
        side.daemon.stop(timeout=2)

    # -- teardown ----------------------------------------------------------

    def problems(self) -> list[str]:
        """Unclean ends of retired daemons (their logs are in ``retired``)."""
        return [p for r in self.retired for p in r.problems()]

    def close(self) -> None:
        """Shut the running guest down and stop every daemon; record how they ended."""
        if self.destination is not None:
            self._discard(self.destination)
            self.destination = None
        if self._source is not None:
            self._retire(self._source)
            self._source = None

    def __enter__(self) -> MigrationPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
