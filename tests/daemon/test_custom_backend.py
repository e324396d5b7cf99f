"""``--backend MODULE:FACTORY`` start-up: what is served, and one clear line when it cannot be.

A file of factories is written per test; the daemon must fail with status 1
and one ERROR line naming the problem (tests/daemon/test_startup.py's rule),
or serve what the factory returned.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_startup import assert_fails_with, start

from virtiofsd_py.app import options
from virtiofsd_py.app.options import OptionError
from virtiofsd_py.testing.daemon_proc import is_own_daemon

pytestmark = pytest.mark.skipif(not is_own_daemon(), reason="virtiofsd-py's own --backend")


MODULE = """
from virtiofsd_py.fs.memory import MemoryFS

def an_int(**kw):
    return 42

def raises(**kw):
    raise ValueError("no such thing")

def checks(**kw):
    assert kw == {"alpha": "1", "beta": "two=2"}, kw
    raise SystemExit(7)  # proves the options arrived, as strings
"""

NEEDS_PYFUSE3 = """
import pyfuse3

class Ops(pyfuse3.Operations):
    pass
"""


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    f = tmp_path / "factories.py"
    f.write_text(MODULE)
    return f


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return start("--socket-path", str(tmp_path / "sock"), *args)


def test_unknown_module(tmp_path: Path) -> None:
    assert_fails_with(serve(tmp_path, "--backend", "no_such_module_here:make"), "cannot import")


def test_missing_factory(tmp_path: Path, factories: Path) -> None:
    res = serve(tmp_path, "--backend", f"{factories}:nothing")
    assert_fails_with(res, "has no callable nothing")


def test_factory_returns_the_wrong_type(tmp_path: Path, factories: Path) -> None:
    res = serve(tmp_path, "--backend", f"{factories}:an_int")
    assert_fails_with(res, "returned int", "not a Filesystem or a pyfuse3.Operations")


def test_factory_raises(tmp_path: Path, factories: Path) -> None:
    res = serve(tmp_path, "--backend", f"{factories}:raises")
    assert_fails_with(res, "raises(**{})", "no such thing")


def test_backend_options_reach_the_factory_as_strings(tmp_path: Path, factories: Path) -> None:
    res = serve(
        tmp_path, "--backend", f"{factories}:checks",
        "--backend-option", "alpha=1", "--backend-option", "beta=two=2",
    )  # fmt: skip
    assert res.returncode == 7, res.stderr


def test_without_pyfuse3_one_line_says_what_to_install(tmp_path: Path) -> None:
    module = tmp_path / "needs_pyfuse3.py"
    module.write_text(NEEDS_PYFUSE3)
    code = (
        "import sys, runpy; sys.modules['pyfuse3'] = None; "
        f"sys.argv = ['virtiofsd-py', '--socket-path', {str(tmp_path / 'sock')!r}, "
        f"'--backend', {f'{module}:Ops'!r}]; "
        "runpy.run_module('virtiofsd_py', run_name='__main__')"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert_fails_with(res, "pip install 'virtiofsd-py[pyfuse3]'", "libfuse3-dev")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "nocolon"], "expected passthrough, memory or MODULE:FACTORY"),
        (["--backend", "mod:not-an-identifier"], "MODULE:FACTORY"),
        (["--backend", "m:f", "--backend-option", "novalue"], "expected KEY=VALUE"),
        (["--backend", "memory", "--backend-option", "a=b"], "needs a --backend MODULE:FACTORY"),
    ],
)
def test_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options.parse_args(["--socket-path", "/tmp/x", *argv])


def test_custom_backend_defaults_to_no_sandbox_and_no_seccomp_unless_given() -> None:
    opts = options.parse_args(["--socket-path", "/tmp/x", "--backend", "m:f"])
    assert (opts.sandbox, opts.seccomp) == ("none", "none")
    opts = options.parse_args(
        ["--socket-path", "/tmp/x", "--backend", "m:f", "--sandbox", "chroot", "--seccomp", "log"]
    )
    assert (opts.sandbox, opts.seccomp) == ("chroot", "log")
