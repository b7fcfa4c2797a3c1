"""Shared test fixtures and paths."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JAXIDX_SHARED_DATA", REPO.parent / "shared" / "data" / "xmc"))


@pytest.fixture
def shared_xmc():
    """Directory of the shared real XMC data sets; skip where the checkout has no ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
