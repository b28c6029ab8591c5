"""The SQLite winner cache (sqlite-utils): one row per tuning key, written as soon as it is measured.

Nothing here may take the serving path down or lose a user's file: a corrupt, foreign, newer-schema, unreadable
or unwritable file disables the store with one warning (callers then serve from memory) and is never rewritten.
A lock held past the busy timeout skips that one read or write with a warning.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlite_utils

from copytune.log import logger

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0  # commands (tune, import, clear): wait for another process's write
SERVING_BUSY_TIMEOUT_S = 0.25  # a serving call waits at most this long; then the row is skipped (memory serves)
WINNER_COLUMNS = {
    "key": str, "device": str, "signature": str, "mode": str, "strategy": str, "params": str,
    "time_us": float, "baseline_us": float, "timings": str, "tuned_at": str, "copytune_version": str,
}


class CacheUnavailable(RuntimeError):
    """The cache file cannot be used; the reason is the message."""


class _Absent(Exception):
    """No cache file, and this store may not create one: it reads as empty."""


def default_path() -> Path:
    """``$COPYTUNE_CACHE``, else ``$XDG_CACHE_HOME/copytune/cache.db`` (``~/.cache`` by default)."""
    if os.environ.get("COPYTUNE_CACHE"):
        return Path(os.environ["COPYTUNE_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "copytune" / "cache.db"


class Store:
    """Winners by key. Opened lazily; every method degrades to a miss/no-op once the file proved unusable."""

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True,
                 busy_timeout_s: float = BUSY_TIMEOUT_S):
        """``create=False``: never create the file or its folder (read-only commands, dry runs); a missing file
        reads as empty. ``busy_timeout_s``: the longest wait on another process's write lock; past it the read or
        write is skipped with one warning."""
        self.path = Path(path) if path is not None else default_path()
        self.create, self.busy_timeout_s = create, busy_timeout_s
        self.disabled: str | None = None  # the reason, once the file proved unusable
        self._db: sqlite_utils.Database | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # -- opening ------------------------------------------------------------------------------------------------
    def _open(self) -> sqlite_utils.Database | None:
        if self._db is not None or self.disabled:
            return self._db
        try:
            self._db = self._connect()
        except _Absent:
            return None
        except Exception as exc:  # noqa: BLE001 - whatever the file holds, the serving path must not go down
            self._disable(f"{type(exc).__name__}: {exc}" if not isinstance(exc, CacheUnavailable) else str(exc))
        return self._db

    def _connect(self) -> sqlite_utils.Database:
        if not self.create and not self.path.exists():
            raise _Absent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        tables = set(db.table_names())  # raises DatabaseError on a corrupt or non-SQLite file
        if tables and not {"winners", "meta"} <= tables:
            raise CacheUnavailable(f"{self.path} is an SQLite file of something else (tables: {sorted(tables)})")
        if tables:  # before anything could write: sqlite-utils' upsert probe commits into a damaged file
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise CacheUnavailable(f"{self.path} is damaged ({problem}); it is left as it is")
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            raw = row[0] if row else None
            if str(raw) != str(SCHEMA_VERSION):  # 'abc', '2.0', NULL, 2: all foreign to this copytune
                raise CacheUnavailable(f"{self.path} has cache schema {raw}; this copytune reads {SCHEMA_VERSION}")
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            self._warn("wal", f"copytune cache {self.path}: WAL mode unavailable, concurrent writers will queue")
        if not tables and not self.create:
            raise _Absent  # an empty SQLite file: nothing to read, and nothing is written into it
        if not tables:
            with conn:  # one transaction: concurrent creators see both tables or neither
                conn.execute("BEGIN IMMEDIATE")
                db["winners"].create(WINNER_COLUMNS, pk="key", if_not_exists=True)
                db["meta"].create({"name": str, "value": str}, pk="name", if_not_exists=True)
                conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        return db

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self._warn("disabled", f"copytune cache disabled, serving from memory: {reason}")

    def _warn(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(message)

    def _run(self, what: str, fn, default=None):
        """Run ``fn(db)`` under the store's lock; a lock held too long or an I/O error is a warning, not a crash."""
        with self._lock:
            db = self._open()
            if db is None:
                return default
            try:
                return fn(db)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    self._warn(f"locked-{what}", f"copytune cache {self.path} stayed locked; {what} skipped: {exc}")
                    return default
                self._disable(f"{what} failed: {exc}")
            except sqlite3.DatabaseError as exc:
                self._disable(f"{what} failed: {exc}")
            return default

    # -- rows -----------------------------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        """The decoded row for ``key``, or None (a missing, unreadable or invalid row is a miss)."""
        row = self._run("read", lambda db: next(db["winners"].rows_where("key = ?", [key]), None))
        if row is None:
            return None
        try:
            return decode_row(row)
        except ROW_ERRORS as exc:
            self._warn(f"bad-{key}", f"copytune cache row {key[:12]} ignored: {exc}")
            return None

    def put(self, row: dict[str, Any]) -> None:
        """Upsert one winner (JSON-encoding its structured fields)."""
        encoded = encode_row(row)
        self._run("write", lambda db: db["winners"].upsert(encoded, pk="key"))

    def put_many(self, rows: list[dict[str, Any]]) -> bool:
        """Upsert ``rows`` in one transaction: all of them or, on any failure, none (False)."""
        encoded = [encode_row(r) for r in rows]

        def write(db):
            with db.conn:
                db.conn.execute("BEGIN IMMEDIATE")
                db["winners"].upsert_all(encoded, pk="key")
            return True
        return bool(self._run("write", write, default=False))

    def merge_many(self, rows: list[dict[str, Any]], take) -> list[dict[str, Any]] | None:
        """In one write transaction: read what is stored under ``rows``' keys, keep each row ``take(new, old)``
        accepts (``old`` None when absent or unreadable) and write those. Reading inside the transaction is what
        lets two concurrent merges of the same keys end with the faster entry. The taken rows; None if it could not
        write."""
        def merge(db):
            with db.conn:
                db.conn.execute("BEGIN IMMEDIATE")
                current = {}
                for raw in db["winners"].rows:
                    try:
                        current[raw["key"]] = decode_row(raw)
                    except ROW_ERRORS:
                        continue  # unreadable: replaced by whatever the merge brings
                taken = []
                for row in rows:
                    if take(row, current.get(row["key"])):
                        taken.append(row)
                        current[row["key"]] = row
                if taken:
                    db["winners"].upsert_all([encode_row(r) for r in taken], pk="key")
            return taken
        return self._run("write", merge)

    def rows(self) -> list[dict[str, Any]]:
        """Every valid row, decoded; invalid rows are skipped with a warning."""
        raw = self._run("read", lambda db: list(db["winners"].rows), default=[])
        out = []
        for row in raw:
            try:
                out.append(decode_row(row))
            except ROW_ERRORS as exc:
                self._warn(f"bad-{row.get('key')}", f"copytune cache row {str(row.get('key'))[:12]} ignored: {exc}")
        return out

    def delete(self, keys: list[str] | None = None) -> int:
        """Delete ``keys`` (all rows when None); returns how many went."""
        def drop(db):
            before = db["winners"].count
            if keys is None:
                db["winners"].delete_where()
            else:
                for key in keys:
                    db["winners"].delete_where("key = ?", [key])
            return before - db["winners"].count
        return self._run("delete", drop, default=0)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.conn.close()
                self._db = None


