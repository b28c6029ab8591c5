import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from copytune import Dispatcher, get_strategy
from copytune.cli import main


def test_info_lists_every_strategy_with_its_availability():
    result = CliRunner().invoke(main, ["info", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "device   cpu (CPU)" in result.output
    for name in ("torch_per_copy", "torch_foreach", "triton_unified", "triton_persistent"):
        assert f"  {name}" in result.output
    assert "torch_per_copy     available" in result.output


def test_info_bad_device_is_one_line_error():
    result = CliRunner().invoke(main, ["info", "--device", "nonsense"])
    assert result.exit_code == 1
    assert result.output.startswith("Error:") and "Traceback" not in result.output


def test_show_lists_tuned_winners_with_speedup(tmp_path):
    path = tmp_path / "c.db"
    d = Dispatcher(path, pool={n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")})
    buf = torch.zeros(64, 128, dtype=torch.int32)
    d.copy([(torch.ones(20, dtype=torch.int32), torch.zeros(20, dtype=torch.int32)),
            (torch.ones(20, 100, dtype=torch.int32), buf[:20, :100])])
    result = CliRunner().invoke(main, ["show", "--cache", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["device", "signature", "mode", "winner"]
    assert "2 copies: 1d[≤32]×4B, 2d[≤32×128]×4B" in lines[2] and " eager " in lines[2] and lines[2].endswith("×")


def test_show_empty_and_broken_caches(tmp_path):
    result = CliRunner().invoke(main, ["show", "--cache", str(tmp_path / "none.db")])
    assert result.exit_code == 0 and "no tuned entries" in result.output
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"nope" * 100)
    result = CliRunner().invoke(main, ["show", "--cache", str(bad)])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot read the cache")


def test_tune_nsa_fills_the_cache_and_is_idempotent(tmp_path):
    from copytune.cache.store import Store

    cache = str(tmp_path / "c.db")
    args = ["tune", "--model", "nsa", "--batch-sizes", "1,3,4", "--max-len", "64", "--mode", "eager",
            "--device", "cpu", "--cache", cache]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    rows = Store(cache).rows()
    assert len(rows) == 2  # bs 3 and 4 share a bucket
    assert "3 batches, 2 keys" in first.output and "tuned" in first.output
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "tuned" not in second.output.split("origin", 1)[1]
    assert " cache" in second.output and len(Store(cache).rows()) == 2


def test_tune_unknown_model_lists_the_known_ones(tmp_path):
    result = CliRunner().invoke(main, ["tune", "--model", "llama", "--cache", str(tmp_path / "c.db")])
    assert result.exit_code == 1 and "unknown model 'llama'; known: nsa" in result.output
    assert "Traceback" not in result.output


def test_bench_prints_every_strategy_the_call_site_and_large_copies_against_per_copy_torch(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--bs", "2,4", "--max-len", "64", "--large", "1", "--device", "cpu",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("nsa decode bs=2 max_len=64: 6 copies")
    assert any(ln.startswith("nsa decode bs=4 max_len=64: 6 copies") for ln in lines)
    baseline = next(ln for ln in lines if ln.startswith("torch_per_copy"))
    assert baseline.split()[-1] == "1.00"
    assert any(ln.startswith("torch_foreach") for ln in lines)
    assert any(ln.startswith("engine copy_ sequence") for ln in lines)
    assert any(ln.startswith("copytune batched_copy_metadata") for ln in lines)
    assert any(ln.startswith("large: 1 MiB, 2-D strided") for ln in lines)
    assert "engine comparison skipped: it needs a CUDA device" in result.output  # one line, no traceback
    results = json.loads(out.read_text())
    assert [p["bs"] for p in results["points"]] == [2, 4] and len(results["large"]) == 2
    assert results["engine"] is None and results["interrupted"] is False
    for point in results["points"]:
        names = [r["name"] for r in point["rows"]]
        assert names[0] == "torch_per_copy" and "copytune batched_copy_metadata" in names
        assert all(r["eager_us"] > 0 for r in point["rows"] if r["name"].startswith(("torch", "copytune", "engine")))


def _count_measures(monkeypatch, interrupt_on: int | None = None) -> list[str]:
    """Calls of ``benchmark.measure`` and of the tuner pass before it, by name; Ctrl-C pressed on measure call
    ``interrupt_on``."""
    from copytune import benchmark

    calls, measure, steps = [], benchmark.measure, benchmark.strategy_steps_by_mode

    def counted(*args):
        calls.append("measure")
        if calls.count("measure") == interrupt_on:
            raise KeyboardInterrupt
        return measure(*args)
    monkeypatch.setattr(benchmark, "measure", counted)
    monkeypatch.setattr(benchmark, "strategy_steps_by_mode", lambda *a: calls.append("tune") or steps(*a))
    return calls


BENCH = ["bench", "--bs", "1,2", "--max-len", "64", "--large", "1", "--engine", "none", "--device", "cpu"]


@pytest.mark.parametrize(("interrupt_on", "points", "large"), [(2, 1, 0), (4, 2, 1)])
def test_bench_interrupted_keeps_the_points_measured_so_far(tmp_path, monkeypatch, interrupt_on, points, large):
    calls = _count_measures(monkeypatch, interrupt_on)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [*BENCH, "--json", str(out)])
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert calls.count("measure") == interrupt_on and calls[-1] == "measure"  # stopped there, nothing after
    assert result.output.count("torch_per_copy") == points + large  # each measured point's table is printed
    assert ("nsa decode bs=2" in result.output) == (points == 2)
    assert result.output.rstrip().splitlines()[-1] == f"bench interrupted after {points + large} of 4 points: " \
                                                      "the results above are partial"
    results = json.loads(out.read_text())
    assert results["interrupted"] is True and results["engine"] is None
    assert [p["bs"] for p in results["points"]] == [1, 2][:points] and len(results["large"]) == large
    assert results["points"][0]["rows"][0]["name"] == "torch_per_copy"


def test_bench_times_every_strategy_when_the_tuners_timings_did_not_repeat(tmp_path, monkeypatch):
    """A noisy host makes a tune refuse to store anything; a bench stores nothing and times every strategy again
    itself, so it goes on with the tuner's parameters (it failed with exit 1 on a busy GPU host's CPU run)."""
    from copytune import tuner

    real = tuner.tune

    def noisy(*args, **kwargs):
        raise tuner.NoisyTiming("timings did not repeat (scripted); nothing stored", real(*args, **kwargs).timings)
    monkeypatch.setattr(tuner, "tune", noisy)
    result = CliRunner().invoke(main, ["bench", "--bs", "1", "--max-len", "64", "--large", "none", "--engine",
                                       "none", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "torch_per_copy" in result.output and "torch_foreach" in result.output


def test_bench_never_times_a_candidate_that_failed_its_check(monkeypatch):
    """A strategy whose candidate the tuner excluded (wrong bytes after timing, say) has a reason, not a row."""
    from copytune import CopyPlan, benchmark, tuner

    real = tuner.tune

    def one_excluded(*args, **kwargs):
        result = real(*args, **kwargs)
        for t in result.timings:
            if t.strategy == "torch_foreach":
                t.reason = "wrong bytes in pair 0 after timing"
        return result
    plan = CopyPlan.from_pairs([(torch.arange(9, dtype=torch.int32), torch.zeros(9, dtype=torch.int32))])
    monkeypatch.setattr(tuner, "tune", one_excluded)
    steps, notes = benchmark.strategy_steps(plan, torch.device("cpu"), "eager")
    assert "torch_foreach" not in steps and "wrong bytes" in notes["torch_foreach"] and "torch_per_copy" in steps


def test_bench_plot_without_matplotlib_is_one_line_before_measuring(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    calls = _count_measures(monkeypatch)
    result = CliRunner().invoke(main, [*BENCH, "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and result.output == "Error: --plot needs matplotlib: pip install matplotlib\n"
    assert calls == [] and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("option", ["--plot", "--json"])
def test_bench_output_into_a_missing_folder_is_one_line_before_measuring(tmp_path, monkeypatch, option):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))  # present or not on this host
    calls = _count_measures(monkeypatch)
    result = CliRunner().invoke(main, [*BENCH, option, str(tmp_path / "missing" / "out")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {option} ") and "does not exist" in result.output
    assert calls == []


def test_bench_call_site_check_catches_wrong_bytes():
    """The bench checks the call site bit-exact before timing it: a refresh that skips a copy is refused."""
    from copytune.models import get_profile

    site = get_profile("nsa").call_site(3, 40, "decode", torch.device("cpu"), 2)
    site.check(site.engine)
    with pytest.raises(AssertionError, match="other bytes"):
        site.check(lambda x: [d.copy_(s) for s, d in site.pairs(x)[:-1]])


def test_every_command_explains_itself_with_an_example():
    for name, command in main.commands.items():
        assert "Example: copytune" in (command.help or ""), name


@pytest.mark.parametrize("args", [["show"], ["show", "--json"], ["export", "-"], ["clear"]])
def test_read_only_commands_create_no_cache_file(tmp_path, args):
    path = tmp_path / "nowhere" / "cache.db"
    result = CliRunner().invoke(main, [*args, "--cache", str(path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "nowhere").exists()


def test_import_dry_run_creates_no_cache_file(tmp_path):
    bundle = tmp_path / "b.json"
    assert CliRunner().invoke(main, ["export", str(bundle), "--cache", str(tmp_path / "src.db")]).exit_code == 0
    path = tmp_path / "nowhere" / "cache.db"
    result = CliRunner().invoke(main, ["import", str(bundle), "--dry-run", "--cache", str(path)])
    assert result.exit_code == 0 and "would import" in result.output, result.output
    assert not (tmp_path / "nowhere").exists()


def test_export_into_a_missing_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "missing" / "b.json"), "--cache",
                                       str(tmp_path / "c.db")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["info"], ["tune", "--model", "nsa", "--batch-sizes", "1", "--max-len", "64"],
                                     ["bench", "--bs", "1", "--max-len", "64", "--large", "none"]])
@pytest.mark.parametrize("device", ["gpu", "cuda:99", "meta"])
def test_a_device_that_is_not_here_is_one_line(tmp_path, command, device):
    result = CliRunner().invoke(main, [*command, "--device", device, *(["--cache", str(tmp_path / "c.db")]
                                                                        if command[0] == "tune" else [])])
    assert result.exit_code == 1 and "--device" in result.output and "Traceback" not in result.output, \
        result.output
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize("kind", ["corrupt", "unwritable"])
def test_tune_that_could_not_save_exits_1(tmp_path, kind):
    """A provisioning script must not believe the node is tuned when the cache file is unusable."""
    cache = tmp_path / "c.db"
    if kind == "corrupt":
        cache.write_bytes(b"not a database, a user's notes\n" * 40)
    else:  # a path no process can create (root ignores file modes, not /proc)
        cache = Path("/proc/copytune-test/c.db")
    result = CliRunner().invoke(main, ["tune", "--model", "nsa", "--batch-sizes", "1", "--max-len", "64", "--mode",
                                       "eager", "--device", "cpu", "--cache", str(cache)])
    assert result.exit_code == 1 and "the winners were not saved" in result.output, result.output
    if kind == "corrupt":
        assert cache.read_bytes() == b"not a database, a user's notes\n" * 40


@pytest.mark.parametrize("version", ["abc", "2.0", None])
@pytest.mark.parametrize("command", [["show"], ["export", "{out}"], ["clear"], ["import", "{bundle}"]])
def test_a_cache_of_a_foreign_schema_version_is_one_line_everywhere(tmp_path, version, command):
    import sqlite3

    from copytune.cache.store import Store

    cache = tmp_path / "c.db"
    Store(cache).rows()  # creates the schema
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (version,))
    before = cache.read_bytes()
    bundle = tmp_path / "b.json"
    bundle.write_text('{"format": "copytune-bundle", "version": 1, "entries": []}')
    args = [a.format(out=tmp_path / "out.json", bundle=bundle) for a in command]
    result = CliRunner().invoke(main, [*args, "--cache", str(cache)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert cache.read_bytes() == before


def test_tune_on_a_cpu_says_so_and_skips_graph_mode(tmp_path):
    cache = str(tmp_path / "c.db")
    base = ["tune", "--model", "nsa", "--batch-sizes", "1", "--max-len", "64", "--device", "cpu", "--cache", cache]
    result = CliRunner().invoke(main, [*base, "--mode", "both"])
    assert result.exit_code == 0, result.output
    assert "never applied to a GPU" in result.output and "graph mode skipped" in result.output
    from copytune.cache.store import Store

    assert {r["mode"] for r in Store(cache).rows()} == {"eager"}
    graph = CliRunner().invoke(main, [*base, "--mode", "graph"])
    assert graph.exit_code == 1 and "--mode graph needs a CUDA device" in graph.output


def test_tune_retune_times_every_key_again(tmp_path):
    from copytune.cache.store import Store

    cache = str(tmp_path / "c.db")
    args = ["tune", "--model", "nsa", "--batch-sizes", "1,3,4", "--max-len", "64", "--mode", "eager", "--device",
            "cpu", "--cache", cache]
    assert CliRunner().invoke(main, args).exit_code == 0
    stamps = {r["key"]: r["tuned_at"] for r in Store(cache).rows()}
    import time

    time.sleep(1.1)  # tuned_at has one-second resolution
    result = CliRunner().invoke(main, [*args, "--retune"])
    assert result.exit_code == 0, result.output
    assert result.output.split("origin", 1)[1].count("tuned") == 3  # every batch, each key timed once
    assert all(r["tuned_at"] > stamps[r["key"]] for r in Store(cache).rows())


def test_every_command_that_touches_a_cache_takes_cache():
    """--cache (and $COPYTUNE_CACHE) on every command that reads or writes winners; the others touch none (bench
    tunes into a temporary cache, info and build read no winners)."""
    touching = {"show", "export", "import", "clear", "tune", "run"}
    for name, command in main.commands.items():
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert ("--cache" in options) == (name in touching), name
