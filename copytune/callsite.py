"""Call-site bindings: an engine's copy list over the engine's own objects, bound once per structure, relaunched
every step by reading the step's sources off the object the engine hands over (no slice views, no adapter object).

An integration supplies data: a copy list — for given destination objects and one step's source object, the
(source view, where its base tensor lives on the source object, destination view) triples in the engine's order —
and the structure a binding depends on besides the buffers (sizes, optional parts present). This module holds the
machinery any engine reuses: the binding table by (owner, mode, structure, dispatcher), rebinding when the
structure changes, page tables whose widths follow each step's sources, and sources read in C++ where the strategy
can (``cuda_ext``: one C++ call per step).
"""

from __future__ import annotations

import contextvars
import keyword
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from copytune.dispatch import Dispatcher, default_dispatcher
from copytune.kernels.base import launch_error
from copytune.log import logger as log

BINDINGS_PER_OWNER = 64  # bound structures kept per set of destination objects (oldest dropped first)


class Copy(NamedTuple):
    """One ``dst.copy_(src)`` of a call site."""

    src: torch.Tensor  # this step's source view
    path: str | int  # where the source's base tensor is on the step's source object: "a.b" attributes, or an index
    dst: torch.Tensor  # the destination view
    # A 2-D copy whose column count changes from step to step (a page table): the columns the destination object
    # holds (its own shape, not its row stride: a view of a wider buffer must not be written past its end).
    # Followed from each step's source, not keyed. None: the copy keeps its shape.
    width: int | None = None


CopyList = Callable[[Sequence[object], object, object], list[Copy]]  # (destination objects, source, mode) -> copies


class Unsupported(ValueError):
    """The call site cannot take this step; the caller hands it to the engine's own code."""


class Structure:
    """What a copy list depends on besides the buffers, read off the step's source object: attributes whose int
    ``values`` it depends on, and attributes whose presence (not None) it depends on. ``key(source)`` is the
    lookup key's part (a function made for these names: a step's Python does not loop over them); as data it
    lets a strategy check it in C++ (``CallSite.step``)."""

    __slots__ = ("key", "present", "values")

    def __init__(self, values: Sequence[str] = (), present: Sequence[str] = ()):
        self.values, self.present = tuple(values), tuple(present)
        for name in self.values + self.present:  # plain ASCII names: the key is made from them (Python would
            # normalise other identifiers, C++ reads the name as written)
            if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name):
                raise ValueError(f"not an attribute name: {name!r}")
        items = [f"s.{a}" for a in self.values] + [f"s.{a} is None" for a in self.present]
        body = f"({', '.join(items)},)" if items else "()"
        self.key: Callable[[object], tuple] = eval(f"lambda s: {body}")  # noqa: S307 - names checked above

    def __call__(self, source) -> tuple:
        return self.key(source)


