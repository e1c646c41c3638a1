"""train_utils: crash-safe saves, exact RNG / data-position resume, DDP sharding, schedule and guards."""
import json
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_utils as tu
from configurator import UserError


def test_atomic_save_survives_crash_mid_save(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    tu.atomic_save({"step": 1, "w": torch.arange(4.0)}, path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04partial bytes of a new checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        tu.atomic_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_save_safetensors_roundtrip(tmp_path):
    from safetensors import safe_open
    path = str(tmp_path / "m.safetensors")
    t = {"a": torch.randn(3, 4).t(), "b": torch.arange(5)}  # a non-contiguous view is fine
    tu.atomic_save_safetensors(t, path, metadata={"format": "pt"})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), t["a"]) and torch.equal(f.get_tensor("b"), t["b"])


def test_rng_roundtrip_through_weights_only_load(tmp_path):
    random.random(); np.random.rand(); torch.rand(1)
    path = str(tmp_path / "rng.pt")
    tu.atomic_save([tu.rng_state()], path)  # all_rng_states' list, one rank
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    one, two = SimpleNamespace(world=1, rank=0), SimpleNamespace(world=2, rank=1)
    tu.restore_rng_states(torch.load(path, weights_only=True), one, path)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert first == again
    with pytest.raises(UserError, match=r"rng.pt has RNG states for 1 processes, this run has 2"):
        tu.restore_rng_states(torch.load(path, weights_only=True), two, path)


def test_sampler_resume_gives_same_next_batches():
    full = tu.ShardedSampler(n=10, seed=3, rank=0, world=1, batch_size=4)
    batches = [next(full) for _ in range(8)]
    s = tu.ShardedSampler(n=10, seed=3, rank=0, world=1, batch_size=4)
    for _ in range(3):
        next(s)
    state = s.state_dict()
    resumed = tu.ShardedSampler(n=10, seed=3, rank=0, world=1, batch_size=4)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(5)] == batches[3:]
    with pytest.raises(ValueError, match="seed"):
        tu.ShardedSampler(n=10, seed=4, rank=0, world=1, batch_size=4).load_state_dict(state)


def test_sampler_epochs_are_permutations_and_differ():
    s = tu.ShardedSampler(n=12, seed=0, rank=0, world=1, batch_size=4)
    e0 = sum((next(s) for _ in range(3)), [])
    e1 = sum((next(s) for _ in range(3)), [])
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1


