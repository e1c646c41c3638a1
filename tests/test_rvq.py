"""Tests for rvq.py: shapes, straight-through, commitment loss, EMA math against a plain one-hot
re-statement of RQ-VAE's update, convergence on a toy mixture, dead-code restart, bf16, bad input, and
a 2-process gloo DDP run."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import rvq
from rvq import ResidualVQ


def make(**kw):
    cfg = rvq.tiny_config()
    cfg.update(kw)
    return ResidualVQ(**cfg)


def partial(m, codes, d):
    """The running partial sum after the first d depths (zeros for d = 0), from the per-depth codewords."""
    return m.embed_per_depth(codes[..., :d]).sum(-2)


# ------------------------------------------------------------------ a plain reference of the EMA step

def ref_step(m, x):
    """One training forward the straightforward way (full distance matrix, one-hot (K, M) update),
    RQ-VAE's order of operations, restart off. Works on a deepcopy; returns (module, codes, quantized)."""
    m = copy.deepcopy(m)
    K, D = m.codebook_size, m.dim

    def update(b, v, c):
        onehot = torch.zeros(K, v.shape[0])
        onehot[c, torch.arange(v.shape[0])] = 1.0
        m.cluster_size_ema[b] = m.decay * m.cluster_size_ema[b] + (1 - m.decay) * onehot.sum(1)
        m.embed_ema[b] = m.decay * m.embed_ema[b] + (1 - m.decay) * (onehot @ v)
        n = m.cluster_size_ema[b].sum()
        size = n * (m.cluster_size_ema[b] + m.eps) / (n + K * m.eps)
        m.codebook[b] = m.embed_ema[b] / size[:, None]

    r = x.reshape(-1, D).clone()
    q_sum = torch.zeros_like(r)
    codes, res = [], []
    for d in range(m.depth):
        b = m.book_of(d)
        c = torch.cdist(r, m.codebook[b]).argmin(1)
        q = m.codebook[b][c].clone()
        if m.ema_update == "per_depth":
            update(b, r, c)
        res.append(r.clone())
        r = r - q
        q_sum = q_sum + q
        codes.append(c)
    if m.ema_update == "deferred":
        for b in range(m.codebook.shape[0]):
            ds = range(m.depth) if m.shared_codebook else [b]
            update(b, torch.cat([res[d] for d in ds]), torch.cat([codes[d] for d in ds]))
    return m, torch.stack(codes, 1), q_sum


# ------------------------------------------------------------------ basics

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("schedule", ["per_depth", "deferred"])
def test_shapes_dtypes(shared, schedule):
    m = make(shared_codebook=shared, ema_update=schedule)
    n_books = 1 if shared else 3
    assert m.codebook.shape == (n_books, 32, 16) and m.embed_ema.shape == (n_books, 32, 16)
    assert m.cluster_size_ema.shape == (n_books, 32)
    assert set(dict(m.named_buffers())) == {"codebook", "cluster_size_ema", "embed_ema"}
    assert list(m.parameters()) == []
    for train in (True, False):
        m.train(train)
        x = torch.randn(2, 3, 5, 16)
        q, c, loss = m(x)
        assert q.shape == x.shape and q.dtype == torch.float32
        assert c.shape == (2, 3, 5, 3) and c.dtype == torch.int64
        assert loss.shape == () and torch.isfinite(loss)
        assert m.embed_per_depth(c).shape == (2, 3, 5, 3, 16)
        assert m.last_stats["usage"].shape == (3,) and m.last_stats["perplexity"].shape == (3,)
    q, c, _ = m(torch.randn(7, 16, dtype=torch.bfloat16))
    assert q.dtype == torch.bfloat16 and c.shape == (7, 3)


