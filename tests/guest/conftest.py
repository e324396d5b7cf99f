"""Fixtures for real-guest tests: a daemon on a host directory and one QEMU guest.

Each test module gets one daemon and one booted guest (module scope), shared
by all its checks. A module fills the shared directory by overriding the
``guest_shared_dir`` fixture. The daemon command comes from
``VIRTIOFSD_PY_TEST_DAEMON`` (template with ``{socket}`` and
``{shared_dir}``), defaulting to this package's daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest, unavailable_reason

GUEST_TAG = "share"
TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="session")
def guest_support() -> None:
    """Skip (with the reason printed under -rs) when guests cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"real-guest tests unavailable: {reason}")


@pytest.fixture(scope="module")
def guest_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host directory to share; override in a module to fill it."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def virtiofs_daemon(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    """The daemon under test, serving ``guest_shared_dir``; must exit cleanly after."""
    extra = ["--cache", "auto"] if is_own_daemon() else []
    daemon = DaemonProcess(
        guest_shared_dir, tmp_path_factory.mktemp("daemon"), extra_args=extra
    ).start(timeout=30)
    yield daemon
    status = daemon.stop(timeout=5.0)
    log = daemon.log()
    print(f"--- daemon log (exit status {status}) ---\n{log[-20000:]}")
    assert status == 0, f"daemon exit status {status}"
    assert TRACEBACK not in log, "daemon log has a Python traceback"


@pytest.fixture(scope="module")
def guest(virtiofs_daemon: DaemonProcess) -> Iterator[Guest]:
    """A booted guest with the daemon's device as tag ``GUEST_TAG`` (not mounted)."""
    g = Guest.boot(vhost_sockets={GUEST_TAG: str(virtiofs_daemon.socket_path)})
    yield g
    g.shutdown()
