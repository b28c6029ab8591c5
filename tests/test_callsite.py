"""CallSite.step, an engine seam's common step: which bindings it serves, and that it forgets what the call site
forgets. On CPU through a strategy with a Python seam table that follows cuda_ext's contract; on a GPU through
cuda_ext's C++ table itself (the same assertions)."""

import gc
import types

import pytest
import torch

from copytune import Dispatcher, callsite, nsa
from copytune.dispatch import Rebased
from copytune.kernels import registry
from copytune.kernels.base import BoundLaunch
from copytune.kernels.torch_per_copy import STRATEGY as TORCH
from tests.test_nsa import assert_same, clone


class PySeamTable:
    """cuda_ext's SeamTable in Python: (owner, mode by identity, structure) -> the attribute launcher."""

    def __init__(self, step_var, values, present):
        self.step_var, self.values, self.present = step_var, tuple(values), tuple(present)
        self.entries, self.count = [], 0

    def structure(self, source):
        """As C++ reads it: int values (anything else: no structure it serves), present or None; None if missing."""
        try:
            values = tuple(getattr(source, a) for a in self.values)
            present = tuple(getattr(source, a) is None for a in self.present)
        except AttributeError:
            return None
        return values + present if all(type(v) is int for v in values) else None

    @staticmethod
    def ids(owner):
        return ("many", *map(id, owner)) if isinstance(owner, (list, tuple)) else id(owner)

    def put(self, owner, mode, source, launcher):
        self.entries = [e for e in self.entries if not (e[0] == self.ids(owner) and e[1] is mode and
                                                        e[2] == self.structure(source))]
        self.entries.append((self.ids(owner), mode, self.structure(source), launcher))
        return ""

    def drop(self, launcher):
        self.entries = [e for e in self.entries if e[3] is not launcher]

    def size(self):
        return len(self.entries)

    def served(self):
        return self.count

    def seam_method(self, fallback, wrapped):
        return PySeamMethod(self.fast_run(), fallback, wrapped)

    def fast_run(self):
        def run(owner, source, mode):
            if self.step_var is not None and self.step_var.get() is not None:
                return False
            structure = self.structure(source)
            hit = None if structure is None else next(
                (e[3] for e in self.entries if e[0] == self.ids(owner) and e[1] is mode and e[2] == structure), None)
            if hit is None or hit(source):
                return False
            self.count += 1
            return True
        return run


class PySeamMethod:
    """cuda_ext's SeamMethod in Python: a method whose positional (self, bs, metadata, precomputed, mode) call is
    the table's step, counted here; anything else the fallback's (the patched Python method)."""

    __copytune__ = True

    def __init__(self, run, fallback, wrapped):
        self.run, self.fallback, self.__wrapped__, self.served = run, fallback, wrapped, 0

    def __get__(self, obj, cls=None):
        return self if obj is None else types.MethodType(self, obj)

    def __call__(self, *args, **kwargs):
        if not kwargs and len(args) == 5 and self.run(*args[2:]):
            self.served += 1
            return None
        return self.fallback(*args, **kwargs)


class SeamLaunch(BoundLaunch):
    """torch_per_copy's launch with the capabilities of cuda_ext's: sources checked by the launch, read off an
    object by attribute, and a seam table (page tables keep their bound width here)."""

    strategy = "seam_fake"

    def __init__(self, inner, plan):
        self.inner, self.plan, self.run_sources = inner, plan, inner

    def __call__(self, srcs=None):
        self.inner() if srcs is None else self.run_sources(srcs)

    def expect_sources(self, samples):
        self.geometry = [(s.shape, s.stride(), s.dtype) for s in samples]
        self.checks_sources = True
        return True

    def set_source_offsets(self, offsets):  # sources are base tensors: the views are built per call
        self.run_sources = Rebased(self.inner, self.plan, list(offsets))
        return True

    def follow_source_shape(self, i, max_row_bytes, itemsize):
        return True  # claimed; a source of another width is refused by the launcher's geometry check

    def attribute_launcher(self, names):
        import operator

        getters = [operator.attrgetter(n) for n in names]

        def run(obj):
            srcs = [g(obj) for g in getters]
            if [(s.shape, s.stride(), s.dtype) for s in srcs] != self.geometry:
                return "seam_fake: source of another geometry"
            self(srcs)
            return None
        return run

    def seam_table(self, step_var, values, present):
        return PySeamTable(step_var, values, present)


class TablelessLaunch(SeamLaunch):
    """The same launch from a strategy without a seam table: ``step`` stays the Python ``_step``."""

    def seam_table(self, step_var, values, present):
        return None


class UncheckedLaunch(SeamLaunch):
    """A launch that reads sources by attribute but does not check them itself."""

    def expect_sources(self, samples):
        return False


