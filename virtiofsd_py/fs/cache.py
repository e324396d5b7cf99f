"""Cache policy: what the guest may cache, as the Rust virtiofsd decides it.

``--cache`` maps to (Rust virtiofsd 1.13, ``main.rs`` and
``passthrough::do_open``):

========  ===============  =================================  =====================
policy    entry/attr (s)   OPEN of a file                     OPENDIR
========  ===============  =================================  =====================
never     0                FOPEN_DIRECT_IO                    0
metadata  86400            FOPEN_DIRECT_IO                    CACHE_DIR|KEEP_CACHE
auto      1                0 (close-to-open consistency)      0
always    86400            FOPEN_KEEP_CACHE                   CACHE_DIR|KEEP_CACHE
========  ===============  =================================  =====================

READDIRPLUS is offered unless the policy is ``never`` (then entries would
expire at once, so the extra lookups are wasted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

CacheMode = Literal["auto", "always", "metadata", "never"]
CACHE_MODES: Final[tuple[str, ...]] = get_args(CacheMode)

# fuse_open_out.open_flags (include/uapi/linux/fuse.h)
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3

_TIMEOUT: Final[dict[str, float]] = {
    "never": 0.0,
    "metadata": 86400.0,
    "auto": 1.0,
    "always": 86400.0,
}
_FILE_FLAGS: Final[dict[str, int]] = {
    "never": FOPEN_DIRECT_IO,
    "metadata": FOPEN_DIRECT_IO,
    "auto": 0,
    "always": FOPEN_KEEP_CACHE,
}
_DIR_FLAGS: Final[dict[str, int]] = {
    "never": 0,
    "metadata": FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE,
    "auto": 0,
    "always": FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE,
}


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The numbers one ``--cache`` mode stands for."""

    mode: CacheMode
    entry_timeout: float
    attr_timeout: float
    file_open_flags: int
    dir_open_flags: int
    readdirplus: bool

    @classmethod
    def from_mode(cls, mode: str) -> CachePolicy:
        if mode not in _TIMEOUT:
            raise ValueError(f"invalid cache policy {mode!r}: one of {', '.join(CACHE_MODES)}")
        timeout = _TIMEOUT[mode]
        return cls(
            mode=mode,  # type: ignore[arg-type]
            entry_timeout=timeout,
            attr_timeout=timeout,
            file_open_flags=_FILE_FLAGS[mode],
            dir_open_flags=_DIR_FLAGS[mode],
            readdirplus=mode != "never",
        )