def test_shards_disjoint_and_covering():
    n, world, B = 24, 3, 2
    ranks = [tu.ShardedSampler(n, seed=1, rank=r, world=world, batch_size=B) for r in range(world)]
    seen = []
    for _ in range(n // (world * B)):  # one epoch of global batches
        step = [next(s) for s in ranks]
        assert all(len(b) == B for b in step)
        seen += sum(step, [])
    assert sorted(seen) == list(range(n))  # disjoint (no repeats) and covering


def test_grad_accum_steps():
    assert tu.grad_accum_steps(64, 8, 2) == 4
    with pytest.raises(ValueError, match="micro batch 6"):
        tu.grad_accum_steps(64, 6, 2)
    with pytest.raises(ValueError):
        tu.grad_accum_steps(8, 8, 2)


def test_cosine_schedule_endpoints():
    lr, lo = 1e-3, 1e-5
    assert tu.cosine_lr(0, 10, 100, lr, lo) == pytest.approx(lr / 10)
    assert tu.cosine_lr(9, 10, 100, lr, lo) == pytest.approx(lr)
    assert tu.cosine_lr(10, 10, 100, lr, lo) == pytest.approx(lr)
    assert tu.cosine_lr(55, 10, 100, lr, lo) == pytest.approx((lr + lo) / 2)
    assert tu.cosine_lr(100, 10, 100, lr, lo) == pytest.approx(lo)
    assert tu.cosine_lr(500, 10, 100, lr, lo) == pytest.approx(lo)


def test_cycle_lr_warm_restarts():
    c = ((100, 1.0), (50, 0.3))
    for s in (0, 9, 10, 55, 99):  # the first cycle is cosine_lr itself
        assert tu.cycle_lr(s, 10, c, 0.1) == pytest.approx(tu.cosine_lr(s, 10, 100, 1.0, 0.1))
    assert tu.cycle_lr(100, 10, c, 0.1) == pytest.approx(0.03)  # the restart warms up again from peak / warmup
    assert tu.cycle_lr(109, 10, c, 0.1) == pytest.approx(0.3)
    assert tu.cycle_lr(130, 10, c, 0.1) == pytest.approx((0.3 + 0.03) / 2)
    assert tu.cycle_lr(150, 10, c, 0.1) == tu.cycle_lr(900, 10, c, 0.1) == pytest.approx(0.03)


@pytest.mark.parametrize("cycles,msg", [(((100, 1.0), (40, 0.3)), "sum to 140, --max_steps=150"),
                                        (((150, 0.0),), "peak > 0"), (((150,),), "expected"),
                                        (((0, 1.0), (150, 1.0)), "steps >= 1"), ((("a", 1.0),), "expected"),
                                        (((149.5, 1.0),), "expected")])
def test_check_cycles_refuses(cycles, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        tu.check_cycles(cycles, 150)
    tu.check_cycles((), 150)
    tu.check_cycles(((100, 1.0), (50, 0.3)), 150)


def test_param_groups_decay_only_matrices():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = tu.param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    first = {id(p) for p in m[0].parameters()}  # parts: per part a decay and a no-decay group, empty ones left out
    groups = tu.param_groups(m, 0.1, {"a": (1.0, lambda p: id(p) in first), "b": (2.0, lambda p: id(p) not in first)})
    assert [(g["name"], g["base_lr"], g["weight_decay"], len(g["params"])) for g in groups] == \
        [("a_decay", 1.0, 0.1, 1), ("a_no_decay", 1.0, 0.0, 1), ("b_no_decay", 2.0, 0.0, 2)]


def test_check_finite_names_term():
    tu.check_finite({"a": torch.tensor(1.0), "b": 2.0}, step=3)
    with pytest.raises(FloatingPointError, match="'b'.*step 7"):
        tu.check_finite({"a": 1.0, "b": torch.tensor(float("nan"))}, step=7)


def test_logger(tmp_path):
    log = tu.JsonlLogger(str(tmp_path / "log" / "train.jsonl"))
    log.log(step=1, loss=torch.tensor(0.5))
    log.log(step=2, loss=0.25)
    tu.JsonlLogger(str(tmp_path / "other.jsonl"), enabled=False).log(step=1)
    rows = [json.loads(l) for l in open(tmp_path / "log" / "train.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert not (tmp_path / "other.jsonl").exists()
    tu.JsonlLogger(str(tmp_path / "log" / "train.jsonl")).log(step=3)  # a resumed run appends
    assert [json.loads(l)["step"] for l in open(tmp_path / "log" / "train.jsonl")] == [1, 2, 3]
    tu.JsonlLogger(str(tmp_path / "log" / "train.jsonl"), fresh=True).log(step=1)  # a new run starts its own log
    assert [json.loads(l)["step"] for l in open(tmp_path / "log" / "train.jsonl")] == [1]


def test_autocast_ctx_is_noop_on_cpu():
    with tu.autocast_ctx("cpu", "bfloat16"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        tu.autocast_ctx("cuda", "int8")


def test_setup_ddp_single_process_and_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = tu.setup_ddp("cpu")
    assert (ctx.rank, ctx.world, ctx.is_master, ctx.ddp, ctx.device) == (0, 1, True, False, "cpu")
    # what torchrun would set for a one-process gloo group on CPU
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ctx = tu.setup_ddp("cpu")
    try:
        assert ctx.ddp and ctx.is_master and torch.distributed.get_backend() == "gloo"
    finally:
        tu.cleanup_ddp()
    assert not torch.distributed.is_initialized()



def test_ctrl_c_during_a_checkpoint_is_raised_after_it(monkeypatch):
    """A SIGINT that the OS hands to another thread (a BLAS or tqdm thread) in the middle of a checkpoint save is
    held until the save's block ends: the Python work inside it runs to completion, PROGRESS names the step, and
    KeyboardInterrupt comes after. Blocking the signal in the main thread alone let it through mid-save."""
    import signal
    import threading
    monkeypatch.setattr(tu, "PROGRESS", dict(tu.PROGRESS))
    go, sent = threading.Event(), threading.Event()

    def other_thread():  # started before the block, so its signal mask is the process's usual one
        go.wait(10)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        sent.set()
    t = threading.Thread(target=other_thread)
    t.start()
    work = []
    with pytest.raises(KeyboardInterrupt):
        with tu.checkpoint_commit(7):
            go.set()
            sent.wait(10)
            for i in range(20000):  # Python bytecode after the signal: where a KeyboardInterrupt would land
                work.append(i)
    t.join()
    assert sent.is_set() and len(work) == 20000 and tu.PROGRESS["checkpoint"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
