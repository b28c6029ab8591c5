"""Export/import bundles: round trip, merge policy, foreign devices, and bad bundles that change nothing."""

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from copytune.cache.bundle import MAX_BUNDLE_BYTES, BundleError, make_bundle, parse_bundle
from copytune.cache.store import Store
from copytune.cli import main
from copytune.signature import make_key

CPU = {"kind": "cpu", "machine": "x86_64", "cpus": 2, "interpret": True, "torch": "t", "triton": "x",
       "copytune": "0.1.0"}
GPU = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132, "memory_gib": 80,
       "driver": 13000, "cuda_runtime": "13.0", "torch": "2.11.0", "triton": "3.6.0", "copytune": "0.1.0"}


PARAMS = {"cuda_ext": {"unroll": 4}, "triton_unified": {"block": 1024, "num_warps": 4}, "torch_foreach": {},
          "triton_persistent": {"block": 1024, "num_warps": 4, "programs_per_sm": 4}}


def entry(bs=32, time_us=5.0, strategy="cuda_ext", device=GPU, mode="eager", params=None):
    sig = [[4, "1d", 1, bs, 16], [4, "2d", bs, 2048, 16]]
    return {"key": make_key(device, sig, mode), "device": device, "signature": sig, "mode": mode,
            "strategy": strategy, "params": PARAMS.get(strategy, {}) if params is None else params, "time_us": time_us,
            "baseline_us": 50.0,
            "timings": [{"strategy": strategy, "params": {}, "time_us": time_us, "reason": None}],
            "tuned_at": "2026-11-25T12:00:00+00:00", "copytune_version": "0.1.0"}


def write_bundle(path, entries):
    path.write_text(json.dumps(make_bundle(entries)))
    return str(path)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def test_round_trip_into_an_empty_cache(tmp_path):
    src = Store(tmp_path / "src.db")
    rows = [entry(32), entry(64, strategy="triton_unified"), entry(32, device=CPU, strategy="torch_foreach")]
    src.put_many(rows)
    out = cli("export", str(tmp_path / "b.json"), "--all-devices", "--cache", str(tmp_path / "src.db"))
    assert out.exit_code == 0 and "exported 3 entries" in out.output
    res = cli("import", str(tmp_path / "b.json"), "--cache", str(tmp_path / "dst.db"))
    assert res.exit_code == 0 and "imported: 3 added, 0 replaced, 0 kept" in res.output
    key = lambda r: r["key"]  # noqa: E731
    assert sorted(Store(tmp_path / "dst.db").rows(), key=key) == sorted(src.rows(), key=key)


def test_export_defaults_to_this_device_only(tmp_path):
    Store(tmp_path / "c.db").put_many([entry(32)])  # an H100 entry; this test machine is a CPU
    out = cli("export", "-", "--cache", str(tmp_path / "c.db"))
    assert out.exit_code == 0 and json.loads(out.output)["entries"] == []


def test_merge_keeps_the_faster_entry_unless_replace(tmp_path):
    store = Store(tmp_path / "c.db")
    store.put_many([entry(32, time_us=5.0), entry(64, time_us=9.0)])
    bundle = write_bundle(tmp_path / "b.json", [entry(32, time_us=7.0), entry(64, time_us=4.0), entry(128)])
    res = cli("import", bundle, "--cache", str(tmp_path / "c.db"))
    assert "1 added, 1 replaced, 1 kept" in res.output
    times = {r["signature"][0][3]: r["time_us"] for r in store.rows()}
    assert times == {32: 5.0, 64: 4.0, 128: 5.0}
    res = cli("import", bundle, "--replace", "--cache", str(tmp_path / "c.db"))
    assert "0 added, 3 replaced, 0 kept" in res.output
    assert {r["signature"][0][3]: r["time_us"] for r in store.rows()}[32] == 7.0


def test_dry_run_writes_nothing(tmp_path):
    bundle = write_bundle(tmp_path / "b.json", [entry(32)])
    res = cli("import", bundle, "--dry-run", "--cache", str(tmp_path / "c.db"))
    assert res.exit_code == 0 and "would import: 1 added" in res.output
    assert not (tmp_path / "c.db").exists() or Store(tmp_path / "c.db").rows() == []


