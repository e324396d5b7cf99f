"""``--backend MODULE:FACTORY``: a back-end from any Python module.

MODULE is a dotted module name (imported from ``sys.path``) or the path of
a ``.py`` file; FACTORY a callable in it.  The factory is called with the
``--backend-option KEY=VALUE`` pairs as keyword arguments, the values as
strings (a factory converts what it needs; the same KEY twice: the last
wins), and returns what to serve: a ``Filesystem`` (sync or async methods)
or a ``pyfuse3.Operations`` instance (served through
fs/pyfuse3_adapter).  A class is a factory: ``tmpfs.py:Operations``.

The module is imported and the factory called during start-up before
confinement (startup.py), while the host's tree is still visible: a
back-end opens what it needs then.  Every failure is a ``StartupError``
with one line saying what went wrong (and, for pyfuse3, what to install).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from virtiofsd_py.app.errors import StartupError
from virtiofsd_py.fs import pyfuse3_adapter
from virtiofsd_py.fs.api import Filesystem

BUILT_IN = ("passthrough", "memory")


def is_custom(backend: str) -> bool:
    """Whether ``--backend`` names a MODULE:FACTORY rather than a built-in back-end."""
    return backend not in BUILT_IN


def split_spec(spec: str) -> tuple[str, str]:
    """(MODULE, FACTORY) of ``spec``; ValueError when it is not of that form."""
    module, sep, factory = spec.rpartition(":")
    if not sep or not module or not factory.isidentifier():
        raise ValueError(
            f"--backend {spec!r}: expected passthrough, memory or MODULE:FACTORY "
            "(a module name or .py file, and a callable in it)"
        )
    return module, factory


def parse_options(items: tuple[str, ...]) -> dict[str, str]:
    """``--backend-option KEY=VALUE`` items as keyword arguments; ValueError if malformed."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--backend-option {item!r}: expected KEY=VALUE, KEY an identifier")
        out[key] = value
    return out


def _import(module: str) -> ModuleType:
    if module.endswith(".py") or os.sep in module:
        path = os.path.abspath(module)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(name, mod)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def load(spec: str, options: tuple[str, ...]) -> Filesystem:
    """Import, call the factory, and return the ``Filesystem`` to serve."""
    try:
        module, factory_name = split_spec(spec)
        kwargs = parse_options(options)
    except ValueError as e:
        raise StartupError(str(e)) from None
    pyfuse3_adapter.prepare()  # before the module takes pyfuse3's names
    try:
        mod = _import(module)
    except ModuleNotFoundError as e:
        if e.name in ("pyfuse3", "trio"):
            raise StartupError(f"--backend {spec}: {pyfuse3_adapter.INSTALL_HINT}") from None
        raise StartupError(f"--backend {spec}: cannot import {module}: {e}") from None
    except Exception as e:
        raise StartupError(f"--backend {spec}: importing {module} failed: {e!r}") from None
    factory: Callable[..., Any] | None = getattr(mod, factory_name, None)
    if not callable(factory):
        raise StartupError(f"--backend {spec}: {module} has no callable {factory_name}")
    try:
        made = factory(**kwargs)
    except Exception as e:
        raise StartupError(
            f"--backend {spec}: {factory_name}(**{kwargs!r}) failed: {e!r}"
        ) from None
    if isinstance(made, Filesystem):
        return made
    if pyfuse3_adapter.is_operations(made):
        return pyfuse3_adapter.wrap(made)
    raise StartupError(
        f"--backend {spec}: {factory_name} returned {type(made).__name__}, "
        "not a Filesystem or a pyfuse3.Operations"
    )
