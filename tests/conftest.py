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


@pytest.fixture
def free_port():
    """A free TCP port on localhost for a 2-process gloo group (torch.multiprocessing.spawn tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Every test starts seeded and single-threaded, even after a trainer set its own `threads`."""
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random 32 px SigLIP (4x4 grid, 4 blocks) with a byte-vocabulary text tower, in HF layout: the
    tiny teacher the tokenizer trainer and the ablation tests start from."""
    import torch
    from siglip import SigLIP, SigLIPConfig, SigLIPTextConfig, SigLIPVisionConfig
    torch.manual_seed(0)
    v = SigLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=2)
    t = SigLIPTextConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, projection_size=32,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    folder = str(tmp_path_factory.mktemp("teacher"))
    SigLIP(SigLIPConfig(vision=v, text=t)).save_pretrained(folder)
    return folder