class _Binding:
    """A bound refresh for one structure. Page tables' column counts change every decode step (the longest sequence
    grows), so they are followed in place instead of being part of the key. Holds no reference to any step's
    sources: a 160k-token page table per captured batch size would otherwise stay pinned on the GPU."""

    __slots__ = ("bound", "expected", "from_object", "get_sources", "getters", "key", "launch", "n_copies", "seam",
                 "shapes", "widths")

    def __init__(self, copies: list[Copy], source, dispatcher: Dispatcher):
        paths = [c.path for c in copies]
        self.getters = [operator.itemgetter(p) if isinstance(p, int) else operator.attrgetter(p) for p in paths]
        bases = [g(source) for g in self.getters]
        self.n_copies = len(copies)
        self.bound = dispatcher.bind([(c.src, c.dst) for c in copies], checked=False, bases=bases)
        self.key = self.bound.key  # when the dispatcher adopts a new winner for it, this binding is dropped
        # copies whose columns follow the step's longest sequence: index -> (path, widest the destination takes)
        self.widths = {i: (c.path, c.width) for i, c in enumerate(copies) if c.width is not None}
        self.shapes = {i: copies[i].src.shape for i in self.widths}
        # what every other source must look like where the strategy does not check it itself (C++ does)
        self.expected = None if self.bound.checks_sources else [
            (i, p, _geometry(b)) for i, (p, b) in enumerate(zip(paths, bases)) if i not in self.widths]
        self.get_sources = lambda src, gs=self.getters: [g(src) for g in gs]
        # where the kernel reads the page tables' widths from the sources itself, a step is one C++ call
        if all(self.bound.follow_source_shape(i, width * copies[i].src.element_size())
               for i, (_, width) in self.widths.items()):
            self.widths = {}
        self.launch = self.bound.sources_launcher()
        # one C++ call reading the sources off the step's object, where it checks them itself (expected is None)
        uniform = all(isinstance(p, str) for p in paths) or all(isinstance(p, int) for p in paths)
        self.from_object = self.bound.attribute_launcher(paths) if uniform and not self.widths and \
            self.expected is None else None
        self.seam = False  # the seam's step may serve it (the default dispatcher's; its own destination objects)
        self.bound.forget_sources()

    def run(self, source) -> bool:
        """Launch for ``source``; False when a page table's shape changed and could not be followed in place
        (a torch winner's views are fixed): the caller then runs the copies itself, never a rebind per step."""
        if self.expected is not None:
            for i, path, geometry in self.expected:
                got = _geometry(self.getters[i](source))
                if got != geometry:
                    raise ValueError(f"{path} is {got}; this binding copies {geometry}")
        if not self.widths:
            err = self.from_object(source) if self.from_object is not None else self.launch(self.get_sources(source))
            if err:
                raise launch_error(err)
            return True
        for i, (path, width) in self.widths.items():
            src = self.getters[i](source)
            if src.shape != self.shapes[i]:
                rows, cols = src.shape
                if cols > width:
                    raise ValueError(f"{path} has {cols} columns; the metadata buffer holds {width}")
                if rows != self.shapes[i][0]:
                    raise ValueError(f"{path} has {rows} rows; this structure copies {self.shapes[i][0]}")
                size = src.element_size()
                if not self.bound.resize_copy(i, rows, cols * size, src.stride(0) * size):
                    return False
                self.shapes[i] = src.shape
        err = self.launch(self.get_sources(source))
        if err:
            raise launch_error(err)
        return True


def _geometry(t) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__


def distinct_copies(copies: list[Copy]) -> list[Copy]:
    """``copies`` without repeats: several destination objects may share a buffer (sglang 0.5.10's draft backends
    share ``cache_seqlens_int32``), and the same source path into the same view writes the same bytes every step.
    (A copy whose source is its own destination — 0.5.10 pads a batch by handing its graph buffer back as the
    source — is kept: copying bytes onto themselves changes nothing, and the next step's source may differ.)"""
    seen, out = set(), []
    for c in copies:
        key = (c.path, c.src.data_ptr(), c.src.shape, c.src.stride(), c.dst.data_ptr(), c.dst.shape, c.dst.stride())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


