"""Which daemons a benchmark compares: ours and, when installed, the Rust virtiofsd.

Ours runs twice when its compiled core is built: as installed (``virtiofsd-py``,
the compiled core) and with ``VIRTIOFSD_PY_PUREPYTHON=1``
(``virtiofsd-py-pure``), so that both cores are reported side by side.  All
get the same cache mode (``--cache auto`` unless told otherwise), no sandbox
and no seccomp filter, so they differ only in the implementation.  Ours logs
errors only: debug logging costs more than the request itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_REF = "VIRTIOFSD_REF"
OURS = "virtiofsd-py"
OURS_PURE = "virtiofsd-py-pure"
#: Our daemons, each compared with the reference in the reports.
OURS_ALL = (OURS, OURS_PURE)
REF = "virtiofsd-rs"


@dataclass(frozen=True)
class DaemonSpec:
    """A daemon to benchmark: a name and a command template ({socket}, {shared_dir})."""

    name: str
    template: str


def reference_command() -> str | None:
    """The Rust virtiofsd: ``$VIRTIOFSD_REF``, else ``virtiofsd`` on PATH or in /usr/libexec."""
    env = os.environ.get(ENV_REF)
    if env:
        return env
    found = shutil.which("virtiofsd")
    if found:
        return found
    libexec = Path("/usr/libexec/virtiofsd")
    return str(libexec) if os.access(libexec, os.X_OK) else None


def compiled_core_built() -> bool:
    """Whether our daemon would serve with (part of) a compiled core."""
    from virtiofsd_py.app import cli  # noqa: F401  (imports every module with a twin)
    from virtiofsd_py.host import native

    return native.core() != "pure Python"


def ours(cache: str = "auto", extra: str = "", *, pure: bool = False) -> DaemonSpec:
    """Our daemon; ``pure``: forced onto the pure-Python core."""
    prefix = "env VIRTIOFSD_PY_PUREPYTHON=1 " if pure else ""
    cmd = (
        f"{prefix}{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
        f" --shared-dir {{shared_dir}} --sandbox none --seccomp none --log-level error"
        f" --cache {cache} {extra}"
    )
    return DaemonSpec(OURS_PURE if pure else OURS, cmd.strip())


def reference(cache: str = "auto", extra: str = "") -> DaemonSpec | None:
    cmd = reference_command()
    if cmd is None:
        return None
    tpl = (
        f"{cmd} --sandbox none --seccomp none --socket-path {{socket}}"
        f" --shared-dir {{shared_dir}} --cache {cache} {extra}"
    )
    return DaemonSpec(REF, tpl.strip())


def selected(names: list[str] | None, cache: str = "auto") -> list[DaemonSpec]:
    """Ours (both cores when the compiled one is built) and the reference (if
    installed), filtered by ``names``."""
    specs = [ours(cache)]
    if compiled_core_built() or (names and OURS_PURE in names):
        specs.append(ours(cache, pure=True))
    ref = reference(cache)
    if ref is not None:
        specs.append(ref)
    if names:
        specs = [s for s in specs if s.name in names]
    return specs