def test_foreign_device_entries_are_kept_but_never_applied(tmp_path):
    import torch

    from copytune import CopyPlan, Dispatcher

    pairs = [(torch.ones(32, dtype=torch.int32), torch.zeros(32, dtype=torch.int32))]
    d = Dispatcher(tmp_path / "c.db", tune=False)
    plan = CopyPlan.from_pairs(pairs)
    foreign = entry(32)
    foreign = {**foreign, "signature": [list(map(lambda v: v, s)) for s in __import__(
        "copytune.signature").signature.shape_signature(plan)]}
    foreign["key"] = make_key(GPU, foreign["signature"], "eager")
    res = cli("import", write_bundle(tmp_path / "b.json", [foreign]), "--cache", str(tmp_path / "c.db"))
    assert res.exit_code == 0 and len(Store(tmp_path / "c.db").rows()) == 1
    assert d.choose(plan).origin == "default"  # same shapes, other device: not used here


def _bad_bundles(tmp_path):
    good = json.dumps(make_bundle([entry(32)]))
    return {
        "truncated": good[: len(good) // 2],
        "not-json": "copytune? no",
        "wrong-format": json.dumps({"format": "other", "version": 1, "entries": []}),
        "wrong-version": good.replace('"version": 1', '"version": 2'),
        "entries-not-list": json.dumps({**make_bundle([]), "entries": {}}),
        "unknown-strategy": json.dumps(make_bundle([entry(32, strategy="warp_drive")])),
        "negative-time": json.dumps(make_bundle([{**entry(32), "time_us": -1.0}])),
        "nan-time": json.dumps(make_bundle([{**entry(32), "baseline_us": float("nan")}])),
        "string-time": json.dumps(make_bundle([{**entry(32), "time_us": "fast"}])),
        "forged-key": json.dumps(make_bundle([{**entry(32), "key": "0" * 32}])),
        "bad-signature": json.dumps(make_bundle([{**entry(32), "signature": [[4, "3d", 1, 1, 16]]}])),
        "params-nested": json.dumps(make_bundle([{**entry(32), "params": {"a": {"b": 1}}}])),
        "huge": "[" + " " * (MAX_BUNDLE_BYTES + 10) + "]",
    }


@pytest.mark.parametrize("name", sorted(_bad_bundles(None)))
def test_bad_bundle_exits_1_and_leaves_the_cache_byte_for_byte(tmp_path, name):
    cache = tmp_path / "c.db"
    store = Store(cache)
    store.put_many([entry(64)])
    store.close()  # checkpoints the WAL: from here the file is what a later write would change
    before = cache.read_bytes()
    path = tmp_path / "bad.json"
    path.write_text(_bad_bundles(tmp_path)[name])
    res = cli("import", str(path), "--cache", str(cache))
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert cache.read_bytes() == before


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400))
def test_fuzzed_bundles_are_rejected_cleanly(data):
    with pytest.raises(BundleError):
        parse_bundle(data)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["key", "mode", "strategy", "params", "signature", "time_us", "timings", "device"]),
       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
def test_fuzzed_fields_are_rejected_or_valid(field, value):
    doc = json.dumps(make_bundle([{**entry(32), field: value}]), allow_nan=True)
    try:
        parse_bundle(doc)
    except BundleError as exc:
        assert str(exc).startswith("entry 0:")


def test_clear_all_and_device_only(tmp_path):
    from copytune.cli import _this_device_fingerprint

    cache = str(tmp_path / "c.db")
    here = _this_device_fingerprint()  # the GPU's on a GPU machine, else the CPU's
    Store(cache).put_many([entry(32), entry(32, device=here, strategy="torch_foreach")])
    res = cli("clear", "--device-only", "--cache", cache)
    assert res.exit_code == 0 and "removed 1 entries" in res.output
    assert [r["device"] for r in Store(cache).rows()] == [GPU]
    assert "removed 1 entries" in cli("clear", "--cache", cache).output and Store(cache).rows() == []


def test_show_json(tmp_path):
    cache = str(tmp_path / "c.db")
    Store(cache).put_many([entry(32)])
    res = cli("show", "--json", "--cache", cache)
    assert res.exit_code == 0 and json.loads(res.output)[0]["strategy"] == "cuda_ext"


