"""The exactness suite every strategy runs: each ``tests/kernels/test_<strategy>.py`` star-imports these tests and
defines the ``strategy_name`` fixture (and skips itself where the strategy cannot run)."""

import pytest

from tests.cases import DTYPES, LAYOUTS
from tests.kernels import triton_checks as checks


@pytest.mark.parametrize("seed", range(30))
def test_random_batches_bit_exact(seed, strategy_name, device):
    checks.run_random(strategy_name, seed, device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_dtype_and_layout(dtype, layout, strategy_name, device):
    checks.run_dtype_layout(strategy_name, dtype, layout, device)


@pytest.mark.parametrize("seed", range(4))
def test_bound_launch_takes_new_sources(seed, strategy_name, device):
    checks.run_bound_sources(strategy_name, seed, device)


@pytest.mark.parametrize(
    "check",
    [checks.run_many_copies_chunked, checks.run_page_table_slice, checks.run_interleaved_destinations,
     checks.run_misaligned_new_source, checks.run_all_dtypes],
    ids=lambda f: f.__name__[4:],
)
def test_layouts_and_edges(check, strategy_name, device):
    check(strategy_name, device)


def test_the_launch_contract(strategy_name, device):
    """Every strategy's bind returns a BoundLaunch: each capability answers as declared (a bool, a callable or
    None), the fast launchers return None when they copied and a one-line message — never an exception — when
    they refused, and tunables are hashable Configs the strategy itself accepts."""
    from types import SimpleNamespace

    import torch

    from copytune import CopyPlan, get_strategy
    from copytune.kernels import BoundLaunch, Config
    from copytune.kernels.base import launch_error
    from tests.cases import random_fill

    strategy = get_strategy(strategy_name)
    if strategy.available(device) is not None:
        pytest.skip(strategy.available(device))
    assert isinstance(strategy.serves_cpu, bool)
    # rows of a wider buffer: a launch describes them as rows (a full-width 2-D copy would be one merged row, and
    # following its source's shape is BoundCopy's job, which splits it back first)
    i32 = dict(dtype=torch.int32, device=device)
    dsts = [torch.zeros(7, **i32), torch.zeros(5, 12, **i32)[:, :9]]
    srcs = [random_fill(torch.empty_like(d)) for d in dsts]
    plan = CopyPlan.from_pairs(list(zip(srcs, dsts)))
    for params in strategy.candidates(plan):
        assert isinstance(params, Config) and hash(params) == hash(Config(dict(params)))
        assert strategy.validate_params(params) is None
        with pytest.raises(TypeError, match="immutable"):
            params["unroll"] = 3
    launch = strategy.bind(plan, strategy.candidates(plan)[0])
    assert isinstance(launch, BoundLaunch) and launch.strategy == strategy_name
    assert isinstance(launch.expect_sources(srcs), bool) and launch.checks_sources in (True, False)
    assert isinstance(launch.follow_source_shape(1, 9 * 4, 4), bool)
    fresh = [random_fill(torch.empty_like(s)) for s in srcs]
    run = launch.sources_launcher()
    assert run(fresh) is None
    _sync(device)
    assert all(torch.equal(s, d) for s, d in zip(fresh, dsts))
    refused = run([fresh[0]])  # one source for two copies
    assert isinstance(refused, str) and refused.startswith(f"{strategy_name}: ") and "\n" not in refused
    assert isinstance(launch_error(refused), (ValueError, RuntimeError))
    by_name = launch.attribute_launcher(["a", "b"])
    if by_name is not None:
        again = [random_fill(torch.empty_like(s)) for s in srcs]
        assert by_name(SimpleNamespace(a=again[0], b=again[1])) is None
        _sync(device)
        assert all(torch.equal(s, d) for s, d in zip(again, dsts))
        assert isinstance(by_name(SimpleNamespace(a=again[0])), str)
        by_index = launch.attribute_launcher([1, 0])  # the same sources as items of a tuple
        if by_index is not None:
            more = [random_fill(torch.empty_like(s)) for s in srcs]
            assert by_index((more[1], more[0])) is None
            _sync(device)
            assert all(torch.equal(s, d) for s, d in zip(more, dsts))
            assert isinstance(by_index((more[1],)), str)
        table = launch.seam_table(None, ["size"], ["extra"])
        if table is not None:  # an engine seam's step: (owner, source, mode) launches what was put for them
            by_name = launch.attribute_launcher(["a", "b"])  # a launch reads its sources one way: the last asked
            owner, step = SimpleNamespace(), table.fast_run()
            assert table.put(owner, "decode", SimpleNamespace(size=2, extra=None), by_name) == ""
            last = [random_fill(torch.empty_like(s)) for s in srcs]
            assert step(owner, SimpleNamespace(a=last[0], b=last[1], size=2, extra=None), "decode") is True
            _sync(device)
            assert all(torch.equal(s, d) for s, d in zip(last, dsts))
            assert step(owner, SimpleNamespace(a=last[0], b=last[1], size=3, extra=None), "decode") is False
            assert step(owner, SimpleNamespace(a=last[0], b=last[1], size=2, extra=1), "decode") is False
            assert step(SimpleNamespace(), SimpleNamespace(a=last[0], b=last[1], size=2, extra=None), "decode") is False
            assert step(owner, SimpleNamespace(a=last[0], size=2, extra=None), "decode") is False  # refused source
            assert table.served() == 1
            table.drop(by_name)
            assert table.size() == 0 and step(owner, SimpleNamespace(a=last[0], b=last[1], size=2, extra=None),
                                              "decode") is False


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