class CallSite:
    """The bindings of one call site. ``copies`` builds the copy list (cold path only); ``structure(source)``
    returns what, besides the destination objects and the page tables' widths, the copy list depends on (sizes,
    optional parts present): it is part of every lookup, so keep it a few attribute reads — a ``Structure`` lets
    ``step`` check it in C++.

    ``step(owner_object, source, mode)`` is an engine seam's common step: True when it launched the refresh the
    default dispatcher bound for that destination object (or that sequence of them, bound by ``refresh`` with a
    tuple ``owner``), that mode and the source's structure; False when the caller must take the step
    (``refresh``: bind, raise, or hand it to the engine), and always while ``step_var`` (a ContextVar) holds
    anything but None. Where the winner's strategy has a seam table (``cuda_ext``), ``step`` is one C call:
    lookup, structure check, source reads and checks, launch — the attribute is replaced by the table's function
    when the table is made (so read it per call; do not wrap it)."""

    def __init__(self, name: str, copies: CopyList, structure: Structure | Callable[[object], tuple], *,
                 step_var: contextvars.ContextVar | None = None):
        self.name, self.copies, self.step_var = name, copies, step_var
        self.guards = structure if isinstance(structure, Structure) else None  # what the seam table compares
        self.structure = structure.key if isinstance(structure, Structure) else structure
        self.bindings: dict[tuple, _Binding] = {}
        self._owned: dict[object, list[tuple]] = {}  # owner -> its keys, oldest first
        self._pinned: dict[object, list] = {}  # destination objects that cannot be weakly referenced, kept alive
        self.refused: dict[tuple, str] = {}  # structures the copy list refused (Unsupported): not rebuilt each step
        self._listening: weakref.WeakSet = weakref.WeakSet()  # dispatchers that tell this site of new winners
        self.table = None  # the winner strategy's seam table, made with the first binding that has one
        self.step = self._step
        self._table_listeners: dict[object, Callable[[object], None]] = {}

    def when_table(self, key, listener: Callable[[object], None]) -> None:
        """Call ``listener(table)`` once the seam table exists (now, if it does): an engine seam can then take its
        common step without a Python frame (``SeamTable.seam_method``). One listener per ``key``: a later one
        replaces it; ``forget_table_listener(key)`` drops it."""
        self._table_listeners[key] = listener
        if self.table is not None:
            self._tell(listener)

    def forget_table_listener(self, key) -> None:
        self._table_listeners.pop(key, None)

    def _tell(self, listener: Callable[[object], None]) -> None:
        try:
            listener(self.table)
        except Exception:  # noqa: BLE001 - a listener's failure never costs a step or the table its entries
            log.warning("copytune: %s: a seam-table listener failed; its seam stays in Python", self.name,
                        exc_info=True)

    def _step(self, owner_object, source, mode) -> bool:
        """``step`` without a seam table: the same bindings, the same answers (never an exception)."""
        if self.step_var is not None and self.step_var.get() is not None:
            return False
        owner = tuple(map(id, owner_object)) if isinstance(owner_object, (list, tuple)) else id(owner_object)
        try:
            binding = self.bindings.get((owner, mode, self.structure(source), None))
        except (AttributeError, TypeError):  # a source without the structure's attributes: the caller's to take
            return False
        run = None if binding is None or not binding.seam else binding.from_object
        return run is not None and not run(source)

    def refresh(self, targets: Sequence[object], owner, source, mode, dispatcher: Dispatcher | None = None) -> None:
        """Copy ``source`` into every object of ``targets`` as the copy list says, in one tuned launch.

        ``owner`` identifies ``targets`` (``id`` of the object, or a tuple of ids); ``mode`` is passed to the copy
        list as given and keyed as given. The first call per structure validates and binds (tuning if the
        signature is new); a ValueError from validation means nothing was launched.
        """
        binding = self.bindings.get((owner, mode, self.structure(source), dispatcher))
        if binding is not None:
            run = binding.from_object  # the common step: one C++ call, no _Binding.run frame
            if run is not None:
                err = run(source)
                if err:
                    raise launch_error(err)
                return
            if binding.run(source):
                return
        self._rebind(targets, owner, source, mode, dispatcher)

    def binding(self, owner):
        """``owner``'s most recent binding (benchmarks, diagnostics), or None."""
        keys = [k for k in self._owned.get(owner, ()) if k in self.bindings]
        return self.bindings[keys[-1]] if keys else None

    def run_copies(self, targets: Sequence[object], source, mode) -> None:
        """The call site's copies one ``copy_`` at a time: the engine's own semantics, for steps a binding cannot
        take (a torch winner facing a new page-table width)."""
        for c in self.copies(targets, source, mode):
            c.dst.copy_(c.src)

    def _rebind(self, targets, owner, source, mode, dispatcher: Dispatcher | None) -> None:
        key = (owner, mode, self.structure(source), dispatcher)
        entry = self.bindings.get(key)
        if entry is not None:  # its page tables changed shape and a torch winner cannot follow
            self.run_copies(targets, source, mode)
            return
        if key in self.refused:
            raise Unsupported(self.refused[key])
        keys = self._own(targets, owner)
        try:
            copies = distinct_copies(self.copies(targets, source, mode))
        except Unsupported as exc:
            self.refused[key] = str(exc)
            keys.append(key)
            raise
        dispatcher = dispatcher or default_dispatcher("eager")
        if dispatcher not in self._listening:
            self._listening.add(dispatcher)
            dispatcher.on_adopt(self._adopted)
        generation = dispatcher.generation
        entry = _Binding(copies, source, dispatcher)
        if key in keys:  # dropped for a new winner: bound again, keeping its place at the end
            keys.remove(key)
        if len(keys) >= BINDINGS_PER_OWNER:
            old = keys.pop(0)
            self._drop(old)
            self.refused.pop(old, None)
        self.bindings[key] = entry
        keys.append(key)
        if dispatcher.generation != generation:  # a winner was adopted while this bound: it may be stale
            self._drop(key)  # this step runs it; the next binds again
        elif key[3] is None and (isinstance(owner, tuple) or len(targets) == 1):  # the seam's step serves it
            entry.seam = True
            self._offer(key, tuple(targets) if isinstance(owner, tuple) else targets[0], mode, source, entry)
        if not entry.run(source):
            raise RuntimeError(f"copytune: a fresh {self.name} binding could not run the step it was bound for")

    def _own(self, targets, owner) -> list[tuple]:
        """``owner``'s keys, oldest first; the first time, arrange for them to go when a target is freed."""
        keys = self._owned.get(owner)
        if keys is None:
            keys = self._owned[owner] = []
            for t in targets:
                try:
                    weakref.finalize(t, self.forget, owner)
                except TypeError:  # not weak-referenceable: hold it, so its id cannot be reused by another object
                    self._pinned.setdefault(owner, []).append(t)
        return keys

    def _offer(self, key, owner_object, mode, source, entry: _Binding) -> None:
        """Put a default-dispatcher binding into the seam table, where it can go. A new winner adopted (on the
        tuning thread) while it was put may have dropped the binding before the table held it: then it leaves
        the table again, or the stale entry would serve the key for good (the step never reaches a rebind)."""
        if entry.from_object is None or self.guards is None:
            return
        if self.table is None:
            self.table = entry.bound.seam_table(self.step_var, self.guards.values, self.guards.present)
            if self.table is None:
                return
            fast = self.table.fast_run()
            if fast is not None:
                self.step = fast
            for listener in list(self._table_listeners.values()):
                self._tell(listener)
        self.table.put(owner_object, mode, source, entry.from_object)  # "" or why not: refresh serves it then
        if self.bindings.get(key) is not entry:
            self.table.drop(entry.from_object)

    def _drop(self, key) -> None:
        """Forget one binding, in the seam table too."""
        binding = self.bindings.pop(key, None)
        if binding is not None and self.table is not None and binding.from_object is not None:
            self.table.drop(binding.from_object)

    def _adopted(self, key: str) -> None:
        """A dispatcher adopted a new winner for ``key`` (on its tuning thread): bindings of the old choice go, and
        their next step binds the winner. Popping one dict entry at a time is atomic for the serving thread's
        lookups: a step sees the old binding or none (the seam table's calls hold the GIL)."""
        for k, binding in list(self.bindings.items()):
            if binding.key == key:
                self._drop(k)

    def forget(self, owner) -> None:
        """Drop every binding of ``owner`` (called when one of its destination objects is freed)."""
        for key in self._owned.pop(owner, ()):
            self._drop(key)
            self.refused.pop(key, None)
        self._pinned.pop(owner, None)
