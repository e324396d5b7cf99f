"""Serving ``pyfuse3.Operations`` file systems (the optional extra ``[pyfuse3]``).

``adapter.Pyfuse3FS`` wraps one as an async ``Filesystem``; ``shims`` supplies
the pyfuse3 session functions such file systems call; ``convert`` maps
pyfuse3's types to the seam's.  Only this package's modules import pyfuse3:
without it installed everything else works, and :func:`wrap` says what to
install.
"""

from __future__ import annotations

from typing import Any, Final

from virtiofsd_py.fs.api import Filesystem

INSTALL_HINT: Final = (
    "pyfuse3 is not installed: pip install 'virtiofsd-py[pyfuse3]' "
    "(it builds against libfuse 3: apt-get install libfuse3-dev pkg-config)"
)


def available() -> bool:
    """Whether pyfuse3 can be imported."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return True


def prepare() -> None:
    """Install the pyfuse3 shims before a file system module imports pyfuse3's names."""
    if available():
        from virtiofsd_py.fs.pyfuse3_adapter import shims

        shims.install()


def is_operations(obj: object) -> bool:
    """Whether ``obj`` is a ``pyfuse3.Operations`` (False when pyfuse3 is absent)."""
    try:
        import pyfuse3
    except ImportError:
        return False
    return isinstance(obj, pyfuse3.Operations)


def wrap(ops: Any) -> Filesystem:
    """``ops`` (a ``pyfuse3.Operations``) as a ``Filesystem``; ImportError with
    :data:`INSTALL_HINT` when pyfuse3 is missing."""
    try:
        from virtiofsd_py.fs.pyfuse3_adapter.adapter import Pyfuse3FS
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return Pyfuse3FS(ops)
