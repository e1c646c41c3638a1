"""train_mllm.py --parallel=fsdp (FSDP2) on CPU with 2 gloo processes: the same weights as one process on the
same global batch, exact resume from the sharded checkpoint, an export that MLLM.from_pretrained reads, a sharded load of
an HF folder equal to the plain loader, FSDP2's bf16 policy; and the memory arithmetic of bench.py memory.

One spawn serves all the 2-process assertions (module fixture `runs`): two fresh interpreters importing torch
cost more than the training."""
import os
from types import SimpleNamespace

import pytest
import torch

import sharding
import train_mllm as tm
import train_utils as tu
from mllm import MLLM, tiny_config
from sequences import build_sequence, collate_sequences, make_targets
from text import prompt_tokenizer
from test_train_mllm import cache_dir, make_cfg, read_log, tok_dir  # noqa: F401 (module fixtures)

# every run: global batch 16 = 2 ranks x micro-batch 4 x accumulation 2 (one process: 4 x accumulation 4).
# Generation samples only and no caption dropout, so what a sample looks like does not depend on its rank's RNG
# (seeded by rank): both layouts train on the same 16 sequences per step. Every gen sample has the same number
# of loss targets (16 image positions, <image_gen_end>, eos), so the mean of four 4-sample means is the
# 16-sample mean: the global batch's gradient, whether averaged by FSDP's reduce-scatter or by accumulation.
RUN = dict(batch_size=16, micro_batch=4, max_steps=4, ckpt_interval=2, mix=(0, 0, 1), caption_dropout=0.0,
           eval_qa=0, eval_gen=0)


def probe_batch(mc):
    """A fixed batch with an understood and a generated image (vis_in, both depth heads and the text head)."""
    g = torch.Generator().manual_seed(3)
    seqs = [build_sequence(mc, [[10, 11, 12], ("und", 16), [13, 14]]), build_sequence(mc, [[15, 16], ("gen", 16), [17]])]
    b = collate_sequences(mc, seqs)
    n = int(b["image_mask"].sum())
    b.update(pix_codes=torch.randint(0, mc.pix_vocab, (n, mc.pix_depth), generator=g),
             sem_codes=torch.randint(0, mc.sem_vocab, (n, mc.sem_depth), generator=g),
             targets=make_targets(b["idx"], b["image_mask"], b["attention_mask"]))
    return b


def hf_cfg(tok_dir, hf_dir, out):
    """A run on a Hugging Face folder (what build_model reads through mllm_hf.from_pretrained), byte-level text."""
    return make_cfg(tok_dir, out, init_from=hf_dir, head_n_layer=1)


