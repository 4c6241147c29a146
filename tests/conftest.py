"""pytest configuration: the ``isa`` fixture runs a test on every ISA path this CPU and build
support (``ktf.available_isas()``); helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The reference and helpers run small torch ops: one intra-op thread keeps them fast and
# predictable on a 2-core machine whose cores the library's own workers also use.
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402


def pytest_generate_tests(metafunc):
    # Parametrize ``isa`` over what the library reports (importing it only for the tests that
    # need it, so that test_reference.py runs before the library builds).
    if "isa" in metafunc.fixturenames:
        isas = list(helpers.ktf().available_isas())
        assert isas, "ktf.available_isas() is empty"
        metafunc.parametrize("isa", isas, scope="module")
    if "missing_isa" in metafunc.fixturenames:
        # ISA paths this CPU/build lacks (none on a machine with AMX: then pytest reports the
        # test as skipped for an empty parameter set).
        avail = set(helpers.ktf().available_isas())
        metafunc.parametrize("missing_isa", [i for i in ("amx", "avx512", "avx2", "amx_emulated") if i not in avail])


@pytest.fixture(scope="session")
def K():
    """The library module."""
    return helpers.ktf()


@pytest.fixture
def make_state(K):
    """Factory: ``make_state(prob, isa=None, lora=True, threads=2, fused=False)``."""
    return helpers.make_state
