"""Operator logs: the ``copytune`` logger, one line per tuned key at INFO, problems once per cause at WARNING,
COPYTUNE_LOG_LEVEL for any process, -v/-q on the command line."""

import logging
import os
import subprocess
import sys

from click.testing import CliRunner

from copytune import log
from copytune.cli import main

TUNE_ONE = ("import torch, copytune; copytune.Dispatcher(tuning='inline').copy("
            "[(torch.arange(8), torch.zeros(8, dtype=torch.int64))])")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_level_comes_from_the_environment(tmp_path):
    quiet = _run(TUNE_ONE, COPYTUNE_CACHE=str(tmp_path / "a.db"))
    assert quiet.returncode == 0 and "copytune: tuned" not in quiet.stderr, quiet.stderr
    info = _run(TUNE_ONE, COPYTUNE_LOG_LEVEL="info", COPYTUNE_CACHE=str(tmp_path / "b.db"))
    assert info.returncode == 0, info.stderr
    tuned = [ln for ln in info.stderr.splitlines() if "copytune: tuned" in ln]
    assert len(tuned) == 1 and "INFO" in tuned[0] and "per-copy torch" in tuned[0], info.stderr
    bad = _run("import copytune", COPYTUNE_LOG_LEVEL="chatty")
    assert bad.returncode == 0 and "unknown level 'CHATTY'" in bad.stderr


def test_a_problem_is_logged_once_per_cause(caplog):
    with caplog.at_level(logging.WARNING, logger="copytune"):
        assert log.warn_once("cause-a", "copytune: %s broke", "a")
        assert not log.warn_once("cause-a", "copytune: %s broke", "a")
        assert log.warn_once("cause-b", "copytune: %s broke", "b")
    assert [r.getMessage() for r in caplog.records] == ["copytune: a broke", "copytune: b broke"]


def test_the_cli_says_more_with_v_and_less_with_q(tmp_path, monkeypatch):
    monkeypatch.setattr(log.logger, "handlers", [])
    monkeypatch.setattr(log.logger, "level", logging.NOTSET)
    args = ["tune", "--model", "nsa", "--batch-sizes", "2", "--max-len", "64", "--mode", "eager", "--device", "cpu",
            "--cache", str(tmp_path / "c.db")]
    verbose = CliRunner().invoke(main, ["-v", *args])
    assert verbose.exit_code == 0, verbose.output
    assert "copytune: tuned" in verbose.output
    monkeypatch.setattr(log.logger, "handlers", [])
    quiet = CliRunner().invoke(main, ["-q", *args, "--retune"])
    assert quiet.exit_code == 0 and "copytune: tuned" not in quiet.output
    assert log.logger.level == logging.ERROR