@pytest.mark.parametrize("strategy, params, why", [
    ("triton_unified", {"block": 3, "num_warps": 4}, "block must be one of 16..65536 (powers of two), got 3"),
    ("triton_unified", {"block": -1024, "num_warps": 4}, "block must be one of"),
    ("triton_unified", {"block": "1024", "num_warps": 4}, "got '1024'"),
    ("triton_unified", {"block": None, "num_warps": 4}, "got None"),
    ("triton_unified", {"block": 1024.0, "num_warps": 4}, "got 1024.0"),
    ("triton_unified", {}, "takes ['block', 'num_warps'], got []"),
    ("triton_unified", {"BLOCK": 1024, "num_warps": 4}, "got ['BLOCK', 'num_warps']"),
    ("triton_persistent", {"block": 1024, "num_warps": 4, "programs_per_sm": 0}, "programs_per_sm must be one of"),
    ("cuda_ext", {"unroll": 3}, "unroll must be one of"),
    ("cuda_ext", {"unroll": True}, "unroll must be one of"),
    ("torch_foreach", {"block": 1024}, "takes no parameters"),
])
def test_parameters_a_strategy_cannot_run_are_refused_and_nothing_is_written(tmp_path, strategy, params, why):
    """What imports is guaranteed to run and copy exactly: parameters outside the strategy's own schema (that
    would raise on the serving path, or silently copy nothing) fail the import, naming the entry and the reason."""
    path = write_bundle(tmp_path / "b.json", [entry(32), entry(64, strategy=strategy, params=params)])
    result = cli("import", path, "--cache", str(tmp_path / "c.db"))
    assert result.exit_code == 1 and "entry 1: params" in result.output and why in result.output, result.output
    assert "Traceback" not in result.output
    assert Store(tmp_path / "c.db").rows() == []


@pytest.mark.parametrize("extra", [{"STRATEGY": "torch_foreach"}, {"Time_us": -1}, {"PARAMS": {}}, {"note": "x"}])
def test_fields_that_are_not_columns_are_refused_by_name(tmp_path, extra):
    """SQLite matches column names without case: "Time_us": -1 would overwrite time_us. Only exact names import."""
    path = write_bundle(tmp_path / "b.json", [{**entry(32), **extra}])
    result = cli("import", path, "--cache", str(tmp_path / "c.db"))
    assert result.exit_code == 1 and f"entry 0: unknown fields {sorted(extra)}" in result.output, result.output
    assert Store(tmp_path / "c.db").rows() == []


@pytest.mark.parametrize("name, make", [
    ("time 1e400", lambda: json.dumps(make_bundle([entry(32)])).replace('"time_us": 5.0', '"time_us": 1e400')),
    ("time 2**63", lambda: json.dumps(make_bundle([entry(32, time_us=2 ** 63)]))),
    ("lone surrogate", lambda: json.dumps(make_bundle([{**entry(32), "tuned_at": "T"}])).replace('"T"', '"\\ud800"')),
    ("deep json", lambda: json.dumps(make_bundle([entry(32)]))[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000
     + "}"),
])
def test_hostile_values_are_one_line_and_change_nothing(tmp_path, name, make):
    path = tmp_path / "b.json"
    path.write_text(make())
    result = cli("import", str(path), "--cache", str(tmp_path / "c.db"))
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.splitlines()) == 1, \
        result.output
    assert Store(tmp_path / "c.db").rows() == []


def test_a_deeply_nested_cache_row_is_a_miss_not_a_crash(logged, tmp_path):
    import sqlite3

    store = Store(tmp_path / "c.db")
    store.put(entry(32))
    conn = sqlite3.connect(tmp_path / "c.db")
    conn.execute("UPDATE winners SET params = ?", ("[" * 100_000 + "]" * 100_000,))
    conn.commit()
    conn.close()
    with logged("ignored"):
        assert Store(tmp_path / "c.db").get(entry(32)["key"]) is None


def test_concurrent_imports_of_the_same_keys_keep_the_faster_entries(tmp_path):
    """Two processes importing a fast and a slow bundle at once: the merge reads and writes in one transaction,
    so the faster entry stands whichever finishes last (before, 1 run in 6 kept the slower)."""
    import os
    import subprocess
    import sys

    fast = write_bundle(tmp_path / "fast.json", [entry(bs, time_us=1.0) for bs in (8, 16, 32, 64)])
    slow = write_bundle(tmp_path / "slow.json", [entry(bs, time_us=9.0) for bs in (8, 16, 32, 64)])
    for attempt in range(4):
        cache = tmp_path / f"c{attempt}.db"
        Store(cache).put(entry(8, time_us=5.0))  # the file exists: both processes merge into it
        procs = [subprocess.Popen([sys.executable, "-m", "copytune", "import", b, "--cache", str(cache)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
                 for b in ((fast, slow) if attempt % 2 else (slow, fast))]
        outs = [p.communicate(timeout=120)[0].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert sorted(r["time_us"] for r in Store(cache).rows()) == [1.0] * 4, outs