@pytest.mark.parametrize("shared", [True, False])
def test_quantized_equals_embed_eval(shared):
    m = make(shared_codebook=shared).eval()
    x = torch.randn(4, 10, 16)
    q, c, _ = m(x)
    assert torch.equal(q, m.embed(c))
    assert torch.equal(partial(m, c, 3), m.embed(c))
    assert torch.equal(partial(m, c, 0), torch.zeros_like(q))
    assert torch.allclose(m.embed_per_depth(c).sum(-2), q)
    # the residual after depth d is x minus the partial sum: each depth picked the nearest code to it
    for d in range(3):
        r = x - partial(m, c, d)
        book = m.codebook[m.book_of(d)]
        assert torch.equal(torch.cdist(r.reshape(-1, 16), book).argmin(1), c[..., d].reshape(-1))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("schedule", ["per_depth", "deferred"])
def test_quantized_equals_embed_train(shared, schedule):
    """In training the codeword a depth subtracts is the one its search saw (before its update)."""
    m = make(shared_codebook=shared, ema_update=schedule)
    x = torch.randn(4, 10, 16)
    before = copy.deepcopy(m).eval()
    q, c, _ = m(x)
    if schedule == "deferred" or not shared:  # every depth searched an un-updated book
        assert torch.equal(q, before.embed(c))
    # and the codebook did move (training mode)
    assert not torch.equal(m.codebook, before.codebook)
    # per_depth + shared: depth d searched the book after d updates; checked against the reference
    m2 = make(shared_codebook=shared, ema_update=schedule, restart_unused=False)
    _, c_ref, q_ref = ref_step(m2, x)
    q2, c2, _ = m2(x)
    assert torch.equal(c2.reshape(-1, 3), c_ref)
    assert torch.allclose(q2.reshape(-1, 16), q_ref, atol=1e-6)


def test_gradient_reaches_x_not_codebook():
    m = make()
    x = torch.randn(3, 8, 16, requires_grad=True)
    q, c, loss = m(x)
    w = torch.randn_like(q)
    (q * w).sum().backward()
    assert torch.equal(x.grad, w)  # straight-through: identity
    x.grad = None
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not b.requires_grad and b.grad is None for b in m.buffers())
    # bf16 input: gradient still identity, cast back to bf16
    xb = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    m(xb)[0].sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.equal(xb.grad, torch.ones_like(xb))


def test_commit_loss_by_hand():
    m = make().eval()
    x = torch.randn(2, 6, 16)
    _, c, loss = m(x)
    hand = sum(((x - partial(m, c, d + 1)) ** 2).mean() for d in range(3)) / 3
    assert torch.allclose(loss, hand, rtol=1e-6, atol=0)
    # training mode, deferred: partial sums come from the pre-update book
    m = make(ema_update="deferred")
    before = copy.deepcopy(m).eval()
    _, c, loss = m(x)
    hand = sum(((x - partial(before, c, d + 1)) ** 2).mean() for d in range(3)) / 3
    assert torch.allclose(loss, hand, rtol=1e-6, atol=0)


def test_reference_fixture_codes():
    """The authors' code on the fixture's quantizer inputs: codes exact, commitment loss and zq_pix equal.
    The checkpoint's codebook has K+1 rows; the last (padding) row is never searched."""
    from safetensors.torch import load_file
    root = os.path.join(os.path.dirname(__file__), "fixtures", "dualtoken_reference")
    sd = torch.load(os.path.join(root, "model.pt"), map_location="cpu", weights_only=True)["state_dict"]
    out = load_file(os.path.join(root, "outputs.safetensors"))
    for br in ("pix", "sem"):
        m = make().eval()
        m.codebook[0] = sd[f"quantizer_{br}.codebooks.0.weight"][:-1]
        q, c, loss = m(out[f"output.latent_{br}"])
        assert torch.equal(c, out[f"output.code_{br}"]), br
        assert torch.allclose(loss, out[f"output.quant_loss_{br}"], rtol=1e-5, atol=1e-6), br
        if br == "pix":
            assert torch.allclose(q.reshape(2, 16, 16), out["output.zq_pix"], atol=1e-5)


