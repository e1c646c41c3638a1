"""Shared test setup: the repository root on sys.path, a fixed seed, one thread per test process.

Tiny configurations live next to the code they exercise (each module exposes a tiny preset, e.g.
`siglip.tiny_config()`), so a test builds a model in milliseconds and a reader sees the same numbers
the test uses.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def pytest_configure(config):
    # Tiny models spend their time in thread-pool hand-offs, not arithmetic: one thread is several
    # times faster for them (and much faster on a shared, loaded CPU) and makes runs reproducible.
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield
