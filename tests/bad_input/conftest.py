"""The bad-input suite: what a user types or feeds in that cannot be used, and what it must get
(one sentence, exit code 2 or the API's error class, nothing written, no source changed). It needs
no reference library: it checks messages and side effects, not numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input_helpers import write_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A pipeline folder for tests that only read it (copy it with ``shutil.copytree`` to change it)."""
    return write_pipeline(tmp_path_factory.mktemp("pipeline") / "sdxl")
