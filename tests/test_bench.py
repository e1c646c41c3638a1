"""bench.py gpu's arithmetic on the CPU: the analytic FLOP counts of flops.py against torch's FlopCounterMode
running the real modules forward and backward on tiny configs, the MFU table and its fallbacks, the graph
breaks of a compiled training step, and `bench.py gpu` without cuda.

Like with like: FlopCounterMode counts matmuls, convolutions and attention, as flops.py does. Two things
it does not see are handled here: attention runs on SDPA's math backend (the CPU's fused kernel is not in
the counter's table; math is plain bmm, whose backward is 2x forward, flops.py's convention), and the
quantizer's in-place addmm_ (not in the table either) is counted by wrapping ResidualVQ.search. With that
the counts agree EXACTLY: the formulas leave nothing out that the counter counts, so no tolerance is
needed; a term missing or doubled anywhere (a projection, a decoder level, the backward of a frozen input)
would show as a difference of at least a fraction of a percent even on these tiny models.
"""
import contextlib
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flops
import mllm
import sequences
import tokenizer as tkz
import train_utils as tu
from losses import LPIPS, LossConfig, TokenizerLoss
from rvq import ResidualVQ
from siglip import SigLIP


def measured(fn):
    fc = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), fc:
        fn()
    return fc.get_total_flops()


@contextlib.contextmanager
def count_search(monkeypatch):
    """Adds up the (N, K) distance products ResidualVQ.search makes (its addmm_ escapes FlopCounterMode)."""
    seen = []
    orig = ResidualVQ.search

    def search(self, r, book):
        seen.append(2 * r.shape[0] * book.shape[0] * book.shape[1])
        return orig(self, r, book)

    monkeypatch.setattr(ResidualVQ, "search", search)
    yield seen


def _tok_cfg(variant):
    c = tkz.tiny_config()
    if variant == "tied":  # ablation run (a): one quantizer, decoded and distilled, no shortcut
        return dataclasses.replace(c, layer_recon=5, layer_shortcut=None, tie_branches=True)
    if variant == "recon_only":  # pixel branch on the patches alone, no semantic branch, the patch-skip MLP
        return dataclasses.replace(c, layer_recon=0, layer_shortcut=None, semantic_branch=False, pix_attn=False,
                                   decoder=dataclasses.replace(c.decoder, patch_skip=24))
    return c


@pytest.mark.parametrize("variant", ["released", "tied", "recon_only"])
def test_tokenizer_step_flops_match_the_counter(variant, monkeypatch):
    torch.manual_seed(0)
    cfg, B = _tok_cfg(variant), 2
    model = tkz.DualToken(cfg).train()
    teacher = SigLIP(cfg.siglip).eval().requires_grad_(False)
    chns = (8, 16, 16, 16, 16)  # LPIPS's VGG at a tiny width (the formula takes the widths)
    loss_fn = TokenizerLoss(LossConfig(), LPIPS(chns))
    x = torch.rand(B, 3, 32, 32) * 2 - 1
    sem = cfg.semantic_branch

    def step():
        t_sem, t_pool = tkz.teacher_features(teacher, x, cfg.layer_sem) if sem else (None, None)
        out = model(x)
        loss, _ = loss_fn(x, out.recon, out.zq_sem, t_sem, out.pooled, t_pool, out.commit_pix,
                          out.commit_sem if model.quantizer_sem is not None else None)
        loss.backward()

    with count_search(monkeypatch) as searches:
        got = measured(step)
    want = flops.tokenizer_step(cfg, B)
    want["lpips"] = 2 * B * flops.lpips(32, chns)
    assert sum(searches) == want.pop("rvq_search") > 0
    assert got == sum(want.values()), (got, want)
    assert ("teacher" in want) == sem


def _mllm_batch(cfg, model):
    """Three rows (a generated image, a read image, text only), left-padded, as sequences.make_batch lays them out."""
    g = torch.Generator().manual_seed(0)
    model.set_codebooks(torch.randn(cfg.pix_vocab, cfg.pix_dim, generator=g),
                        torch.randn(cfg.sem_vocab, cfg.sem_dim, generator=g))
    seqs = [sequences.build_sequence(cfg, p) for p in ([[5, 6, 7], ("gen", 16)], [("und", 16), [8, 9, 10, 11, 12]],
                                                  [[13, 14]])]
    b = sequences.collate_sequences(cfg, seqs)
    b["targets"] = sequences.make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    n_img = int(b["image_mask"].sum())
    b["pix_codes"] = torch.randint(0, cfg.pix_vocab, (n_img, cfg.pix_depth), generator=g)
    b["sem_codes"] = torch.randint(0, cfg.sem_vocab, (n_img, cfg.sem_depth), generator=g)
    return b


@pytest.mark.parametrize("switches", [{}, dict(head_code_logits=True, gen_sem=False, gen_caption_loss=1.0,
                                               gen_ground_loss=1.0, vis_norm=True, image_pos=16, head_n_layer=1)])
