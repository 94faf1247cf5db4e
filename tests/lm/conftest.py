"""A tiny Llama trained in this session to recite fictitious profiles, as registration files."""

from __future__ import annotations

import pytest

from tests.engine.lm_fixture import train_fixture
from tests.lm.lm_files import LMFiles, lm_files


@pytest.fixture(scope="session")
def lm() -> LMFiles:
    return lm_files(train_fixture())
