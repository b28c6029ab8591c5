"""Start-up tuning in the real engine: right after the engine builds a captured batch size's graph buffers, the
integration resolves that buffer's refresh key, so the first serving step is a lookup (no interim choice, nothing
handed to background tuning); and the activation line says what an operator needs."""

import logging

import pytest
import torch

from copytune import Dispatcher, get_strategy, nsa
from tests.engine.test_engine_parity import device, engine  # noqa: F401 - fixtures

BATCH_SIZES = (2, 8)
MAX_LEN = 40  # the width tuned at start-up and the first steps' widths: one bucket, one alignment


def _timer(step, mode, dev):
    step(0)
    return 1.0 if step.launch.strategy == "torch_foreach" else 5.0


@pytest.fixture
def dispatcher(tmp_path, monkeypatch):
    d = Dispatcher(tmp_path / "c.db", pool={n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")},
                   tuning="deferred", timer=_timer)
    monkeypatch.setattr("copytune.dispatch._default", {"eager": d})
    monkeypatch.setenv("COPYTUNE_STARTUP_MAX_LENS", str(MAX_LEN))
    return d


def test_capture_resolves_every_batch_size_before_the_first_step(engine, device, dispatcher, logged):  # noqa: F811
    cls, backend, capture = engine.capturing_backend(BATCH_SIZES, device=device)
    fm = engine.forward_mode("decode")
    with logged(r"copytune: serving sglang.*patched .*Capturing.*cache .*c\.db \(0 keys\)", logging.INFO):
        assert nsa.install(cls)
    try:
        with logged(r"start-up tuning, bs 8 decode: 1 key\(s\) tuned", logging.INFO):
            for bs in BATCH_SIZES:
                capture(bs)
        assert sorted(c.origin for c in dispatcher._table.values()) == ["tuned", "tuned"]
        for bs in BATCH_SIZES:
            for step, max_len in enumerate((MAX_LEN, MAX_LEN - 4)):
                pre = engine.make_precomputed(bs, "decode", max_len, seed=step, device=device)
                backend.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pre,
                                                                                forward_mode=fm)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                for src, dst in nsa.copy_pairs(backend.decode_cuda_graph_metadata[bs], pre, fm):
                    assert torch.equal(src, dst)
            binding = nsa._SITE.binding(id(backend.decode_cuda_graph_metadata[bs]))
            assert (binding.bound.choice.strategy, binding.bound.choice.origin) == ("torch_foreach", "tuned")
        assert dispatcher._background is None  # no step met a key it had to hand off
    finally:
        nsa.uninstall()


def test_start_up_tuning_can_be_turned_off_and_never_breaks_the_capture(engine, device, dispatcher,  # noqa: F811
                                                                         monkeypatch, logged):
    cls, backend, capture = engine.capturing_backend(BATCH_SIZES, device=device)
    nsa.install(cls)
    try:
        monkeypatch.setenv("COPYTUNE_STARTUP_MAX_LENS", "none")
        capture(2)
        assert dispatcher._table == {}
        monkeypatch.setenv("COPYTUNE_STARTUP_MAX_LENS", str(MAX_LEN))
        monkeypatch.setattr(nsa, "prepare", lambda *a, **k: 1 / 0)
        with logged("start-up tuning skipped \\(ZeroDivisionError"):
            capture(8)
        assert 8 in backend.decode_cuda_graph_metadata  # the engine's own work happened
    finally:
        nsa.uninstall()
