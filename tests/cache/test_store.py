"""The winner cache: round trip, and every kind of bad file degrading to memory without touching the file."""

import logging
import sqlite3

import pytest

from copytune.cache.store import SCHEMA_VERSION, Store


def row(key="k1", strategy="torch_foreach", time_us=2.0):
    return {"key": key, "device": {"kind": "cpu"}, "signature": [[4, "1d", 1, 8, 16]], "mode": "eager",
            "strategy": strategy, "params": {"block": 1024}, "time_us": time_us, "baseline_us": 8.0,
            "timings": [{"strategy": strategy, "time_us": time_us}], "tuned_at": "2026-11-25T00:00:00+00:00",
            "copytune_version": "0.1.0"}


def test_round_trip_and_upsert(tmp_path):
    store = Store(tmp_path / "c.db")
    assert store.get("k1") is None
    store.put(row())
    store.put(row(time_us=1.5))
    got = store.get("k1")
    assert got["params"] == {"block": 1024} and got["time_us"] == 1.5 and got["device"] == {"kind": "cpu"}
    assert len(store.rows()) == 1
    assert store.delete() == 1 and store.rows() == []


def test_wal_and_schema_version(tmp_path):
    Store(tmp_path / "c.db").put(row())
    conn = sqlite3.connect(tmp_path / "c.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COPYTUNE_CACHE", str(tmp_path / "env.db"))
    assert Store().path == tmp_path / "env.db"


def _cache_bytes(path, *sql: str) -> bytes:
    """A one-row cache file, optionally edited by ``sql``, checkpointed so its bytes are all in the main file."""
    s = Store(path)
    s.put(row())
    s.close()
    conn = sqlite3.connect(path)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path.read_bytes()


def _valid_db_bytes(tmp_path):
    return _cache_bytes(tmp_path / "valid.db")


def _newer_schema(tmp_path):
    return _cache_bytes(tmp_path / "newer.db", "UPDATE meta SET value = '99' WHERE name = 'schema_version'")


def _foreign(tmp_path):
    conn = sqlite3.connect(tmp_path / "foreign.db")
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    conn.execute("INSERT INTO photos (path) VALUES ('holiday.jpg')")
    conn.commit()
    conn.close()
    return (tmp_path / "foreign.db").read_bytes()


@pytest.mark.parametrize("make, match", [
    (lambda p: b"this is not a database, it is a user's notes\n" * 50, "not a database"),
    (lambda p: _valid_db_bytes(p)[:1500], "malformed|not a database|disk image"),
    (lambda p: bytes(range(256)) * 40, "not a database"),
    (_newer_schema, "schema 99"),
    (_foreign, "something else"),
], ids=["text", "truncated", "garbage", "newer-schema", "foreign-sqlite"])
def test_bad_file_is_a_warning_and_never_rewritten(logged, caplog, tmp_path, make, match):
    path = tmp_path / "cache.db"
    content = make(tmp_path)
    path.write_bytes(content)
    store = Store(path)
    with logged(match):
        assert store.get("k1") is None
    caplog.clear()
    store.put(row())  # one warning only, then silent no-ops
    assert store.rows() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert store.disabled
    assert path.read_bytes() == content


def test_invalid_row_is_a_miss_with_one_warning(logged, tmp_path):
    store = Store(tmp_path / "c.db")
    store.put(row())
    conn = sqlite3.connect(tmp_path / "c.db")
    conn.execute("UPDATE winners SET params = 'not json', time_us = -1")
    conn.commit()
    with logged("ignored"):
        assert store.get("k1") is None
    assert not store.disabled


def test_unwritable_location_warns_and_continues(logged, tmp_path):
    """/proc refuses new files even to root (CI runs as root, so a chmod'ed directory would not do)."""
    store = Store("/proc/copytune-test/cache.db")
    with logged("disabled"):
        store.put(row())
    assert store.get("k1") is None and store.rows() == []


@pytest.mark.parametrize("version", ["'abc'", "'2.0'", "NULL", "2"])
def test_a_foreign_schema_version_of_any_type_disables_the_cache_and_copies_still_run(logged, tmp_path, version):
    """A non-integer schema_version made every batched_copy raise: now it is one warning and memory only."""
    import torch

    from copytune import Dispatcher

    path = tmp_path / "cache.db"
    before = _cache_bytes(path, f"UPDATE meta SET value = {version} WHERE name = 'schema_version'")
    src, dst = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    with logged("cache disabled.*has cache schema"):
        Dispatcher(path).copy([(src, dst)])
    assert torch.equal(src, dst) and path.read_bytes() == before


def test_read_only_stores_create_nothing(tmp_path):
    path = tmp_path / "new" / "folder" / "cache.db"
    store = Store(path, create=False)
    assert store.rows() == [] and store.get("k") is None and store.delete() == 0
    assert not path.exists() and not (tmp_path / "new").exists() and store.disabled is None


def test_a_damaged_table_page_is_found_before_anything_writes(logged, tmp_path):
    """Garbage in the winners table's root page: the store refuses the file at open (one warning) and never
    writes into it — sqlite-utils' upsert probe created, committed and dropped a table there before."""
    import os

    path = tmp_path / "cache.db"
    _cache_bytes(path)
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'winners'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * page:root * page] = os.urandom(page)
    path.write_bytes(bytes(data))
    store = Store(path)
    with logged("damaged|malformed"):
        store.put(row("k2"))
    assert path.read_bytes() == bytes(data) and store.disabled