class SeamFake:
    name, serves_cpu = "seam_fake", True
    launch = SeamLaunch

    def available(self, device):
        return None

    def supports(self, plan):
        return True

    def candidates(self, plan):
        return [{}]

    def validate_params(self, params):
        return None

    def bind(self, plan, params=None):
        return self.launch(TORCH.bind(plan, params), plan)


@pytest.fixture
def site_strategy(tmp_path, monkeypatch):
    """The default dispatcher pinned to cuda_ext on a GPU, else to the Python seam fake; a fresh call site; the
    device; the strategy's name."""
    on_gpu = torch.cuda.is_available() and registry.get_strategy("cuda_ext").available("cuda") is None
    if not on_gpu:
        monkeypatch.setitem(registry.strategies(), "seam_fake", SeamFake())
    d = Dispatcher(tmp_path / "c.db", tune=False, strategy="cuda_ext" if on_gpu else "seam_fake")
    monkeypatch.setattr("copytune.dispatch._default", {"eager": d})
    site = callsite.CallSite("test refresh", nsa._from_precomputed, nsa.PRECOMPUTED_STRUCTURE, step_var=nsa._step)
    monkeypatch.setattr(nsa, "_SITE", site)
    return site, torch.device("cuda" if on_gpu else "cpu"), "cuda_ext" if on_gpu else "seam_fake"


def test_the_step_serves_what_was_bound_and_nothing_else(site_strategy):
    site, device, _ = site_strategy
    md, pre = nsa.make_example(4, 40, 128, device=device)
    assert not site.step(md, pre, "decode")  # nothing bound yet
    site.refresh((md,), id(md), pre, "decode")
    assert site.table is not None and site.table.size() == 1 and site.step is not site._step
    for k in range(3):  # later steps: one call, exact
        _, pre = nsa.make_example(4, 40, 128, device=device, seed=10 + k)
        want = clone(md)
        nsa.reference_copy(want, pre)
        assert site.step(md, pre, "decode")
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert_same(md, want)
    assert site.table.served() == 3
    before = clone(md)
    _, other = nsa.make_example(4, 40, 128, device=device, seed=99)
    other.real_page_table = None  # another structure
    assert not site.step(md, other, "decode")
    assert not site.step(md, pre, "target_verify")  # another mode
    assert not site.step(clone(md), pre, "decode")  # another destination object
    token = nsa._step.set(object())  # a multi-step replay in flight
    try:
        assert not site.step(md, pre, "decode")
    finally:
        nsa._step.reset(token)
    _, short = nsa.make_example(3, 40, 128, device=device, seed=5)
    short.seqlens_expanded_size = 4  # the bound structure, sources of another shape: refused, nothing written
    assert not site.step(md, short, "decode")
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert_same(md, before)
    assert site.table.served() == 3


def test_several_destination_objects_are_one_step_in_their_order(site_strategy):
    """Draft backends refreshed together: the step serves exactly that sequence of objects, each by identity."""
    site, device, _ = site_strategy
    mds = [nsa.make_example(4, 40, 128, device=device, seed=s)[0] for s in (1, 2, 3)]
    _, pre = nsa.make_example(4, 40, 128, device=device)
    site.refresh(mds, tuple(map(id, mds)), pre, "decode")
    _, pre = nsa.make_example(4, 40, 128, device=device, seed=7)
    wants = [clone(md) for md in mds]
    for want in wants:
        nsa.reference_copy(want, pre)
    assert site.step(mds, pre, "decode") and site.step(tuple(mds), pre, "decode")
    if device.type == "cuda":
        torch.cuda.synchronize()
    for md, want in zip(mds, wants):
        assert_same(md, want)
    for other in (mds[:2], mds[::-1], mds[0], [*mds, mds[0]], []):
        assert not site.step(other, pre, "decode")


def test_what_the_call_site_forgets_the_step_forgets(site_strategy):
    """A freed destination object, and a binding dropped for a new winner, leave the table too."""
    site, device, _ = site_strategy
    md, pre = nsa.make_example(4, 40, 128, device=device)
    site.refresh((md,), id(md), pre, "decode")
    assert site.table.size() == 1
    site._adopted(site.binding(id(md)).key)  # the dispatcher adopted a new winner for the key
    assert site.table.size() == 0 and not site.step(md, pre, "decode")
    site.refresh((md,), id(md), pre, "decode")  # bound again: served again
    assert site.table.size() == 1 and site.step(md, pre, "decode")
    del md
    gc.collect()
    assert site.table.size() == 0 and not site.bindings


def test_a_dispatcher_passed_explicitly_is_never_in_the_table(site_strategy, tmp_path):
    site, device, name = site_strategy
    md, pre = nsa.make_example(4, 40, 128, device=device)
    site.refresh((md,), id(md), pre, "decode", Dispatcher(tmp_path / "other.db", tune=False, strategy=name))
    assert site.table is None or site.table.size() == 0
    assert not site.step(md, pre, "decode")


