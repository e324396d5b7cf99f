"""Cache policy: what the guest may cache, as the Rust virtiofsd decides it.

``--cache`` maps to (Rust virtiofsd 1.13, ``main.rs`` and
``passthrough::do_open``; the ``Opened`` fields of fs/api.py):

========  ===============  =================================  =====================
policy    entry/attr (s)   OPEN of a file                     OPENDIR
========  ===============  =================================  =====================
never     0                direct_io                          nothing
metadata  86400            direct_io                          cache_dir, keep_cache
auto      1                nothing (close-to-open)            nothing
always    86400            keep_cache                         cache_dir, keep_cache
========  ===============  =================================  =====================

READDIRPLUS is offered unless the policy is ``never`` (then entries would
expire at once, so the extra lookups are wasted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from virtiofsd_py.fs.api import Opened

CacheMode = Literal["auto", "always", "metadata", "never"]
CACHE_MODES: Final[tuple[str, ...]] = get_args(CacheMode)

#: mode -> (entry/attr timeout, file direct_io, file keep_cache, directory caching)
_MODES: Final[dict[str, tuple[float, bool, bool, bool]]] = {
    "never": (0.0, True, False, False),
    "metadata": (86400.0, True, False, True),
    "auto": (1.0, False, False, False),
    "always": (86400.0, False, True, True),
}


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The numbers one ``--cache`` mode stands for."""

    mode: CacheMode
    entry_timeout: float
    attr_timeout: float
    #: Files bypass the guest's page cache (``Opened.direct_io``).
    file_direct_io: bool
    #: Files keep their cached pages across opens (``Opened.keep_cache``).
    file_keep_cache: bool
    #: Directories' listings are cached and kept (``Opened.cache_dir`` and
    #: ``keep_cache``).
    dir_cache: bool
    readdirplus: bool

    @classmethod
    def from_mode(cls, mode: str) -> CachePolicy:
        if mode not in _MODES:
            raise ValueError(f"invalid cache policy {mode!r}: one of {', '.join(CACHE_MODES)}")
        timeout, direct_io, keep_cache, dir_cache = _MODES[mode]
        return cls(
            mode=mode,  # type: ignore[arg-type]
            entry_timeout=timeout,
            attr_timeout=timeout,
            file_direct_io=direct_io,
            file_keep_cache=keep_cache,
            dir_cache=dir_cache,
            readdirplus=mode != "never",
        )

    def opened(self, fh: int, directory: bool) -> Opened:
        """The OPEN / OPENDIR reply for handle ``fh`` under this policy."""
        if directory:
            return Opened(fh, False, self.dir_cache, self.dir_cache)
        return Opened(fh, self.file_direct_io, self.file_keep_cache, False)
