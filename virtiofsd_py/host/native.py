"""Compiled core or pure Python: decided once, when the package is imported.

Each compiled module (``_c*.pyx``, built by setup.py) has a pure-Python twin
that is complete on its own.  A module with a twin imports the compiled one
only when :data:`PURE` is false, and reports here what it got, so that the
start-up log line and ``--version`` can say which core runs.  The model is
msgpack's ``_cmsgpack``/``fallback`` pair: ``VIRTIOFSD_PY_PUREPYTHON=1``
forces pure Python, as ``MSGPACK_PUREPYTHON=1`` does there.
"""

from __future__ import annotations

import os
from typing import Final

#: ``VIRTIOFSD_PY_PUREPYTHON=1``: never import a compiled module.
PURE: Final = os.environ.get("VIRTIOFSD_PY_PUREPYTHON", "") not in ("", "0")

#: Compiled module name -> whether it was imported (False: its twin serves).
_loaded: dict[str, bool] = {}
#: Why a compiled module could not be imported (not when PURE forced it).
_missing: dict[str, str] = {}


def loaded(name: str, ok: bool, why: str = "") -> None:
    """Record whether the compiled module ``name`` serves (``why``: the import error)."""
    _loaded[name] = ok
    if not ok and not PURE:
        _missing[name] = why


def core() -> str:
    """``compiled``, ``pure Python`` (forced or not built) or ``partly compiled``."""
    if not _loaded or not any(_loaded.values()):
        return "pure Python"
    return "compiled" if all(_loaded.values()) else "partly compiled"


def describe() -> str:
    """One line for the start-up log and ``--version``."""
    text = f"{core()} core"
    if PURE and _loaded:
        return text + " (VIRTIOFSD_PY_PUREPYTHON=1)"
    if _missing:
        return text + f" ({', '.join(sorted(_missing))} not built)"
    return text


def missing() -> dict[str, str]:
    """Compiled modules that should have been there, with the import error."""
    return dict(_missing)