def encode_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for field in ("device", "signature", "params", "timings"):
        if not isinstance(out[field], str):
            out[field] = json.dumps(out[field], sort_keys=True)
    return out


# Whatever a row holds is a miss, never a crash: RecursionError is what json gives a 100k-deep document.
ROW_ERRORS = (ValueError, TypeError, KeyError, RecursionError, OverflowError)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Parse and type-check one row; raises ValueError/TypeError/KeyError on anything malformed."""
    out = {name: row[name] for name in WINNER_COLUMNS}
    for field in ("device", "signature", "params", "timings"):
        out[field] = json.loads(out[field])
    for name, kind in (("device", dict), ("signature", list), ("params", dict), ("timings", list)):
        if not isinstance(out[name], kind):
            raise TypeError(f"{name} is {type(out[name]).__name__}, expected {kind.__name__}")
    for name in ("key", "mode", "strategy"):
        if not isinstance(out[name], str) or not out[name]:
            raise TypeError(f"{name} must be a non-empty string")
    for name in ("time_us", "baseline_us"):
        if out[name] is None and name == "baseline_us":
            continue  # the baseline failed where it was tuned: the winner stands, its speedup is unknown
        if out[name] is None or not float(out[name]) >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {out[name]!r}")
        out[name] = float(out[name])
    return out