def test_mllm_step_flops_match_the_counter(switches):
    torch.manual_seed(0)
    cfg = mllm.tiny_config(**switches)
    model = mllm.MLLM(cfg).train()
    b = _mllm_batch(cfg, model)
    n_img = int(b["image_mask"].sum())
    if cfg.gen_ground_loss:
        b["ground_words"] = torch.randint(-1, cfg.vocab_size, (n_img, 3), generator=torch.Generator().manual_seed(1))
    n_gen = int(model._code_targets(torch.zeros(*b["idx"].shape, 1), b["image_mask"], b["attention_mask"],
                                    b["gen_mask"])[0].sum())
    assert n_gen == int((b["gen_mask"] & b["image_mask"]).sum()) == 16  # the caption head's rows too
    got = measured(lambda: model(**b)[1].backward())
    B, T = b["idx"].shape
    want = flops.mllm_step(cfg, B, T, n_img, n_gen)
    assert got == sum(want.values()), (got, want)
    assert ("caption_head" in want) == ("ground_head" in want) == bool(switches)


@pytest.mark.slow  # dynamo traces both models (~5 s)
def test_compiled_training_steps_break_at_most_where_the_data_decides():
    """What the trainers compile, traced by dynamo: the tokenizer's forward (train_tokenizer.py computes the
    loss eagerly after it) is one graph; the MLLM's forward with its loss breaks once, where the number of
    generated positions (the depth heads' batch) is read from the data. Before the compile work these were
    10 and 11 breaks (host reads in the quantizer and input checks, bincount, boolean indexing)."""
    torch.manual_seed(0)
    n, why = tu.graph_breaks(tkz.DualToken(tkz.tiny_config()).train(), torch.rand(2, 3, 32, 32) * 2 - 1)
    assert n == 0, why
    cfg = mllm.tiny_config()
    model = mllm.MLLM(cfg).train()
    n, why = tu.graph_breaks(model, **_mllm_batch(cfg, model))
    assert n <= 1 and all("mllm.py" in w for w in why), why
    # the shapes preset's auxiliary losses: the caption loss selects its rows in a second eager call (6 before)
    cfg = mllm.tiny_config(gen_caption_loss=1.0, gen_ground_loss=1.0)
    model = mllm.MLLM(cfg).train()
    b = _mllm_batch(cfg, model)
    b["ground_words"] = torch.randint(-1, cfg.vocab_size, (b["pix_codes"].shape[0], 3))
    n, why = tu.graph_breaks(model, **b)
    assert n <= 3 and all("mllm.py" in w for w in why), why


def test_peak_table_and_override():
    import bench
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L40S") == 362.0 and bench.peak_tflops("NVIDIA L4") == 121.0  # not L4's for L40S
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert bench.peak_tflops("Tesla T4") is None and bench.peak_tflops("Tesla T4", 65.0) == 65.0


def test_gpu_bench_without_cuda_says_so(capsys, monkeypatch):
    import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu"]) is None
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow  # both models built, traced by dynamo and trained a few steps (eager: CPU compiles are minutes)
def test_gpu_bench_code_runs_on_cpu(capsys):
    """`bench.py gpu --device=cpu` runs the cuda code path on tiny shapes (the numbers mean nothing on a CPU):
    both models train, each reports the FLOPs flops.py counts for its config, its graph breaks and an MFU
    that is 'unknown' without a peak for the device."""
    import bench
    res = bench.main(["gpu", "--device=cpu", "--compile=False", "--steps=2", "--warmup=1"])  # tiny by itself
    (tok,), (m,) = res["tokenizer"], res["mllm"]
    assert tok["breaks"] == 0 and m["breaks"] <= 1
    assert m["flops"] == sum(flops.mllm_step(mllm.MLLMConfig(
        vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, pix_vocab=64, sem_vocab=64,
        pix_depth=2, sem_depth=2), 2, 64, 64, 32).values())  # 2 rows x (one read + one generated image of 16)
    assert tok["tflops"] > 0 and m["per_s"] > 0 and tok["n"] == m["n"] == 2
    out = capsys.readouterr().out
    assert out.count("MFU") == 3 and "unknown" in out and "graph breaks in the compiled forward: 0" in out


def test_gpu_bench_generation_rows_draw_the_same_on_cpu(capsys):
    """`bench.py gpu --models=generate` on the CPU's tiny shapes: the eager KV cache and decode.py's static step
    draw the same codes under the bench's bf16 autocast, and each row reports a rate."""
    import bench
    res = bench.main(["gpu", "--device=cpu", "--models=generate", "--compile=False", "--gen_iters=1", "--gen_batch=2"])
    r = res["generate"]
    assert r["same"] is True and set(r) == {"same", "KV cache (eager)", "static cache (eager)"}
    assert all(t > 0 and t1 > 0 for t, t1 in (r["KV cache (eager)"], r["static cache (eager)"]))
    assert "2 (x2 with CFG 3), 16 positions, depth 2 pixel + 2 semantic" in capsys.readouterr().out
