"""--modcaps parsing and the capability sets a restricted process ends up with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from virtiofsd_py.host.capabilities import (
    DEFAULT_KEEP,
    NAMES,
    CapabilityError,
    names,
    parse_modcaps,
)


def test_default_keep_is_what_passthrough_needs() -> None:
    assert names(DEFAULT_KEEP) == [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "setgid",
        "setuid",
        "mknod",
        "setfcap",
    ]


def test_modcaps_adds_and_removes() -> None:
    keep = parse_modcaps("+sys_admin:-mknod")
    assert NAMES["sys_admin"] in keep
    assert NAMES["mknod"] not in keep
    assert parse_modcaps("+CAP_SYS_ADMIN") == parse_modcaps("+sys_admin")
    assert parse_modcaps(None) == DEFAULT_KEEP
    assert parse_modcaps("-chown:+chown") == DEFAULT_KEEP


@pytest.mark.parametrize("spec", ["sys_admin", "+nonsense", "*chown", "+"])
def test_modcaps_errors(spec: str) -> None:
    with pytest.raises(CapabilityError, match="--modcaps"):
        parse_modcaps(spec)


CHILD = textwrap.dedent(
    """
    import sys
    from virtiofsd_py.host import capabilities
    capabilities.restrict(capabilities.parse_modcaps(sys.argv[1] or None))
    status = open("/proc/self/status").read()
    fields = dict(l.split(":\\t", 1) for l in status.splitlines() if ":\\t" in l)
    print(fields["CapEff"].strip(), fields["CapPrm"].strip(), fields["CapBnd"].strip(),
          fields["CapInh"].strip(), fields["CapAmb"].strip())
    """
)


def restricted_sets(modcaps: str) -> list[int]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, modcaps], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [int(x, 16) for x in r.stdout.split()]


def mask(caps: frozenset[int]) -> int:
    return sum(1 << c for c in caps)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root's capabilities to drop")
@pytest.mark.parametrize("modcaps", ["", "+sys_admin:-mknod"])
def test_restrict_sets_effective_permitted_and_bounding(modcaps: str) -> None:
    want = mask(parse_modcaps(modcaps or None))
    eff, prm, bnd, inh, amb = restricted_sets(modcaps)
    assert (eff, prm, bnd) == (want, want, want)
    assert (inh, amb) == (0, 0)