def _worker(rank, world, ports, tok_dir, cache_dir, root, hf_dir):
    # one port per process group: a rank that re-initialises on the port of the group just destroyed can reach
    # the other rank's old store before that one is gone, and hang
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    res = {}
    # 1. four steps straight, activation checkpointing on; the process group is kept afterwards (cleanup_ddp
    # skipped once) so that the sharded model can still run a forward
    cleanup, tu.cleanup_ddp = tu.cleanup_ddp, lambda: None
    model, _ = tm.train(make_cfg(tok_dir, os.path.join(root, "a"), cache_dir, parallel="fsdp",
                                 activation_checkpointing=True, **RUN))
    res["local_numel"] = sum(p.to_local().numel() for p in model.parameters())  # before a forward unshards the root
    with torch.no_grad():
        res["logits"] = model(**probe_batch(model.config))[0]
    if hf_dir:  # 2. an HF folder, sharded at load; then the same with FSDP2's bf16 policy and stage 1's trainable set
        from torch.distributed.fsdp import MixedPrecisionPolicy
        cfg = hf_cfg(tok_dir, hf_dir, os.path.join(root, "hf"))
        dual, tok = tm.load_image_tokenizer(tok_dir), prompt_tokenizer("bytes")
        ctx = tu.DDPContext(rank=rank, world=world, local_rank=rank, device="cpu", is_master=rank == 0, ddp=True)
        torch.manual_seed(cfg.seed)
        m = tm.build_sharded(cfg, tok, dual, None, ctx, None)
        b = probe_batch(m.config)
        with torch.no_grad():
            res["hf_logits"], res["hf_loss"] = m(**b)
        torch.manual_seed(cfg.seed)
        cfg.trainable = "input"
        m = tm.build_sharded(cfg, tok, dual, None, ctx, MixedPrecisionPolicy(torch.bfloat16, torch.float32))
        logits, loss = m(**b)
        loss.backward()
        res["bf16"] = dict(logits_dtype=logits.dtype, loss=loss.detach(), grads={
            n: (p.grad.dtype, p.dtype) for n, p in m.named_parameters() if p.grad is not None},
            dtypes={p.dtype for p in m.parameters()})
    tu.cleanup_ddp = cleanup
    cleanup()
    # 3. the same run stopped after two steps, then resumed from its sharded checkpoint to four
    b = os.path.join(root, "b")
    os.environ["MASTER_PORT"] = str(ports[1])
    tm.train(make_cfg(tok_dir, b, cache_dir, parallel="fsdp", activation_checkpointing=True, stop_step=2, **RUN))
    res["after_stop"] = sorted(os.listdir(b))
    os.environ["MASTER_PORT"] = str(ports[2])
    tm.train(make_cfg(tok_dir, b, cache_dir, parallel="fsdp", activation_checkpointing=True, resume=True, **RUN))
    torch.save(res, os.path.join(root, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tok_dir, cache_dir, tmp_path_factory):  # noqa: F811
    import socket
    root = str(tmp_path_factory.mktemp("fsdp"))
    hf_dir = None
    try:
        import transformers
        hf_dir = os.path.join(root, "qwen")
        c = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     max_position_embeddings=256)
        torch.manual_seed(1)
        hf = transformers.Qwen2ForCausalLM(c)
        with torch.no_grad():  # HF leaves norms at 1 and biases at 0: randomise so equal logits mean something
            for n, p in hf.named_parameters():
                p.copy_((1.0 if "norm" in n else 0.0) + 0.1 * torch.randn(p.shape))
        hf.save_pretrained(hf_dir, max_shard_size="40KB")
        assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    except ImportError:
        pass
    socks = [socket.socket() for _ in range(3)]  # conftest's free_port, three at once for a module fixture
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    torch.multiprocessing.spawn(_worker, args=(2, ports, tok_dir, cache_dir, root, hf_dir), nprocs=2, join=True)
    res = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in range(2)]  # ours
    return SimpleNamespace(root=root, hf_dir=hf_dir, res=res)