def test_a_winner_adopted_while_the_step_is_put_leaves_no_stale_entry(site_strategy, monkeypatch):
    """The tuning thread adopts a new winner for the key between the binding and its entry in the table: the entry
    must not outlive the binding (the step would serve the old winner for good, never reaching a rebind)."""
    site, device, _ = site_strategy
    md, pre = nsa.make_example(4, 40, 128, device=device)
    site.refresh((md,), id(md), pre, "decode")  # the table exists from here on
    site._adopted(site.binding(id(md)).key)
    table = site.table
    put = table.put

    class Racing:  # the table, adopting during put (a C++ table's methods cannot be patched, so it is wrapped)
        def __getattr__(self, name):
            return getattr(table, name)

        def put(self, *args):  # the binding is dropped (the table holds nothing of it yet), then it is put
            site._adopted(site.bindings[next(iter(site.bindings))].key)
            return put(*args)
    monkeypatch.setattr(site, "table", Racing())
    site.refresh((md,), id(md), pre, "decode")
    assert table.size() == 0 and not site.step(md, pre, "decode")


@pytest.mark.parametrize("name", ["a.b", "lambda", "1a", "a b"])
def test_a_structure_names_plain_attributes(name):
    with pytest.raises(ValueError, match="not an attribute name"):
        callsite.Structure(values=(name,))


@pytest.fixture
def cpu_site(tmp_path, monkeypatch):
    """A fresh call site whose default dispatcher is pinned to the Python fakes (the launch class to choose)."""
    fake = SeamFake()
    monkeypatch.setitem(registry.strategies(), "seam_fake", fake)
    monkeypatch.setattr("copytune.dispatch._default", {"eager": Dispatcher(tmp_path / "c.db", tune=False,
                                                                           strategy="seam_fake")})
    site = callsite.CallSite("test refresh", nsa._from_precomputed, nsa.PRECOMPUTED_STRUCTURE, step_var=nsa._step)
    monkeypatch.setattr(nsa, "_SITE", site)
    return site, fake


def test_without_a_table_the_python_step_gives_the_same_answers(cpu_site):
    site, fake = cpu_site
    fake.launch = TablelessLaunch
    md, pre = nsa.make_example(4, 40, 128)
    site.refresh((md,), id(md), pre, "decode")
    assert site.table is None and site.step == site._step
    _, pre = nsa.make_example(4, 40, 128, seed=3)
    want = clone(md)
    nsa.reference_copy(want, pre)
    assert site.step(md, pre, "decode")
    assert_same(md, want)
    assert not site.step(md, pre, "target_verify")
    token = nsa._step.set(object())
    try:
        assert not site.step(md, pre, "decode")
    finally:
        nsa._step.reset(token)
    assert not site.step(md, object(), "decode")  # a source without the structure's attributes: False, no raise
    a, b = nsa.make_example(4, 40, 128, seed=5)[0], nsa.make_example(4, 40, 128, seed=6)[0]
    site.refresh((a, b), id(a), pre, "decode")  # two targets under one object's id: never a step of `a` alone
    assert not site.step(a, pre, "decode")


def test_the_patched_seam_counts_each_step_it_serves_once(cpu_site):
    site, _ = cpu_site

    class Backend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
            raise AssertionError("the engine's own copies ran")

    md, pre = nsa.make_example(4, 40, 128)
    assert nsa.install(Backend)
    try:
        served = nsa.stats().served
        for k in range(4):
            _, pre = nsa.make_example(4, 40, 128, seed=k)
            Backend()._copy_base_replay_buffers(4, md, pre, "decode")
        assert site.table.served() == 3  # the first step bound, the others were the table's
        assert nsa.stats().served - served == 4
        method = Backend.__dict__["_copy_base_replay_buffers"]
        assert isinstance(method, PySeamMethod) and method.served == 3  # the first step made the table: 2-4 its
        Backend()._copy_base_replay_buffers(4, md, pre, forward_mode="decode")  # keywords: the Python method
        assert method.served == 3 and site.table.served() == 4 and nsa.stats().served - served == 5
    finally:
        nsa.uninstall()
    assert "_copy_base_replay_buffers" in Backend.__dict__ and \
        not isinstance(Backend.__dict__["_copy_base_replay_buffers"], PySeamMethod)
    assert nsa.stats().served - served == 5 and not nsa._SEAM_METHODS  # the count stays, the method goes
    assert nsa.install(Backend)  # the table exists already: the method is the table's at once
    try:
        assert isinstance(Backend.__dict__["_copy_base_replay_buffers"], PySeamMethod)
        Backend()._copy_base_replay_buffers(4, md, pre, "decode")
        assert nsa.stats().served - served == 6
    finally:
        nsa.uninstall()


