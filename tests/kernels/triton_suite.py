"""Tests only the Triton strategies run (star-imported beside ``exact_suite`` by their test modules)."""

import pytest
import torch

from tests.kernels import triton_checks as checks


@pytest.mark.parametrize("check", [checks.run_unsupported_layout, checks.run_candidates_exact],
                         ids=lambda f: f.__name__[4:])
def test_triton_specific(check, strategy_name, device):
    check(strategy_name, device)


@pytest.mark.cuda
def test_direct_launcher_in_use():
    """On a GPU the compiled launcher must be found; the normal path is only a fallback."""
    from copytune.kernels import triton_launch

    assert triton_launch._probe_direct(torch.device("cuda")) >= 0
