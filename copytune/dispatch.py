"""Choosing and launching a strategy for a batch: memory table → SQLite cache → tuner → default.

An unbound call whose addresses and geometry match a recent batch is one dict lookup (key of ~10 attribute
reads a pair) and the winner's launch; a new batch is validated (``CopyPlan``) and keyed by its bucketed
signature; no SQL after the first lookup of a key. ``Dispatcher.bind`` goes further for call sites with stable
destinations: validation and the choice happen once, and ``BoundCopy.run(srcs)`` only swaps source addresses.

Untuned default (``tune=False`` and nothing cached): ``triton_unified`` on CUDA (one launch; 0.20× of
7 × ``copy_`` eager on an H100), else ``torch_foreach``; layouts the kernels cannot take go to ``torch_per_copy``.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from copytune.background import BackgroundTuner
from copytune.cache.store import SERVING_BUSY_TIMEOUT_S, Store
from copytune.kernels import BoundLaunch, Config, UnsupportedPlan, get_strategy, strategies
from copytune.kernels.base import BatchRunner, launch_error, returning_errors
from copytune.log import logger, warn_once
from copytune.neighbours import Neighbours
from copytune.plan import CopyPlan, as_view, bytes_meet, extent, extents_meet, span_bytes
from copytune.signature import MODES, describe_signature, device_fingerprint, make_key, shape_signature

DEFAULT_ORDER = ("triton_unified", "torch_foreach", "torch_per_copy")
# When a signature meets no tuned winner: "inline" tunes on the spot (the call waits, 0.2-0.4 s on an H200 with
# warm compilers); "deferred" serves it at once (nearest tuned bucket, else the default) and tunes it on a
# background thread, adopting the winner when done; "never" uses the cache or the default only.
TUNING = ("inline", "deferred", "never")
TUNING_ENV = "COPYTUNE_TUNING"  # the process-wide dispatcher's setting (batched_copy, the engine): default deferred
RUNNER_CACHE_SIZE = 1024
Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def default_strategy(plan: CopyPlan) -> str:
    """The untuned choice for ``plan``: the first of DEFAULT_ORDER that is usable here and supports it."""
    device = plan.device
    if device is None:
        return "torch_per_copy"
    for name in DEFAULT_ORDER:
        s = get_strategy(name)
        if (device.type == "cuda" or s.serves_cpu) and s.available(device) is None and s.supports(plan):
            return name
    return "torch_per_copy"


@dataclass(frozen=True)
class Choice:
    """What runs a key: a strategy and its tunables (a hashable Config, so a Choice is a dict key)."""

    strategy: str
    params: Config
    origin: str  # "pinned", "cache", "tuned", "default", or "interim" (served while the key tunes off the step)

    def __post_init__(self):
        if not isinstance(self.params, Config):
            object.__setattr__(self, "params", Config(self.params))


class Dispatcher:
    """Picks, remembers and launches the fastest strategy per (device, shape signature, mode).

    ``cache_path``: the SQLite cache (default ``$COPYTUNE_CACHE`` or ``~/.cache/copytune/cache.db``).
    ``mode``: ``"eager"`` when the caller launches directly (CPU launch cost counts) or ``"graph"`` when the copies
    are captured in a CUDA graph (GPU time counts). ``tuning``: one of TUNING (default ``"inline"``; ``tune=False``
    is ``"never"``). ``strategy``: pin every batch it supports to this strategy (benchmarks, tests, debugging).
    """

    def __init__(self, cache_path=None, mode: str = "eager", tune: bool = True, *, tuning: str | None = None,
                 strategy: str | None = None, store: Store | None = None, timer=None, pool=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        tuning = tuning or ("inline" if tune else "never")
        if tuning not in TUNING:
            raise ValueError(f"tuning must be one of {TUNING}, got {tuning!r}")
        self.mode, self.tuning = mode, tuning
        # the serving path never waits long on another process's cache write (SERVING_BUSY_TIMEOUT_S)
        self.store = store if store is not None else Store(cache_path, busy_timeout_s=SERVING_BUSY_TIMEOUT_S)
        self._timer, self._pool = timer, pool
        self._pinned = get_strategy(strategy) if strategy is not None else None
        self._table: dict[str, Choice] = {}
        self._keys: dict[tuple, str] = {}
        self._runners: dict[tuple, object] = {}  # exact addresses + geometry -> runner, oldest first
        self._exact = None  # the C++ exact-address cache of C++ batches (cuda_ext), made on the first one
        self._exact_run = None  # its METH_O lookup-and-launch: what copy() tries first
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._neighbours = Neighbours()  # tuned and cached winners by shape class ("deferred": interim choices)
        self._catalogued: set[torch.device] = set()  # devices whose stored rows are in _neighbours
        self._background: BackgroundTuner | None = None
        self._listeners: list = []
        self.generation = 0  # bumped whenever a winner is adopted off the step: bindings made earlier may rebind

    # -- choosing ---------------------------------------------------------------------------------------------
    def key(self, plan: CopyPlan) -> str:
        sig = shape_signature(plan)
        memo = (plan.device, tuple(map(tuple, sig)))
        key = self._keys.get(memo)
        if key is None:
            key = self._keys[memo] = make_key(device_fingerprint(plan.device), sig, self.mode)
        return key

    def choose(self, plan: CopyPlan, *, retune: bool = False) -> Choice:
        """The strategy and parameters for ``plan``: memory, else cache, else tune (as ``tuning`` says), else default.

        ``retune``: time the candidates again now (whatever ``tuning`` says) and replace what memory and the cache
        hold for this key — after a driver or library upgrade, or to overwrite a noisy measurement.
        """
        key = self.key(plan)
        choice = None if retune else self._table.get(key)
        if choice is None:
            notify = []
            with self._key_lock(key):  # one tuner per key; lookups and tuning of other keys go on meanwhile
                choice = None if retune else self._table.get(key)
                if choice is None:
                    choice = self._forced(plan) or (None if retune else self._cached(key, plan))
                if choice is None and self.tuning == "deferred" and not retune:
                    choice = self._interim(key, plan)
                tuned = None if choice is not None else self._tuned(key, plan, force=retune)
                if retune and tuned is not None:
                    choice, notify = tuned, self._adopt(key, shape_signature(plan), tuned)  # old runners go
                else:
                    choice = choice or tuned or Choice(default_strategy(plan), {}, "default")
                    self._remember(key, shape_signature(plan), choice)
            self._notify(key, notify)  # outside the key lock: a hook may choose again
        return choice

    def prepare(self, pairs: Pairs | CopyPlan) -> Choice:
        """Resolve ``pairs``' key now — tuning inline unless ``tuning`` is "never" — so that no later step meets
        it untuned (an engine's start-up, a warm-up pass). A key served by an interim choice is tuned here."""
        plan = pairs if isinstance(pairs, CopyPlan) else CopyPlan.from_pairs(pairs)
        if not plan.pairs:
            return Choice("torch_per_copy", {}, "default")
        key = self.key(plan)
        choice = self.choose(plan) if self.tuning != "deferred" else self._table.get(key)
        if choice is not None and choice.origin != "interim":
            return choice
        notify = []
        with self._key_lock(key):
            choice = self._table.get(key)
            if choice is None or choice.origin == "interim":
                tuned = self._forced(plan) or self._cached(key, plan) or self._tuned(key, plan, force=True)
                if tuned is not None:
                    choice, notify = tuned, self._adopt(key, shape_signature(plan), tuned)
                elif choice is None:  # the tune failed (warned): serve it (deferred: and try again off the step)
                    choice = self._interim(key, plan) if self.tuning == "deferred" else \
                        Choice(default_strategy(plan), {}, "default")
                    self._remember(key, shape_signature(plan), choice)
        self._notify(key, notify)
        return choice

    def wait_tuned(self, timeout: float | None = None) -> bool:
        """Block until every key handed to background tuning is done; False if ``timeout`` ran out first."""
        return self._background is None or self._background.wait(timeout)

    def on_adopt(self, callback) -> None:
        """Call ``callback(key)`` whenever a winner replaces an interim choice off the step (from the tuning
        thread): call sites that bound the interim choice drop that binding and bind again on their next step."""
        with self._lock:
            if callback not in self._listeners:
                self._listeners.append(callback)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _forced(self, plan: CopyPlan) -> Choice | None:
        s = self._pinned
        if s is None or s.available(plan.device) is not None or not s.supports(plan):
            return None
        return Choice(s.name, s.candidates(plan)[0], "pinned")

    def _cached(self, key: str, plan: CopyPlan) -> Choice | None:
        row = self.store.get(key)
        if row is None:
            return None
        strategy = strategies().get(row["strategy"])
        if strategy is None or strategy.available(plan.device) is not None or not strategy.supports(plan):
            warn_once(f"unusable-row:{key}", "copytune: cached winner %r for key %s is unusable here; ignoring it",
                      row["strategy"], key[:12])
            return None
        reason = _invalid_params(strategy, row["params"])
        if reason is not None:  # a hand-edited or foreign row must never break or silence a copy
            warn_once(f"bad-params:{key}", "copytune: cached winner for key %s has parameters it cannot run (%s); "
                      "ignoring it", key[:12], reason)
            return None
        return Choice(row["strategy"], row["params"], "cache")

    def adopt(self, row: dict) -> bool:
        """Put a winner tuned elsewhere (``copytune.sync``) into the in-memory table, if its mode is this
        dispatcher's and its strategy is usable on the device it was tuned for; True if taken."""
        strategy = strategies().get(row["strategy"])
        kind = row["device"].get("kind", "cpu")
        device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" and torch.cuda.is_available() \
            else torch.device(kind if kind != "cuda" else "cpu")
        if row["mode"] != self.mode or strategy is None or strategy.available(device) is not None or \
                _invalid_params(strategy, row["params"]) is not None:
            return False
        self._notify(row["key"], self._adopt(row["key"], row["signature"], Choice(row["strategy"], row["params"],
                                                                                  "cache")))
        return True

    def _tuned(self, key: str, plan: CopyPlan, force: bool = False) -> Choice | None:
        if not (self.tuning != "never" or force) or not plan.pairs:
            return None
        from copytune import tuner

        t0 = time.perf_counter()
        try:
            result = tuner.tune(plan, self.mode, pool=self._pool or tuner.default_pool(plan.device),
                                timer=self._timer)
        except Exception as exc:  # noqa: BLE001 - tuning must never take the caller down
            why = f"{type(exc).__name__}: {exc}"
            warn_once(f"tune-failed:{type(exc).__name__}", "copytune: tuning failed (%s); using the default strategy",
                      why)
            return None
        self.store.put(self._row(key, plan, result))  # publish on tune, not at exit
        speedup = f"{result.baseline_us / result.time_us:.2f}x per-copy torch" \
            if not math.isnan(result.baseline_us) and result.time_us > 0 else "baseline failed"
        logger.info("copytune: tuned %s (%s, key %s) in %.2f s: %s %s, %.2f us, %s", describe_signature(
            shape_signature(plan)), self.mode, key[:12], time.perf_counter() - t0, result.strategy, result.params,
            result.time_us, speedup)
        return Choice(result.strategy, result.params, "tuned")

    def _interim(self, key: str, plan: CopyPlan) -> Choice:
        """"deferred": what serves ``plan`` until its tune ends (the nearest tuned bucket, else the default); the
        key goes to the background tuner."""
        if self._background is None:
            with self._lock:
                if self._background is None:
                    self._background = BackgroundTuner(self._tune_off_step)
        # a plan object of its own: call sites forget their sources on the plan they bound (meta tensors), while
        # the tune needs the real geometry and alignment (it holds the step's tensors until it ends)
        self._background.submit(key, copy.copy(plan))
        self._catalogue(plan.device)

        def usable(choice: Choice) -> bool:
            s = strategies().get(choice.strategy)
            return s is not None and s.available(plan.device) is None and s.supports(plan) and \
                _invalid_params(s, choice.params) is None
        with self._lock:
            near = self._neighbours.nearest(shape_signature(plan), usable)
        return Choice(near.strategy, near.params, "interim") if near else \
            Choice(default_strategy(plan), {}, "interim")

    def _tune_off_step(self, key: str, plan: CopyPlan) -> None:
        notify = []
        with self._key_lock(key):
            current = self._table.get(key)
            if current is not None and current.origin != "interim":
                return  # prepare() or a retune got there first
            choice = self._tuned(key, plan, force=True)
            if choice is not None:
                notify = self._adopt(key, shape_signature(plan), choice)
        self._notify(key, notify)

    def _adopt(self, key: str, signature: list, choice: Choice) -> list:
        """Make ``choice`` the key's winner from now on: runners (Python and C++) of the old choice go, and whoever
        built one while it changed sees the new generation (``copy`` and call sites insert only what they built
        within one generation). Returns the hooks to call once the caller released the key's lock (``_notify``)."""
        with self._lock:
            self._remember(key, signature, choice)
            self._runners.clear()
            if self._exact is not None:
                self._exact.clear()
            self.generation += 1
            return list(self._listeners)

    @staticmethod
    def _notify(key: str, listeners: list) -> None:
        for callback in listeners:
            try:
                callback(key)
            except Exception as exc:  # noqa: BLE001 - a call site's hook never breaks adoption
                warn_once(f"listener:{type(exc).__name__}", "copytune: an adoption hook failed (%s: %s)",
                          type(exc).__name__, exc)

    def _remember(self, key: str, signature: list, choice: Choice) -> None:
        self._table[key] = choice
        if choice.origin in ("cache", "tuned"):
            with self._lock:
                self._neighbours.add(signature, choice)  # a signature it cannot read is no neighbour

    def _catalogue(self, device) -> None:
        """Once per device: the stored winners of this device and mode become neighbour candidates (one SQL read,
        on the first deferred miss only)."""
        if device in self._catalogued:
            return
        self._catalogued.add(device)
        fingerprint = device_fingerprint(device)
        rows = [r for r in self.store.rows() if r["mode"] == self.mode and r["device"] == fingerprint]
        with self._lock:
            for r in rows:
                why = self._neighbours.add(r["signature"], Choice(r["strategy"], r["params"], "cache"))
                if why is not None:
                    warn_once(f"bad-signature:{r['key']}", "copytune: cache row %s has a signature no neighbour "
                              "can be read from (%s); skipped", r["key"][:12], why)

    def _row(self, key: str, plan: CopyPlan, result) -> dict:
        from copytune import __version__

        return {"key": key, "device": device_fingerprint(plan.device), "signature": shape_signature(plan),
                "mode": self.mode, "strategy": result.strategy, "params": result.params, "time_us": result.time_us,
                # None: the baseline failed here; the winner is still exact and stored (its speedup is unknown)
                "baseline_us": None if math.isnan(result.baseline_us) else result.baseline_us,
                "timings": [t.as_json() for t in result.timings],
                "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "copytune_version": __version__}

    # -- launching --------------------------------------------------------------------------------------------
    def copy(self, pairs: Pairs | CopyPlan) -> None:
        """``dst.copy_(src)`` for every pair through the chosen strategy; validated first, nothing launched on error.

        A batch with exactly the addresses and geometry of a recent one (the common case: the caching allocator
        hands a serving step the same blocks each time) skips validation and dispatch: everything they depend on
        is in the lookup key, and the cached runner holds no tensor references.
        """
        fast = self._exact_run
        if fast is not None:  # C++: the exact key, the lookup and the launch, for batches bound before
            found = fast(pairs)
            if found is None:
                return
            if found is not False:
                raise launch_error(found)
        if not isinstance(pairs, (Sequence, CopyPlan)):  # a generator or zip(): the key must not consume it
            pairs = list(pairs) if not isinstance(pairs, torch.Tensor) else pairs
        key = _exact_key(pairs)
        run = self._runners.get(key) if key is not None else None
        if run is None:
            generation = self.generation
            run = self._runner(CopyPlan.from_pairs(pairs))
            if key is not None:
                with self._lock:  # the miss path only: eviction iterates the dict
                    if len(self._runners) >= RUNNER_CACHE_SIZE:
                        self._runners.pop(next(iter(self._runners)))
                    if generation == self.generation:  # a winner adopted meanwhile: this runner may be stale
                        self._runners[key] = run
                        if isinstance(run, BatchRunner):
                            self._remember_exact(pairs, run)
        run(pairs.pairs if isinstance(pairs, CopyPlan) else pairs)

    def _remember_exact(self, pairs, run: BatchRunner) -> None:
        """Under ``_lock``: hand ``run``'s C++ batch to the exact-address cache (made with the first one); pairs
        that are not a list or tuple of tuples stay on the Python path."""
        if self._exact is None:
            self._exact = run.exact_cache(RUNNER_CACHE_SIZE)
            self._exact_run = self._exact.fast_run()
        self._exact.put(pairs, run.batch)

    def _runner(self, plan: CopyPlan):
        if not plan.pairs:
            return _noop
        choice = self.choose(plan)
        try:
            return get_strategy(choice.strategy).runner(plan, choice.params)
        except UnsupportedPlan:
            return get_strategy("torch_per_copy").runner(plan)

    def winner(self, pairs: Pairs | CopyPlan) -> str:
        """Name of the strategy this dispatcher runs for ``pairs``."""
        plan = CopyPlan.from_pairs(pairs)
        return self.choose(plan).strategy if plan.pairs else "torch_per_copy"

    def bind(self, pairs: Pairs | CopyPlan, *, checked: bool = True,
             bases: Sequence[torch.Tensor] | None = None) -> BoundCopy:
        """Validate and choose once; the returned ``BoundCopy`` relaunches with no per-call dispatch work.

        ``bases``: one tensor per pair that its source is a view of (``cu_seqlens`` for ``cu_seqlens[1:]``). The
        bound copy's ``run(srcs)`` then takes such base tensors and adds each view's byte offset itself, so call
        sites never build slice views per call (~3.5 µs each on an H100).
        """
        plan = CopyPlan.from_pairs(pairs)
        choice = self.choose(plan) if plan.pairs else Choice("torch_per_copy", {}, "default")
        key = self.key(plan) if plan.pairs else None
        try:
            launch = get_strategy(choice.strategy).bind(plan, choice.params)
        except UnsupportedPlan:  # e.g. a synced winner whose extension is not built on this machine
            choice = Choice("torch_per_copy", {}, "default")
            launch = get_strategy(choice.strategy).bind(plan)
        offsets = None
        if bases is not None:
            offsets = _view_offsets(plan, bases)
            launch = _with_offsets(launch, plan, offsets)
        return BoundCopy(plan, choice, launch, checked, bases, offsets, key)


def _invalid_params(strategy, params) -> str | None:
    """Why ``strategy`` cannot run ``params`` as stored (not a dict, or outside its schema); None when it can."""
    if not isinstance(params, dict):
        return f"params is a {type(params).__name__}, not an object"
    try:
        return strategy.validate_params(params)
    except Exception as exc:  # noqa: BLE001 - a broken validator excludes the row, never the caller
        return f"{type(exc).__name__}: {exc}"


def _exact_key(pairs) -> tuple | None:
    """Everything validation depends on (addresses, shapes, strides, dtypes, devices); None for odd input."""
    try:
        return tuple((s.data_ptr(), d.data_ptr(), s.shape, d.shape, s.stride(), d.stride(), s.dtype, d.dtype,
                      s.device, d.device) for s, d in pairs)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None  # let CopyPlan.from_pairs say what is wrong


def _noop(pairs) -> None:
    return None


def _view_offsets(plan: CopyPlan, bases: Sequence[torch.Tensor]) -> list[int]:
    if len(bases) != len(plan.pairs):
        raise ValueError(f"expected {len(plan.pairs)} base tensors, got {len(bases)}")
    offsets = []
    for i, ((s, _), b) in enumerate(zip(plan.pairs, bases)):
        if not isinstance(b, torch.Tensor) or b.device != s.device or b.dtype != s.dtype:
            raise ValueError(f"pair {i}: source is not a view inside the given base tensor")
        lo, hi = extent(b)
        slo, shi = extent(s) if s.numel() else (s.data_ptr(), s.data_ptr())
        if not lo <= slo <= shi <= hi:
            raise ValueError(f"pair {i}: source is not a view inside the given base tensor")
        offsets.append(slo - lo)
    return offsets


def _with_offsets(launch, plan: CopyPlan, offsets: list[int]):
    """Make ``launch(srcs)`` take base tensors: natively where the strategy reads addresses itself, else by
    building the views (the torch strategies need tensors)."""
    if launch.set_source_offsets(offsets):
        return launch
    return Rebased(launch, plan, offsets)


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """``t``'s geometry (shape, strides, dtype) as a meta tensor: no memory, nothing pinned."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class Rebased(BoundLaunch):
    """A launch taking base tensors for one that takes the views: builds each view per call (torch strategies)."""

    def __init__(self, launch: BoundLaunch, plan: CopyPlan, offsets: list[int]):
        self.launch, self.offsets, self.strategy = launch, offsets, launch.strategy
        self.likes = [_meta_like(s) for s, _ in plan.pairs]  # the views' geometry; no source is pinned

    def __call__(self, srcs=None) -> None:
        self.launch(None if srcs is None else [as_view(b, like, off)
                                               for b, like, off in zip(srcs, self.likes, self.offsets)])


class BoundCopy:
    """A validated batch bound to its winning strategy.

    ``run()`` repeats the copies on the bound addresses; ``run(srcs)`` copies new source tensors of the bound
    geometry into the same destinations. With ``checked`` (default) each new source's shape, strides, dtype and
    device are compared and its bytes tested against the destinations (ValueError before any launch); call sites
    that build their own sources pass ``checked=False`` and pay only the address reads.
    """

    __slots__ = ("_checked_run", "_dst_ext", "_dst_lo", "_dst_reach", "_geometry", "_launch", "_offsets", "_spans",
                 "checked", "choice", "key", "plan", "sources_forgotten")

    def __init__(self, plan: CopyPlan, choice: Choice, launch, checked: bool = True, bases=None, offsets=None,
                 key: str | None = None):
        self.plan, self.choice, self.checked, self._launch = plan, choice, checked, launch
        self.key = key  # the dispatcher's key: an interim choice's binding is replaced once the key is tuned
        self._offsets = offsets or [0] * len(plan.pairs)
        given = bases if bases is not None else [s for s, _ in plan.pairs]
        self._geometry = [(s.shape, s.stride(), s.dtype, s.device) for s in given]
        launch.expect_sources(given)  # where the strategy checks each new source itself (C++): checks_sources
        self._checked_run = launch.checked_launcher() if checked else None  # the whole check in C++
        self.sources_forgotten = False
        self._spans = [span_bytes(s) for s, _ in plan.pairs]
        ext = sorted((extent(d), i) for i, (_, d) in enumerate(plan.pairs) if d.numel())
        self._dst_lo = [lo for (lo, _), _ in ext]
        self._dst_reach = list(itertools.accumulate((hi for (_, hi), _ in ext), max))  # furthest end so far
        self._dst_ext = ext

    @property
    def strategy(self) -> str:
        return self.choice.strategy

    @property
    def checks_sources(self) -> bool:
        """Whether the strategy checks each new source itself (C++), so the caller need not."""
        return self._launch.checks_sources

    def follow_source_shape(self, i: int, max_row_bytes: int) -> bool:
        """Let copy ``i`` take its columns and source row stride from each new 2-D source (rows fixed), checked
        against ``max_row_bytes`` before each launch; False when the strategy cannot (use ``resize_copy``)."""
        src, dst = self.plan.pairs[i]
        if self.checked or src.dim() != 2 or dst.dim() != 2:
            return False
        size = src.element_size()
        if self.plan.descs[i].rows != src.shape[0] and not self.resize_copy(
                i, src.shape[0], src.shape[1] * size, src.stride(0) * size):
            return False  # a full-width slice was described as one row: split back into rows first
        return self._launch.follow_source_shape(i, max_row_bytes, size)

    def sources_launcher(self):
        """The cheapest callable that takes new sources, for call sites that run the same binding every step:
        ``run`` minus the Python frames (unchecked bindings only). It returns an error message (raise it) or a
        falsy value."""
        return self._launch.sources_launcher() if not self.checked else returning_errors(self.run, self.choice.strategy)

    def attribute_launcher(self, names: Sequence[str] | Sequence[int]):
        """For call sites whose new sources are attributes ``names`` (one per pair) of one object, or its items
        (int indices into a tuple or list): a callable taking that object, cheaper than ``sources_launcher()`` over
        getters where the strategy reads them itself (``cuda_ext``); None otherwise. Returns an error message
        (raise it) or a falsy value."""
        return None if self.checked else self._launch.attribute_launcher(list(names))

    def seam_table(self, step_var, values: Sequence[str], present: Sequence[str]):
        """The strategy's table for a call site's seam (``BoundLaunch.seam_table``), or None."""
        return self._launch.seam_table(step_var, values, present)

    def resize_copy(self, i: int, rows: int, row_bytes: int, src_row_stride: int) -> bool:
        """Let copy ``i`` move ``rows`` rows of ``row_bytes`` bytes from now on, its sources' rows
        ``src_row_stride`` bytes apart, into the same destination rows (an NSA page table gaining a column each
        decode step). The caller guarantees both sides hold those bytes. False when the strategy cannot resize
        in place: bind anew."""
        dst = self.plan.pairs[i][1]
        # the destination's own rows and row stride: a full-width slice may have been described as one row
        if dst.dim() != 2 or rows != dst.shape[0] or not self._launch.set_shape(
                i, rows, row_bytes, src_row_stride, dst.stride(0) * dst.element_size()):
            return False
        self._spans[i] = (rows - 1) * src_row_stride + row_bytes if rows and row_bytes else 0
        return True

    def forget_sources(self) -> None:
        """Drop this binding's references to the sources it was bound with (call sites that hand over new
        sources every call must not pin the first step's tensors); their geometry stays, as meta tensors.
        ``run()`` without sources is an error from then on."""
        meta = tuple((_meta_like(s), d) for s, d in self.plan.pairs)
        object.__setattr__(self.plan, "pairs", meta)
        self.sources_forgotten = True

    def run(self, srcs: Sequence[torch.Tensor] | None = None) -> None:
        if srcs is None and self.sources_forgotten:
            raise ValueError("this binding forgot its bound sources: pass the sources of every call")
        if srcs is not None and self._checked_run is not None:
            err = self._checked_run(srcs if isinstance(srcs, (list, tuple)) else list(srcs))
            if err is None:
                return
            self.check(srcs)  # what C++ refused, in this class's words; or the byte-by-byte verdict on an overlap
            if err != self._launch.maybe_overlap:
                raise launch_error(err)
            self._launch(srcs)  # the extents met, the bytes do not
            return
        if srcs is not None and self.checked:
            self.check(srcs)
        self._launch(srcs)

    __call__ = run

    def check(self, srcs: Sequence[torch.Tensor]) -> None:
        """Raise ValueError if ``srcs`` do not match the bound geometry or overlap a destination."""
        if len(srcs) != len(self._geometry):
            raise ValueError(f"expected {len(self._geometry)} sources, got {len(srcs)}")
        for i, (s, geometry, span, off) in enumerate(zip(srcs, self._geometry, self._spans, self._offsets)):
            try:
                ok = (s.shape, s.stride(), s.dtype, s.device) == geometry
            except AttributeError:
                raise ValueError(f"pair {i}: source is a {type(s).__name__}, not a torch.Tensor") from None
            if not ok:
                shape, stride, dtype, device = geometry
                raise ValueError(f"pair {i}: source {tuple(s.shape)} {s.stride()} {s.dtype} on {s.device} does not "
                                 f"match the bound {tuple(shape)} {stride} {dtype} on {device}")
            if span:
                lo = s.data_ptr() + off
                self._check_disjoint(i, s, lo, lo + span, off)

    def _check_disjoint(self, i: int, s: torch.Tensor, lo: int, hi: int, off: int) -> None:
        k = bisect.bisect_right(self._dst_lo, lo)  # destinations [0, k) start at or before lo
        if (k == 0 or self._dst_reach[k - 1] <= lo) and (k == len(self._dst_lo) or self._dst_lo[k] >= hi):
            return  # the usual case, O(log k): no destination extent meets [lo, hi)
        for dst_ext, j in self._dst_ext:
            if dst_ext[0] >= hi:
                break
            view = s if s.shape == self.plan.pairs[i][0].shape and not off else as_view(s, self.plan.pairs[i][0], off)
            if extents_meet((lo, hi), dst_ext) and bytes_meet(view, self.plan.pairs[j][1]):
                raise ValueError(f"pair {i}: source overlaps the destination of pair {j}")


_default: dict[str, Dispatcher] = {}
_default_lock = threading.Lock()


def default_dispatcher(mode: str = "eager") -> Dispatcher:
    """The process-wide dispatcher ``batched_copy`` and the engine integration use for ``mode`` (cache at the
    default path; tuning ``$COPYTUNE_TUNING``, default "deferred": no serving call waits for a tune)."""
    d = _default.get(mode)
    if d is None:
        with _default_lock:
            d = _default.get(mode)
            if d is None:
                d = _default[mode] = Dispatcher(mode=mode, tuning=default_tuning())
    return d


def set_default_dispatcher(dispatcher: Dispatcher, mode: str = "eager") -> Dispatcher | None:
    """Make ``dispatcher`` the process-wide one for ``mode`` (``batched_copy``, the engine integration); returns the
    one it replaces (benchmarks put an inline-tuning one in place: nothing may tune in the background while they
    time)."""
    with _default_lock:
        previous = _default.get(mode)
        _default[mode] = dispatcher
    return previous


def default_tuning() -> str:
    """``$COPYTUNE_TUNING`` if it names one of TUNING, else "deferred" (a typo is logged, never fatal)."""
    value = os.environ.get(TUNING_ENV, "").strip().lower() or "deferred"
    if value not in TUNING:
        warn_once(f"tuning-env:{value}", "copytune: %s=%r is not one of %s; using deferred", TUNING_ENV, value,
                  ", ".join(TUNING))
        return "deferred"
    return value


def batched_copy(pairs: Pairs | CopyPlan, *, mode: str = "eager") -> None:
    """Perform ``dst.copy_(src)`` for every pair, with the same result, through the tuned strategy for this batch's
    signature. Raises ``ValueError`` before any launch on bad input (see ``CopyPlan.from_pairs``)."""
    default_dispatcher(mode).copy(pairs)
