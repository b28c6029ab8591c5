"""The README's set-up command is the main job and runs on a machine of either kind: here, a CPU-only one (CI
runs the ``pip install -e .`` half on a fresh machine; this runs the other half as written)."""

import re
import shlex
from pathlib import Path

import torch
from click.testing import CliRunner

from copytune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _setup_command() -> str:
    section = README.read_text().split("## Set up", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_the_set_up_command_installs_and_tunes(tmp_path, monkeypatch):
    command = _setup_command()
    install, run = [part.strip() for part in command.split("&&")]
    assert install == "pip install -e ."
    argv = shlex.split(run)
    assert argv[:2] == ["copytune", "tune"]
    monkeypatch.setenv("COPYTUNE_CACHE", str(tmp_path / "c.db"))
    result = CliRunner().invoke(main, argv[1:])
    assert result.exit_code == 0, result.output
    assert re.search(r"mode\s+max_len\s+bs\s+winner", result.output)  # the table
    if not torch.cuda.is_available():
        assert "tuning on the CPU" in result.output and "graph mode skipped" in result.output
