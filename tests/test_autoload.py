"""Zero-code activation: ``copytune run -- CMD`` patches the engine when CMD's Python imports it."""

import os
import subprocess
import sys
import textwrap

import pytest

from copytune.autoload import FOLDER, autoload_env

ENGINE = textwrap.dedent('''
    class DeepseekSparseAttnBackend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
            raise AssertionError("the engine's own copies ran")

    class DeepseekSparseAttnMultiStepBackend:
        def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
            pass
''')

SCRIPT = textwrap.dedent('''
    import sglang.srt.layers.attention.dsa_backend as engine
    from copytune import nsa
    md, pre = nsa.make_example(3, 40, 128)
    engine.DeepseekSparseAttnBackend()._copy_base_replay_buffers(3, md, pre, "decode")
    want = nsa.make_example(3, 40, 128)[0]
    nsa.reference_copy(want, pre)
    assert all(a.equal(b) for (_, a), (_, b) in zip(nsa.copy_pairs(md, pre), nsa.copy_pairs(want, pre)))
    print("patched:", ",".join(nsa.installed()), "| served:", nsa.stats().served)
''')


@pytest.fixture
def fake_engine(tmp_path):
    """A stand-in ``sglang`` package with the DSA backend's seam, on its own path."""
    pkg = tmp_path / "sglang" / "srt" / "layers" / "attention"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "sglang", tmp_path / "sglang" / "srt", tmp_path / "sglang" / "srt" / "layers", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "dsa_backend.py").write_text(ENGINE)
    (tmp_path / "script.py").write_text(SCRIPT)
    return tmp_path


def run(args, cwd, env):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_copytune_run_patches_the_engine_on_import(fake_engine, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(fake_engine), "COPYTUNE_CACHE": str(tmp_path / "c.db")}
    done = run([sys.executable, "-m", "copytune", "run", "--", sys.executable, "script.py"], fake_engine, env)
    assert done.returncode == 0, done.stderr
    assert "patched: sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnBackend._copy_base_replay_buffers," \
           "sglang.srt.layers.attention.dsa_backend.DeepseekSparseAttnMultiStepBackend" in done.stdout
    assert "| served: 1" in done.stdout
    assert "copytune: active in process" in done.stderr


def test_without_copytune_run_the_engine_is_untouched(fake_engine):
    done = run([sys.executable, "script.py"], fake_engine, {**os.environ, "PYTHONPATH": str(fake_engine)})
    assert done.returncode != 0 and "the engine's own copies ran" in done.stderr


def test_autoload_env_puts_the_folder_first_once_and_keeps_the_rest(tmp_path):
    env = autoload_env({"PYTHONPATH": f"/a{os.pathsep}{FOLDER}{os.pathsep}/b"}, tmp_path / "c.db")
    assert env["PYTHONPATH"].split(os.pathsep) == [FOLDER, "/a", "/b"]
    assert env["COPYTUNE_CACHE"] == str(tmp_path / "c.db")


def test_an_existing_sitecustomize_still_runs_and_keeps_its_effects(fake_engine, tmp_path):
    """The sitecustomize copytune shadows runs as site.py would run it: its sys.path changes stay."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os, sys\nos.environ['OTHER_SITECUSTOMIZE'] = 'ran'\n"
                                            "sys.path.append('/added/by/other')\n")
    env = autoload_env({**os.environ, "PYTHONPATH": f"{other}{os.pathsep}{fake_engine}"})
    probe = "import os, sys; print(os.environ.get('OTHER_SITECUSTOMIZE'), '/added/by/other' in sys.path)"
    done = run([sys.executable, "-c", probe], tmp_path, env)
    assert done.stdout.strip() == "ran True", done.stderr


def test_a_failing_sitecustomize_is_reported_not_hidden(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("raise RuntimeError('broken site setup')\n")
    env = autoload_env({**os.environ, "PYTHONPATH": str(other)})
    done = run([sys.executable, "-c", "print('started')"], tmp_path, env)
    assert done.stdout.strip() == "started" and "broken site setup" in done.stderr


def test_a_missing_command_is_one_line(tmp_path):
    done = run([sys.executable, "-m", "copytune", "run", "--", "no-such-command-xyz"], tmp_path, dict(os.environ))
    assert done.returncode == 1 and "Error: cannot run 'no-such-command-xyz'" in done.stderr
    assert "Traceback" not in done.stderr
