"""Fixtures for real-guest tests: a daemon on a host directory and one QEMU guest.

Each test module gets one daemon and one booted guest (module scope), shared
by all its checks. A module fills the shared directory by overriding the
``guest_shared_dir`` fixture. The daemon command comes from
``VIRTIOFSD_PY_TEST_DAEMON`` (template with ``{socket}`` and
``{shared_dir}``), defaulting to this package's daemon.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemonproc import DaemonProcess
from virtiofsd_py.testing.guest import Guest, unavailable_reason

GUEST_TAG = "share"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def guest_support() -> None:
    """Skip (with the reason printed under -rs) when guests cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"real-guest tests unavailable: {reason}")
    if "VIRTIOFSD_PY_TEST_DAEMON" not in os.environ and (
        importlib.util.find_spec("virtiofsd_py.__main__") is None
    ):
        pytest.skip("virtiofsd_py has no __main__ yet (set VIRTIOFSD_PY_TEST_DAEMON)")


@pytest.fixture(scope="module")
def guest_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host directory to share; override in a module to fill it."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def virtiofs_daemon(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    """The daemon under test, serving ``guest_shared_dir``."""
    run_dir = tmp_path_factory.mktemp("daemon")
    daemon = DaemonProcess(
        guest_shared_dir, run_dir / "vhost.sock", run_dir / "daemon.log", cwd=REPO_ROOT
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def guest(virtiofs_daemon: DaemonProcess) -> Iterator[Guest]:
    """A booted guest with the daemon's device as tag ``GUEST_TAG`` (not mounted)."""
    g = Guest.boot(vhost_sockets={GUEST_TAG: str(virtiofs_daemon.socket)})
    yield g
    g.shutdown()