# ------------------------------------------------------------------ EMA

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("schedule", ["per_depth", "deferred"])
def test_ema_matches_one_hot_reference(shared, schedule):
    """Two training steps, restart off: buffers equal a plain one-hot re-statement of the update.
    search_chunk=7 makes the chunked search cover several blocks and a ragged tail."""
    m = make(shared_codebook=shared, ema_update=schedule, restart_unused=False, search_chunk=7)
    for step in range(2):
        x = torch.randn(40, 16)
        ref, c_ref, _ = ref_step(m, x)
        _, c, _ = m(x)
        assert torch.equal(c, c_ref), f"step {step}"
        for name in ("cluster_size_ema", "embed_ema", "codebook"):
            a, b = getattr(m, name), getattr(ref, name)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, step, (a - b).abs().max())


@pytest.mark.parametrize("schedule", ["per_depth", "deferred"])
def test_ema_moves_codewords_to_cluster_means(schedule):
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[4.0, 0, 0, 0], [-4, 0, 0, 0], [0, 4, 0, 0], [0, -4, 0, 0]])
    m = ResidualVQ(dim=4, codebook_size=8, depth=1, decay=0.8, ema_update=schedule)
    for _ in range(60):
        k = torch.randint(0, 4, (256,), generator=g)
        x = means[k] + 0.02 * torch.randn(256, 4, generator=g)
        m(x)
    m.eval()
    book = m.codebook[0]
    live = m.cluster_size_ema[0] > 1.5  # codes that are actually used, not just restarted
    # every cluster mean has a live codeword on it, and every live codeword sits on a cluster mean
    # (8 codes for 4 clusters: a cluster split in two has its halves' centroids ~0.8 std off the mean)
    d = torch.cdist(means, book[live])
    assert d.min(1).values.max() < 0.03, d
    assert d.min(0).values.max() < 0.03, d
    _, c, _ = m(means)
    assert torch.allclose(m.embed(c), means, atol=0.03)


def test_dead_codes_restart():
    m = make(codebook_size=64, depth=1)
    m.codebook[0, :32] += 1e3  # half the book far from any data: never picked
    x = torch.randn(500, 16)
    with torch.no_grad():
        m(x)
    # right after one step, counts start at 0: nearly all codes restarted from batch vectors
    assert torch.all(m.cluster_size_ema[0] >= 1 - 1e-6)
    d = torch.cdist(m.codebook[0, :32], x, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert d.max() < 1e-3, d.max()  # a restarted codeword is a batch vector (count 1, ~no smoothing)
    # after more steps the formerly dead codes are used
    for _ in range(5):
        _, c, _ = m(torch.randn(500, 16))
    assert (c < 32).any()


def test_restart_tiles_small_batch():
    m = make(codebook_size=64, depth=1)
    x = torch.randn(5, 16)  # fewer vectors than codes: tiled with small noise
    m(x)
    book = m.codebook[0]
    d = torch.cdist(book, x).min(1).values
    assert d.max() < 0.01  # noise scale 0.01 / sqrt(D) per coordinate
    assert torch.unique(book, dim=0).shape[0] > 5  # the noise separates the copies


def test_eval_does_not_move_buffers():
    m = make()
    m(torch.randn(20, 16))
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(20, 16))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


# ------------------------------------------------------------------ precision, stats, errors