@pytest.mark.slow  # two fresh interpreters importing torch (shared with the tests below)
def test_fsdp_equals_one_process_on_the_global_batch(runs, tok_dir, cache_dir, tmp_path):  # noqa: F811
    """Four steps of 2-rank FSDP (accumulation 2) end where one process (accumulation 4) ends on the same global
    batches, to 1e-5. Not bit-equal: the four micro-batch gradients are added in another association ((a+b)+(c+d)
    through the reduce-scatter, ((a+b)+c)+d in one process), and where a gradient element nearly cancels, AdamW's
    m / sqrt(v) divides that last-bit difference by a tiny gradient. Measured: max |diff| 1.8e-7; weights moved
    ~1e-2 (lr 3e-3, 4 steps). 1e-5 is 50x the first and 1000x below the second, while a gradient that misses a
    rank's half or a micro-batch moves weights by ~lr."""
    one, _ = tm.train(make_cfg(tok_dir, tmp_path / "one", cache_dir, **RUN))
    fsdp = MLLM.from_pretrained(os.path.join(runs.root, "a"))
    torch.manual_seed(0)
    init = tm.build_model(make_cfg(tok_dir, tmp_path / "x"), tm.mllm_text_tokenizer(make_cfg(tok_dir, tmp_path))[0],
                          tm.load_image_tokenizer(tok_dir))
    a, b, i = one.state_dict(), fsdp.state_dict(), init.state_dict()
    assert a.keys() == b.keys()
    moved = max((a[k] - i[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)


@pytest.mark.slow
def test_fsdp_resume_is_exact(runs):
    """Stopped at step 2 and resumed from the sharded checkpoint == four steps straight, bit for bit: weights,
    AdamW state (read from each run's torch.distributed.checkpoint folder) and the logged losses."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    after_stop = runs.res[0]["after_stop"]
    assert "train_state.pt.shards.00000002" in after_stop and not any(f.endswith(".tmp") for f in after_stop)
    a, b = (os.path.join(runs.root, d) for d in "ab")
    sa, sb = (torch.load(os.path.join(d, "train_state.pt"), weights_only=True) for d in (a, b))
    assert sa["step"] == sb["step"] == 4 and sa["consumed"] == sb["consumed"] == 8  # micro-batches per rank
    assert sa["sharded"] == sb["sharded"] == "train_state.pt.shards.00000004"
    assert sorted(f for f in os.listdir(b) if ".shards." in f) == [sb["sharded"]]  # older shards removed
    full = []
    for d, s in ((a, sa), (b, sb)):
        dcp_to_torch_save(os.path.join(d, s["sharded"]), os.path.join(d, "full.pt"))
        full.append(torch.load(os.path.join(d, "full.pt"), weights_only=True))
    fa, fb = full
    assert fa["model"].keys() == fb["model"].keys() and len(fa["optimizer"]["state"]) > 10
    for k, v in fa["model"].items():
        assert torch.equal(v, fb["model"][k]), k
    for k, st in fa["optimizer"]["state"].items():
        for n, v in st.items():
            assert torch.equal(v, fb["optimizer"]["state"][k][n]), (k, n)
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]
    ma, mb = MLLM.from_pretrained(a), MLLM.from_pretrained(b)
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k


@pytest.mark.slow
def test_fsdp_export_loads_with_the_same_logits(runs):
    """The export (gathered to rank 0, written as a DDP run writes it) loads with MLLM.from_pretrained and computes the
    sharded model's logits; the sharded parameters hold every weight once (each rank its rows) and rank 0's
    share is sharding.state_bytes' FSDP count."""
    model = MLLM.from_pretrained(os.path.join(runs.root, "a"))
    info = model.export_info
    assert model.lm_head.weight is model.embed.weight and info["tokenizer_hash"]
    with torch.no_grad():
        logits, _ = model(**probe_batch(model.config))
    for r in runs.res:
        assert torch.allclose(r["logits"], logits, atol=1e-6, rtol=0), (r["logits"] - logits).abs().max()
    n = [r["local_numel"] for r in runs.res]
    assert sum(n) == sum(p.numel() for p in model.parameters())
    assert 4 * n[0] == sharding.state_bytes(model, world=2, fsdp=True)["params"] and n[1] <= n[0]


@pytest.mark.slow
def test_fsdp_sharded_load_of_hf_folder_equals_plain_loader(runs, tok_dir, tmp_path):  # noqa: F811
    """Meta-device build + sharded load of a sharded HF safetensors folder (rank 0 reads it through the strict
    plain loader, every rank keeps its rows) computes what the plain single-process model computes: the trunk
    from the folder, the seeded visual side and the codebooks. With FSDP2's bf16 policy and stage 1's set:
    bf16 compute (logits), fp32 master shards and fp32 gradients for the input projector only."""
    if runs.hf_dir is None:
        pytest.skip("the HF folder is written with transformers, which is not installed")
    cfg = hf_cfg(tok_dir, runs.hf_dir, tmp_path)
    torch.manual_seed(cfg.seed)
    plain = tm.build_model(cfg, prompt_tokenizer("bytes"), tm.load_image_tokenizer(tok_dir)).eval()
    b = probe_batch(plain.config)
    with torch.no_grad():
        logits, loss = plain(**b)
    for r in runs.res:
        torch.testing.assert_close(r["hf_logits"], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["hf_loss"], loss, atol=1e-5, rtol=1e-5)
        bf = r["bf16"]
        assert bf["logits_dtype"] == torch.bfloat16 and bf["dtypes"] == {torch.float32}
        assert {n.split(".")[0] for n in bf["grads"]} == {"vis_in"}
        assert set(bf["grads"].values()) == {(torch.float32, torch.float32)}
        assert abs(bf["loss"].item() - loss.item()) < 0.05 * loss.item()  # bf16 compute of the same model


# ----------------------------------------------------------------------------------------------------
# single process

def test_activation_checkpointing_keeps_the_gradients():
    """checkpoint_blocks recomputes each block in the backward: the same loss and gradients, the same names."""
    cfg = tiny_config()
    torch.manual_seed(0)
    a = MLLM(cfg)
    a.set_codebooks(torch.randn(cfg.pix_vocab, cfg.pix_dim), torch.randn(cfg.sem_vocab, cfg.sem_dim))
    b = MLLM(cfg)
    b.load_state_dict(a.state_dict())
    sharding.checkpoint_blocks(b.layers)
    assert list(a.state_dict()) == list(b.state_dict())
    batch = probe_batch(cfg)
    for m in (a, b):
        m(**batch)[1].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_parallel_key_is_checked(tok_dir, tmp_path, monkeypatch):  # noqa: F811
    from configurator import UserError
    with pytest.raises(UserError, match="--parallel='zero'"):
        tm.validate(make_cfg(tok_dir, tmp_path, parallel="zero"))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="torchrun"):
        tm.validate(make_cfg(tok_dir, tmp_path, parallel="fsdp"))


def test_state_bytes_counts_the_real_parameters():
    """sharding.state_bytes against a tiny model's own parameter count (a tied head once), per trainable set."""
    m = MLLM(tiny_config())
    n = sum(p.numel() for p in m.parameters())
    assert n == sum(v.numel() for k, v in m.state_dict().items() if k not in ("lm_head.weight", "pix_book", "sem_book"))
    s = sharding.state_bytes(m)
    assert s == dict(params=4 * n, grads=4 * n, adam=8 * n, buffers=4 * (m.pix_book.numel() + m.sem_book.numel()))
    m.set_trainable("input")
    k = sum(p.numel() for p in m.vis_in.parameters())
    s1, s2 = sharding.state_bytes(m), sharding.state_bytes(m, world=2, fsdp=True)
    assert (s1["params"], s1["grads"], s1["adam"]) == (4 * n, 4 * k, 8 * k)
    # FSDP: dim 0 in ceil(n0 / 2) rows: the embedding (vocab 263, odd) has rank 0's extra row
    half = sum(-(-p.shape[0] // 2) * p[0].numel() for p in m.parameters())
    assert s2["params"] == 4 * half and n / 2 < half < n / 2 + 64 * 4 and s2["buffers"] == s1["buffers"]


def test_memory_table_of_a_stage_preset(capsys):
    """bench.py memory on the meta device: the 3B trunk has Qwen2.5-3B's published parameter count, and the
    table's rows are sharding.state_bytes of the preset's trainable set."""
    import bench
    import mllm_hf
    from conftest import ROOT
    preset, tok = (os.path.join(ROOT, "config", f) for f in ("mllm_stage3.py", "dualtoken_384.py"))
    model, trainable = mllm_hf.stage_model(preset, "qwen2.5-3b", tok)
    trunk = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("embed", "layers", "norm"))
    assert trunk == 3_085_938_688 + 4 * 2048  # Qwen2.5-3B (tied head) + the 4 image tokens' embedding rows
    assert model.config.pix_depth == model.config.sem_depth == 8 and model.config.head_n_layer == 3
    k = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == "output" and k == sum(p.numel() for h in (model.pix_head, model.sem_head) for p in h.parameters())
    rows = dict(bench.memory_rows(model, (1, 8)))
    assert rows["ddp, any N"] == rows["fsdp, N=1"] and rows["ddp, any N"]["adam"] == 8 * k
    d, f = rows["ddp, any N"], rows["fsdp, N=8"]
    assert abs(f["params"] - d["params"] / 8) < 1e-4 * d["params"] and f["buffers"] == d["buffers"] > 0
    bench.main(["memory", preset, f"--tokenizer={tok}"])
    out = capsys.readouterr().out
    assert "trainable=output" in out and "fsdp, N=8" in out and out.count("\n") > 8
