"""Which daemons a benchmark compares: ours and, when installed, the Rust virtiofsd.

Ours runs with the compiled core, the pure-Python one
(``VIRTIOFSD_PY_PUREPYTHON=1``, named ``virtiofsd-py-pure``) or both side by
side (``python3 -m bench --core``).

Both get the same cache mode (``--cache auto`` unless told otherwise), no
sandbox and no seccomp filter, so they differ only in the implementation. Ours logs errors only:
debug logging costs more than the request itself.
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
#: Ours with the pure-Python core forced.
OURS_PURE = "virtiofsd-py-pure"
CORES = ("compiled", "pure", "both")
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


def ours(cache: str = "auto", extra: str = "") -> DaemonSpec:
    cmd = (
        f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
        f" --shared-dir {{shared_dir}} --sandbox none --seccomp none --log-level error"
        f" --cache {cache} {extra}"
    )
    return DaemonSpec(OURS, cmd.strip())


def ours_pure(cache: str = "auto", extra: str = "") -> DaemonSpec:
    """Ours with ``VIRTIOFSD_PY_PUREPYTHON=1`` (through env(1): the template is one argv)."""
    return DaemonSpec(OURS_PURE, f"env VIRTIOFSD_PY_PUREPYTHON=1 {ours(cache, extra).template}")


def reference(cache: str = "auto", extra: str = "") -> DaemonSpec | None:
    cmd = reference_command()
    if cmd is None:
        return None
    tpl = (
        f"{cmd} --sandbox none --seccomp none --socket-path {{socket}}"
        f" --shared-dir {{shared_dir}} --cache {cache} {extra}"
    )
    return DaemonSpec(REF, tpl.strip())


def selected(
    names: list[str] | None, cache: str = "auto", core: str = "compiled"
) -> list[DaemonSpec]:
    """Ours (with the ``core`` asked for: compiled, pure or both) and the
    reference (if installed), filtered by ``names``."""
    specs = []
    if core in ("compiled", "both"):
        specs.append(ours(cache))
    if core in ("pure", "both"):
        specs.append(ours_pure(cache))
    ref = reference(cache)
    if ref is not None:
        specs.append(ref)
    if names:
        specs = [s for s in specs if s.name in names]
    return specs
