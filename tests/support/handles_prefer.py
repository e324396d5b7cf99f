"""An autouse fixture that makes every PassthroughFS of a test module use file handles.

A module that star-imports an existing suite and this fixture runs that suite
again with ``--inode-file-handles=prefer`` (tests/test_handles_prefer_*.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS


@pytest.fixture(autouse=True)
def prefer_handles(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every PassthroughFS made during the test uses handles (unless it says otherwise)."""
    init = PassthroughFS.__init__

    def with_handles(self: PassthroughFS, config: PassthroughConfig) -> None:
        if config.inode_file_handles == "never":
            config = dataclasses.replace(config, inode_file_handles="prefer")
        init(self, config)
        assert self.file_handles.enabled

    monkeypatch.setattr(PassthroughFS, "__init__", with_handles)
    yield
