"""The suite never reads or writes the user's real winner cache: conftest points ``COPYTUNE_CACHE`` at a file of the
session, for this process and every process a test starts."""

import os
import subprocess
import sys
from pathlib import Path

from copytune.cache.store import default_path
from copytune.cli import main


def _users_cache_folder() -> Path:
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "copytune").resolve()


def test_the_default_cache_is_not_the_users():
    from copytune import dispatch

    assert not default_path().resolve().is_relative_to(_users_cache_folder()), default_path()
    assert dispatch.default_dispatcher().store.path == default_path()  # batched_copy, nsa.install()


def test_the_default_cache_is_the_sessions(_session_cache):
    assert default_path() == _session_cache


def test_the_cli_default_cache_is_the_sessions(_session_cache):
    ctx = main.commands["show"].make_context("show", [])
    assert ctx.params["cache_path"] == str(_session_cache)


def test_processes_a_test_starts_inherit_it(_session_cache):
    probe = "from copytune.cache.store import default_path; print(default_path())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == str(_session_cache)
