"""The options table: one declaration per option gives the parser, the typed
``Options``, the legacy ``-o`` items and the man page; they must agree."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from virtiofsd_py import __version__
from virtiofsd_py.app import manpage
from virtiofsd_py.app.options import (
    EXTRA,
    OptionError,
    Options,
    SeccompAction,
    build_parser,
    legacy_items,
    parse_args,
    table,
)
from virtiofsd_py.confine.sandbox import MODES
from virtiofsd_py.fs.cache import CACHE_MODES
from virtiofsd_py.host.seccomp import ACTIONS

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--shared-dir", "/s", "--socket-path", "/tmp/x.sock", "--sandbox", "none"]


def test_committed_man_page_is_the_generated_one() -> None:
    committed = (ROOT / "docs" / "virtiofsd-py.1").read_text()
    assert committed == manpage.render(), (
        "docs/virtiofsd-py.1 is stale: python3 -m virtiofsd_py.app.manpage docs/virtiofsd-py.1"
    )


def test_version_comes_from_the_package() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--version"],
        capture_output=True, text=True, timeout=20, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0
    assert res.stdout.strip() == f"virtiofsd-py {__version__}"


def test_parser_defaults_are_the_dataclass_defaults() -> None:
    opts = parse_args(BASE)
    assert opts == Options(shared_dir="/s", socket_path="/tmp/x.sock", sandbox="none")


def test_choices_are_the_types_words() -> None:
    choices = {a.dest: a.choices for a in build_parser()._actions if a.choices}
    assert tuple(choices["cache"]) == CACHE_MODES
    assert tuple(choices["sandbox"]) == MODES
    assert tuple(choices["seccomp"]) == ACTIONS == get_args(SeccompAction)
    assert tuple(choices["inode_file_handles"]) == ("never", "prefer", "mandatory", "fallback")


def test_every_row_is_a_field_and_every_flag_is_unique() -> None:
    names = {f.name for f in dataclasses.fields(Options)}
    flags = [f for e in table() for f in e.opt.flags] + [f for x in EXTRA for f in x.flags]
    assert len(flags) == len(set(flags))
    assert {e.name for e in table()} <= names
    assert {x.dest for x in EXTRA if x.dest is not None} <= names
    assert {dest for dest, _ in legacy_items().values()} <= names


def test_renamed_word_is_replaced_with_a_warning() -> None:
    opts = parse_args([*BASE, "--inode-file-handles", "fallback"])
    assert opts.inode_file_handles == "prefer"
    assert any("'fallback'" in d for d in opts.deprecations)


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--socket", "/tmp/y.sock"], "socket_path", "/tmp/y.sock"),
        (["--killpriv-v2", "--no-killpriv-v2"], "killpriv_v2", False),
        (["--no-readdirplus"], "readdirplus", False),
        (
            ["--translate-uid", "map:0:1000:1", "--translate-uid", "map:5:2000:1"],
            "translate_uid",
            ("map:0:1000:1", "map:5:2000:1"),
        ),
        (["-o", "modcaps=-mknod"], "modcaps", "-mknod"),
        (["--modcaps", "+sys_admin", "-o", "modcaps=-mknod"], "modcaps", "-mknod"),
    ],
)
def test_spellings(argv: list[str], field: str, value: object) -> None:
    assert getattr(parse_args([*BASE, *argv]), field) == value


@pytest.mark.parametrize("item", ["xattr=1", "source", "cache", "modcaps"])
def test_legacy_item_of_the_wrong_kind_is_refused(item: str) -> None:
    with pytest.raises(OptionError, match="-o"):
        parse_args([*BASE, "-o", item])
