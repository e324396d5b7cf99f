"""Builds the compiled core (Cython) beside the pure-Python package.

Every ``_c*.pyx`` under virtiofsd_py/ becomes an extension module of the
same name; each has a pure-Python twin that is used when the extension is
missing or ``VIRTIOFSD_PY_PUREPYTHON=1`` is set (virtiofsd_py/host/native.py).
A machine without a C compiler (or without Cython) still installs the
package: the build warns once and leaves the extensions out.

``VIRTIOFSD_PY_SANITIZE=1`` builds with AddressSanitizer and UBSan, for the
fuzz targets (docs/compiled-core.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
INCLUDE = "virtiofsd_py/include"


def _warn(what: str) -> None:
    print(f"WARNING: virtiofsd-py: {what}; the pure-Python core will be used", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """``build_ext`` that leaves an extension out instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler at all (DistutilsPlatformError, ...)
            _warn(f"the compiled core was not built ({e})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            _warn(f"{ext.name} was not built ({e})")


def extensions() -> list[Extension]:
    sources = sorted(p.relative_to(ROOT) for p in (ROOT / "virtiofsd_py").rglob("_c*.pyx"))
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    cflags = ["-O2", "-g", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
    ldflags: list[str] = []
    if os.environ.get("VIRTIOFSD_PY_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
        cflags += san
        ldflags += san
    exts = [
        Extension(
            ".".join(src.with_suffix("").parts),
            [str(src)],
            include_dirs=[INCLUDE],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
        for src in sources
    ]
    return cythonize(
        exts,
        include_path=["virtiofsd_py", INCLUDE],
        compiler_directives={"language_level": 3, "embedsignature": True},
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
