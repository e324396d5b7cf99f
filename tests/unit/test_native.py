"""Which core serves: ``host.native``'s record, the start-up line and its warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.app import startup
from virtiofsd_py.host import native

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty record, restored afterwards (the real one belongs to this process)."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_missing", {})
    yield


@pytest.mark.usefixtures("record")
def test_all_compiled_modules_loaded_is_the_compiled_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "PURE", False)
    native.loaded("a._ca", True)
    native.loaded("b._cb", True)
    assert native.core() == "compiled"
    assert native.describe() == "compiled core"
    assert native.missing() == {}


@pytest.mark.usefixtures("record")
def test_a_module_that_did_not_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "PURE", False)
    native.loaded("a._ca", True)
    native.loaded("b._cb", False, "No module named 'b._cb'")
    assert native.core() == "partly compiled"
    assert native.describe() == "partly compiled core (b._cb not built)"
    assert native.missing() == {"b._cb": "No module named 'b._cb'"}


@pytest.mark.usefixtures("record")
def test_forced_pure_is_said_and_is_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "PURE", True)
    native.loaded("a._ca", False, "forced")
    assert native.describe() == "pure Python core (VIRTIOFSD_PY_PUREPYTHON=1)"
    assert native.missing() == {}


@pytest.mark.usefixtures("record")
def test_start_up_warns_once_when_the_compiled_core_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "PURE", False)
    native.loaded("a._ca", False, "No module named 'a._ca'")
    with caplog.at_level(logging.INFO, logger="virtiofsd_py"):
        startup.announce_core()
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 1 and "pure Python core (a._ca not built)" in infos[0].getMessage()
    assert len(warnings) == 1
    assert "not built (a._ca: No module named 'a._ca')" in warnings[0].getMessage()


@pytest.mark.usefixtures("record")
def test_start_up_does_not_warn_when_pure_is_forced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "PURE", True)
    native.loaded("a._ca", False, "forced")
    with caplog.at_level(logging.INFO, logger="virtiofsd_py"):
        startup.announce_core()
    assert [r.levelno for r in caplog.records] == [logging.INFO]


@pytest.mark.parametrize("pure", ["1", ""])
def test_version_names_the_core_this_process_would_serve_with(pure: str) -> None:
    env = dict(os.environ, VIRTIOFSD_PY_PUREPYTHON=pure)
    probe = (
        "from virtiofsd_py.app import cli; from virtiofsd_py.host import native; "
        "print(native.describe())"
    )
    expected = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    ).stdout.strip()
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert res.returncode == 0
    assert res.stdout.strip().endswith(f"({expected})")
    if pure:
        assert "pure Python core" in res.stdout