def test_a_failing_seam_method_leaves_the_python_seam_serving(cpu_site, monkeypatch, caplog):
    """A table whose seam method cannot be made (raises): one warning, the Python method stays and serves, and the
    table keeps its entries."""
    site, _ = cpu_site

    class Backend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
            raise AssertionError("the engine's own copies ran")

    monkeypatch.setattr(PySeamTable, "seam_method", lambda self, fallback, wrapped: 1 / 0)
    md, pre = nsa.make_example(4, 40, 128)
    assert nsa.install(Backend)
    try:
        with caplog.at_level("WARNING", logger="copytune"):
            for _ in range(3):
                Backend()._copy_base_replay_buffers(4, md, pre, "decode")
        assert "seam-table listener failed" in caplog.text
        assert not isinstance(Backend.__dict__["_copy_base_replay_buffers"], PySeamMethod)
        assert site.table.size() == 1 and site.table.served() == 2
    finally:
        nsa.uninstall()


def test_an_uninstall_before_the_switch_is_never_undone_by_it(cpu_site):
    """The switch to the table's method checks, under the install lock, that its own patch is still in place: a
    listener of an uninstalled patch (still registered somewhere) changes nothing."""
    site, _ = cpu_site

    class Backend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
            return "engine"

    assert nsa.install(Backend)
    in_c = Backend.__dict__["_copy_base_replay_buffers"].copytune_in_c
    nsa.uninstall()
    md, pre = nsa.make_example(4, 40, 128)
    nsa.batched_copy_metadata(md, pre)  # the table now exists
    in_c(site.table)
    assert Backend()._copy_base_replay_buffers(4, md, pre, "decode") == "engine" and not nsa._SEAM_METHODS


def test_a_call_with_its_own_dispatcher_never_takes_the_default_step(cpu_site, tmp_path, monkeypatch):
    site, _ = cpu_site
    mds = [nsa.make_example(4, 40, 128, seed=s)[0] for s in (1, 2)]
    _, pre = nsa.make_example(4, 40, 128)
    nsa.batched_copy_metadata_multi(mds, pre)  # the default dispatcher's binding, in the table
    assert site.table.size() == 1
    monkeypatch.setattr(site, "step", lambda *a: pytest.fail("the default dispatcher's step served another's call"))
    nsa.batched_copy_metadata_multi(mds, pre, dispatcher=Dispatcher(tmp_path / "o.db", tune=False))


def test_a_source_refused_by_the_bound_step_raises_and_writes_nothing(cpu_site):
    site, _ = cpu_site
    md, pre = nsa.make_example(4, 40, 128)
    site.refresh((md,), id(md), pre, "decode")
    _, other = nsa.make_example(4, 41, 128, seed=2)  # the same structure, a page table one column wider
    before = clone(md)
    with pytest.raises((ValueError, RuntimeError), match="another geometry"):
        site.refresh((md,), id(md), other, "decode")
    assert_same(md, before)


def test_a_launch_that_does_not_check_its_sources_gets_no_attribute_step(cpu_site):
    site, fake = cpu_site
    fake.launch = UncheckedLaunch
    md, pre = nsa.make_example(4, 40, 128)
    site.refresh((md,), id(md), pre, "decode")
    assert site.binding(id(md)).from_object is None and not site.step(md, pre, "decode")


def test_a_binding_evicted_or_bound_across_a_new_winner_is_never_the_step(cpu_site, monkeypatch):
    """Bindings leave the table however the call site drops them: evicted past BINDINGS_PER_OWNER, or bound while a
    winner was adopted (the dispatcher's generation moved: the binding runs its step once and is dropped)."""
    site, _ = cpu_site
    monkeypatch.setattr(callsite, "BINDINGS_PER_OWNER", 2)
    md = nsa.make_example(4, 40, 128, flashmla=True)[0]
    pres = [nsa.make_example(4, 40, 128, flashmla=flash, seed=k)[1] for k, flash in enumerate((True, False, True))]
    pres[2].real_page_table = None  # three structures of one destination object
    for pre in pres:
        site.refresh((md,), id(md), pre, "decode")
    assert not site.step(md, pres[0], "decode")  # the oldest, evicted
    assert site.step(md, pres[1], "decode") and site.step(md, pres[2], "decode")
    d = nsa.default_dispatcher("eager")
    bind = callsite._Binding

    class Adopting(bind):  # a winner adopted on the tuning thread while this one was bound
        def __init__(self, *args):
            super().__init__(*args)
            d.generation += 1
    monkeypatch.setattr(callsite, "_Binding", Adopting)
    site.refresh((md,), id(md), pres[0], "decode")  # runs once, kept nowhere (and evicts pres[1]'s)
    assert not site.step(md, pres[0], "decode") and not site.step(md, pres[1], "decode")
    assert site.step(md, pres[2], "decode") and site.table.size() == 1
