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


@pytest.fixture
def broken_safetensors(monkeypatch):
    """safetensors' writers fail as a full disk or a killed job would: save_file leaves a partial file at
    the name it was given, save raises. Returns monkeypatch (undo() restores the real writers)."""
    import safetensors.torch as st

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    def broken_save(tensors, metadata=None):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "save_file", broken_save_file)
    monkeypatch.setattr(st, "save", broken_save)
    return monkeypatch


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


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """A random tiny DualToken (32 px, 4x4 grid) in our folder layout (tok/) and its SigLIP tower in HF
    layout (siglip/, standing in for the original tower, the teacher)."""
    import torch
    import tokenizer
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = tokenizer.DualToken(tokenizer.tiny_config())
    m.save_pretrained(str(d / "tok"))
    m.siglip.save_pretrained(str(d / "siglip"))
    return d


@pytest.fixture(scope="session")
def tiny_mllm(tiny_tok):
    """A tiny MLLM written the way train_mllm.py writes its out_dir (build_model + MLLM.save_pretrained), on
    tiny_tok's tokenizer with the byte prompt tokenizer."""
    import torch
    import configurator
    import loaders
    import text
    import train_mllm
    from tokenizer import DualToken
    torch.manual_seed(0)
    dual = DualToken.from_pretrained(str(tiny_tok / "tok"))
    cfg = configurator.make(train_mllm.TrainMLLMConfig, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                            intermediate_size=64, head_n_layer=1)
    raw = train_mllm.build_model(cfg, text.PromptTokenizer("bytes"), dual)
    out = tiny_tok / "mllm"
    raw.save_pretrained(str(out), dict(tokenizer=str(tiny_tok / "tok"), text_tokenizer="bytes",
                                       tokenizer_hash=loaders.tokenizer_hash(dual)))
    return out
