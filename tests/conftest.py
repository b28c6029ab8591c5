"""Device choice for the whole suite: CUDA when present, else CPU tensors with Triton's interpreter; and a cache of
the suite's own, so no test reads or writes the user's winners.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before copytune is imported.
"""

import contextlib
import logging
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """``COPYTUNE_CACHE`` at a file of this session for every test and every process a test starts: a test that
    tunes through the default path (``batched_copy``, ``Dispatcher()``, ``nsa.install()``, the CLI) must not
    leave its CPU or poisoned-candidate winners in the user's real cache. Only the winner cache moves:
    ``XDG_CACHE_HOME`` and ``COPYTUNE_BUILD_DIR`` stay, so GPU runs still find the built CUDA extension."""
    path = tmp_path_factory.mktemp("copytune-cache") / "cache.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COPYTUNE_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _fresh_causes():
    """Problems are logged once per cause per process; each test starts with none seen."""
    from copytune.log import forget_causes

    forget_causes()


@pytest.fixture
def logged(caplog):
    """``with logged("pattern"):`` — the block logged a copytune record of at least WARNING matching ``pattern``
    (``logged(pattern, logging.INFO)`` for operator lines). Yields caplog for further checks."""

    @contextlib.contextmanager
    def expect(pattern: str, level: int = logging.WARNING):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="copytune"):
            yield caplog
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("copytune")]
        assert any(r.levelno >= level and re.search(pattern, r.getMessage()) for r in caplog.records), lines
    return expect
