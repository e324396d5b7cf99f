"""Packaging: ``python -m build`` makes an sdist and a wheel; the wheel installs
into a clean venv and its ``virtiofsd-py`` entry point runs; ``--help``, the
man page and the README document every option."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from virtiofsd_py.app.options import build_parser

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "virtiofsd-py.1"
SOURCE_PARTS = ("virtiofsd_py", "contrib", "docs", "tests", "scripts")
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md", "CHANGELOG.md", "MANIFEST.in")


def documented_options() -> list[str]:
    """Every option string --help shows (all of them: none is hidden)."""
    out = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        out += [o for o in action.option_strings if o.startswith("--") or len(o) == 2]
    return out


def test_help_documents_every_option() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--help"],
        capture_output=True, text=True, timeout=20, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0
    for opt in documented_options():
        assert opt in res.stdout, opt


def test_man_page_documents_every_option() -> None:
    man = MAN.read_text()
    assert man.startswith(".TH VIRTIOFSD-PY 1")
    # roff escapes the hyphens of option names: \-\-shared\-dir
    text = man.replace("\\-", "-")
    missing = [o for o in documented_options() if o not in text]
    assert not missing, f"not in docs/virtiofsd-py.1: {missing}"


def test_readme_options_table_covers_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    hidden = {"--socket", "--foreground", "-f", "-V", "--version"}
    missing = [o for o in documented_options() if o not in readme and o not in hidden]
    assert not missing, f"not in README.md: {missing}"


@pytest.mark.packaging
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="pip install build wheel")
def test_build_and_install_the_wheel(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for part in SOURCE_PARTS:
        shutil.copytree(
            ROOT / part,
            src / part,
            # not the in-place build: the wheel must compile its own
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "_c*.c"),
        )
    for name in SOURCE_FILES:
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    # No isolation: the build requirements come from this machine, not the network.
    res = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("virtiofsd_py-*.whl")
    (sdist,) = dist.glob("virtiofsd_py-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "virtiofsd_py/app/cli.py" in names and not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for needed in ("contrib/50-virtiofsd-py.json", "contrib/systemd/virtiofsd-py@.service",
                   "docs/virtiofsd-py.1", "CHANGELOG.md"):  # fmt: skip
        assert needed in members, needed

    venv = tmp_path / "venv"
    # The venv sees this machine's site-packages only for the dependencies
    # (uvloop, msgpack): installing needs no network, and the package itself
    # must come from the wheel.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=60
    )
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index",
         "-q", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    exe = venv / "bin" / "virtiofsd-py"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import virtiofsd_py; print(virtiofsd_py.__file__)"],
        capture_output=True, text=True, timeout=20, cwd=tmp_path,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    helped = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=20, cwd=tmp_path
    )
    assert helped.returncode == 0 and "--shared-dir" in helped.stdout
    caps = subprocess.run(
        [str(exe), "--print-capabilities"], capture_output=True, text=True, timeout=20, cwd=tmp_path
    )
    assert json.loads(caps.stdout)["type"] == "fs"

    # The compiled core: `python -m build` builds the wheel from the sdist, so
    # a compiled module in the wheel shows that the sdist builds it too.
    compiled = sorted(p.relative_to(ROOT) for p in (ROOT / "virtiofsd_py").rglob("_c*.pyx"))
    for pyx in compiled:
        assert str(pyx) in members, f"{pyx} not in the sdist"
    if compiled and importlib.util.find_spec("Cython") and shutil.which("cc"):
        for pyx in compiled:
            stem = str(pyx.with_suffix(""))
            assert any(n.startswith(stem + ".") and n.endswith(".so") for n in names), (
                f"{stem} not compiled into the wheel"
            )
        version = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=20, cwd=tmp_path
        )
        assert "(compiled core)" in version.stdout, version.stdout + version.stderr