@pytest.mark.parametrize("train", [False, True])
def test_bf16_autocast_same_codes(train):
    m = make(codebook_size=256, depth=4)
    m.train(train)
    x = torch.randn(3, 50, 16)
    m32 = copy.deepcopy(m)
    torch.manual_seed(1)  # same restart draws in both runs
    _, c32, l32 = m32(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, c, l = m(x)
    assert torch.equal(c, c32)
    assert q.dtype == torch.float32 and l.dtype == torch.float32 and torch.equal(l, l32)
    assert torch.equal(m.codebook, m32.codebook)


def test_code_stats():
    K = 8
    c = torch.stack([torch.arange(16) % K, torch.zeros(16, dtype=torch.long)], 1)  # (16, 2)
    s = rvq.code_stats(c, K)
    assert torch.allclose(s["usage"], torch.tensor([1.0, 1 / K], dtype=s["usage"].dtype))
    assert torch.allclose(s["perplexity"], torch.tensor([8.0, 1.0], dtype=s["perplexity"].dtype))
    uniform = torch.arange(4 * K).remainder(K).view(-1, 1).repeat(1, 2)  # (32, 2): every code 4x per depth
    uniform[:, 1] = 3  # depth 1 collapsed to one code
    s = {k: v.tolist() for k, v in rvq.code_stats(uniform, K).items()}
    assert s["usage"] == [1.0, 1 / K] and s["usage_any_depth"] == 1.0
    assert math.isclose(s["perplexity"][0], K, rel_tol=1e-9) and math.isclose(s["perplexity"][1], 1.0)
    assert math.isclose(s["entropy_bits"][0], 3.0) and s["entropy_bits"][1] == 0.0
    m = make(codebook_size=K, depth=2).eval()
    m(torch.randn(5, 16))  # the quantizer records the same statistic of the codes it found
    assert set(m.last_stats) == set(s) and m.last_stats["usage"].shape == (2,)


def test_bad_input():
    m = make()
    with pytest.raises(ValueError, match=r"x.*\(\.\.\., 16\).*\(2, 5, 15\)"):
        m(torch.randn(2, 5, 15))
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m(x)
    x[1, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m(x)
    with pytest.raises(ValueError, match=r"codes.*\[0, 32\).*32"):
        m.embed(torch.tensor([[0, 1, 32]]))
    with pytest.raises(ValueError, match=r"codes.*\[0, 32\).*-1"):
        m.embed_per_depth(torch.tensor([[-1, 1, 2]]))
    with pytest.raises(ValueError, match=r"codes.*\(\.\.\., 3\).*\(1, 2\)"):
        m.embed(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        m.embed(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ema_update"):
        make(ema_update="sometimes")


# ------------------------------------------------------------------ DDP (2 processes, gloo, CPU)

def _ddp_worker(rank, world, port, out_dir, xs, init_state):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for schedule in ("per_depth", "deferred"):
            for restart in (False, True):
                torch.manual_seed(100 + rank)  # ranks draw different restart vectors unless broadcast
                m = make(ema_update=schedule, restart_unused=restart)
                m.load_state_dict(init_state)
                for x in xs:
                    _, c, _ = m(x.chunk(world)[rank])
                key = f"{schedule}_{restart}"
                res[key + "_codebook"] = m.codebook.clone()
                res[key + "_cse"] = m.cluster_size_ema.clone()
                res[key + "_codes"] = c
        # the collectives are traced into the compiled graph (functional), not split around
        import train_utils as tu
        res["graph_breaks"] = tu.graph_breaks(m, xs[0].chunk(world)[rank])
        # no collective in eval mode or with sync_ddp off: any call would raise here
        def boom(*a, **k):
            raise RuntimeError("collective called")
        import rvq
        dist.all_reduce, dist.broadcast = boom, boom
        rvq.funcol.all_reduce, rvq.funcol.broadcast = boom, boom  # what rvq calls (traceable by torch.compile)
        m.eval()
        m(xs[0])
        m.train()
        m.sync_ddp = False
        m(xs[0])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path, free_port):
    mp = pytest.importorskip("torch.multiprocessing")
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port = free_port
    xs = [torch.randn(2 * 30, 16) for _ in range(3)]
    init_state = make().state_dict()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), xs, init_state), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["graph_breaks"][0] == 0, r0["graph_breaks"]  # c10d's in-place collectives broke it 3x here
    for schedule in ("per_depth", "deferred"):
        for restart in (False, True):
            key = f"{schedule}_{restart}"
            assert torch.equal(r0[key + "_codebook"], r1[key + "_codebook"]), key
            assert torch.equal(r0[key + "_cse"], r1[key + "_cse"]), key
        # single process on the concatenated batch, restart off: same book as the 2-rank run
        m = make(ema_update=schedule, restart_unused=False)
        m.load_state_dict(init_state)
        for x in xs:
            _, c, _ = m(x)
        key = f"{schedule}_False"
        assert torch.allclose(m.codebook, r0[key + "_codebook"], rtol=1e-5, atol=1e-5), key
        assert torch.allclose(m.cluster_size_ema, r0[key + "_cse"], rtol=1e-5, atol=1e-6), key
        assert torch.equal(c, torch.cat([r0[key + "_codes"], r1[key + "_codes"]])), key
