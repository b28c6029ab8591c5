"""Versioned JSON bundles of tuned winners: tune once per GPU type, ship the result to every node.

Data only (JSON, never pickle). Import validates the whole bundle — syntax, format and version, every field's
type and range, strategy names, and that each key is the hash of its own device, signature and mode — before it
writes anything, then merges in one transaction. Entries tuned on other devices are stored as they are: their
keys carry their device fingerprint, so they are never applied to this one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from copytune.cache.store import WINNER_COLUMNS, Store
from copytune.signature import MODES, make_key

FORMAT = "copytune-bundle"
VERSION = 1
MAX_BUNDLE_BYTES = 32 * 2**20  # a full NSA sweep for one device is ~100 KiB; refuse anything absurd
MAX_ENTRIES = 100_000
MAX_US = 1e12  # a time beyond this is no measurement (2**63 does not fit SQLite's REAL as an integer)
LAYOUTS = ("1d", "2d", "strided", "nd")


class BundleError(ValueError):
    """The bundle is malformed; the message says where, in one line."""


def make_bundle(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The bundle document for ``rows`` (decoded store rows)."""
    from copytune.signature import _versions  # noqa: PLC0415

    return {"format": FORMAT, "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "producer": _versions(), "entries": rows}


def export_rows(store: Store, device_fingerprint: dict | None) -> list[dict[str, Any]]:
    """The store's valid rows, only those tuned on ``device_fingerprint`` unless it is None (all devices)."""
    rows = store.rows()
    return rows if device_fingerprint is None else [r for r in rows if r["device"] == device_fingerprint]


def parse_bundle(data: bytes | str) -> list[dict[str, Any]]:
    """Validate a bundle completely and return its entries; ``BundleError`` on the first problem."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES}")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise BundleError("not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise BundleError(f"bundle version {doc.get('version')!r}; this copytune reads version {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise BundleError("'entries' must be a list")
    if len(entries) > MAX_ENTRIES:
        raise BundleError(f"{len(entries)} entries; the limit is {MAX_ENTRIES}")
    for i, entry in enumerate(entries):
        try:
            _check_entry(entry)
            json.dumps(entry, ensure_ascii=False).encode("utf-8")  # a lone surrogate would fail in SQLite
        except UnicodeEncodeError:
            raise BundleError(f"entry {i}: a text field is not valid Unicode (a lone surrogate)") from None
        except (TypeError, ValueError, KeyError, RecursionError) as exc:
            raise BundleError(f"entry {i}: {exc if not isinstance(exc, RecursionError) else 'nested too deeply'}") \
                from None
    return entries


def _check_entry(e: Any) -> None:
    from copytune.kernels import strategies  # noqa: PLC0415

    if not isinstance(e, dict):
        raise TypeError("not an object")
    unknown = sorted(set(e) - set(WINNER_COLUMNS))  # exact names: SQLite would take "STRATEGY" as strategy
    if unknown:
        raise ValueError(f"unknown fields {unknown}; an entry holds exactly {sorted(WINNER_COLUMNS)}")
    for name in ("key", "mode", "strategy", "tuned_at", "copytune_version"):
        if not isinstance(e.get(name), str) or not e[name]:
            raise TypeError(f"{name} must be a non-empty string")
    if e["mode"] not in MODES:
        raise ValueError(f"mode {e['mode']!r} is not one of {MODES}")
    if e["strategy"] not in strategies():
        raise ValueError(f"unknown strategy {e['strategy']!r}")
    if not isinstance(e.get("device"), dict) or not all(isinstance(k, str) and _scalar(v)
                                                        for k, v in e["device"].items()):
        raise TypeError("device must be an object of scalars")
    if not isinstance(e.get("params"), dict) or not all(isinstance(k, str) and _scalar(v)
                                                        for k, v in e["params"].items()):
        raise TypeError("params must be an object of scalars")
    reason = strategies()[e["strategy"]].validate_params(e["params"])
    if reason is not None:  # what imports must run and copy exactly
        raise ValueError(f"params {json.dumps(e['params'])}: {reason}")
    _check_signature(e.get("signature"))
    for name in ("time_us", "baseline_us"):
        v = e.get(name)
        if v is None and name == "baseline_us":
            continue  # unknown: the baseline failed where the entry was tuned
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= MAX_US:
            raise ValueError(f"{name} must be a number of µs in [0, {MAX_US:g}], got {v!r}")
    if e["time_us"] == 0:
        raise ValueError("time_us must be positive")
    if not isinstance(e.get("timings"), list) or not all(isinstance(t, dict) for t in e["timings"]):
        raise TypeError("timings must be a list of objects")
    if make_key(e["device"], e["signature"], e["mode"]) != e["key"]:
        raise ValueError("key does not match its device, signature and mode")


def _check_signature(sig: Any) -> None:
    if not isinstance(sig, list) or not sig:
        raise TypeError("signature must be a non-empty list")
    for copy in sig:
        if not (isinstance(copy, list) and len(copy) == 5):
            raise TypeError("each signature entry must be [itemsize, layout, rows, cols, align]")
        itemsize, layout, rows, cols, align = copy
        ints = (itemsize, rows, cols, align)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise ValueError(f"signature sizes must be non-negative integers, got {copy}")
        if layout not in LAYOUTS or align not in (1, 2, 4, 8, 16):
            raise ValueError(f"bad signature entry {copy}")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


@dataclass
class MergePlan:
    """What an import does: rows to write, and a count of each decision."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    added: int = 0
    replaced: int = 0
    kept: int = 0
    replace: bool = False

    def take(self, new: dict[str, Any], old: dict[str, Any] | None) -> bool:
        """Per key: a new entry is added; an existing one is replaced if ``replace`` or the new one is faster."""
        if old is None:
            self.added += 1
        elif self.replace or new["time_us"] < old["time_us"]:
            self.replaced += 1
        else:
            self.kept += 1
            return False
        self.rows.append(new)
        return True

    def summary(self) -> str:
        return f"{self.added} added, {self.replaced} replaced, {self.kept} kept"


def plan_merge(store: Store, entries: list[dict[str, Any]], replace: bool = False) -> MergePlan:
    """What merging ``entries`` would do now (a dry run): see ``MergePlan.take``."""
    plan = MergePlan(replace=replace)
    existing = {r["key"]: r for r in store.rows()}
    for e in entries:
        if plan.take(e, existing.get(e["key"])):
            existing[e["key"]] = e
    return plan


def import_file(path: str | Path, store: Store, replace: bool = False, dry_run: bool = False) -> MergePlan:
    """Validate ``path`` completely, then merge it into ``store`` in one transaction (unless ``dry_run``)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is {size} bytes; the limit is {MAX_BUNDLE_BYTES}")
    entries = parse_bundle(path.read_bytes())
    if dry_run:
        plan = plan_merge(store, entries, replace)
    else:
        plan = MergePlan(replace=replace)
        if store.merge_many(entries, plan.take) is None:
            raise BundleError(f"cannot write the cache {store.path}: {store.disabled or 'it stayed locked'}")
    if store.disabled:
        raise BundleError(f"cannot use the cache: {store.disabled}")
    return plan
