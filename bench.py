"""
Benchmarks: `python bench.py rvq|siglip|llm|gpu|memory [--key=value ...]`.

rvq, siglip and llm measure one component on whatever device is present (cuda > mps > cpu) and print the
project's implementation next to a straightforward or reference implementation, with ratios. gpu trains
both models at realistic widths on cuda (bf16, torch.compile, DDP under torchrun) and prints throughput,
TFLOP/s and MFU from flops.py's count. These are measurements, not tests: nothing here asserts a speed.
"""
import dataclasses
import sys
import time
from types import SimpleNamespace

import torch

import configurator
import flops
from configurator import UserError
from train_utils import default_device


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def timeit(fns, device, warmup=1, iters=3):
    """Median wall time in seconds of each of fns, after warmup calls of each. The calls alternate (fn 1, fn 2,
    ..., fn 1, ...) so that a change of load on a shared machine lands on all of them, not on one."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def peak_memory(fn, device):
    """Peak memory of one fn() call in bytes: CUDA allocator peak, or on CPU the peak of tracked tensor
    allocations (torch.profiler memory accounting), which is what the quantizer's docstring bounds."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # walk the raw allocator events (+bytes alloc, -bytes free) in time order, tracking live bytes.
    # prof.events() is not enough: it folds the allocations made inside an op into that op's net usage,
    # so a temporary that lives and dies inside one op (most of them) never shows up there.
    mem = [e for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(mem, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))



# ---------------------------------------------------------------------------------------------- memory

GPU_GB = (24, 40, 80, 141)


def memory_rows(model, worlds=(1, 2, 4, 8)):
    """[(setup, {params, grads, adam, buffers, total} in bytes per GPU)]: DDP (the same on any number of GPUs),
    then FSDP over each N in `worlds` (sharding.state_bytes)."""
    import sharding
    out = []
    for name, world, fsdp in [("ddp, any N", 1, False)] + [(f"fsdp, N={n}", n, True) for n in worlds]:
        b = sharding.state_bytes(model, world, fsdp)
        out.append((name, {**b, "total": sum(b.values())}))
    return out


def bench_memory(argv):
    """Per-GPU memory of what MLLM training keeps between steps (fp32 master weights, fp32 gradients and AdamW's
    two fp32 moments per trainable parameter, the codebook buffers), DDP vs FSDP over N GPUs, for train_mllm
    stage presets built on the meta device (default: every config/mllm_stage*.py), and the cards it fits on
    before activations. `python bench.py memory [config/mllm_stage2.py ...] [--llm=qwen2.5-3b]
    [--tokenizer=config/dualtoken_384.py]`. Arithmetic, no device: it runs anywhere."""
    import glob

    import mllm_hf

    @dataclasses.dataclass
    class MemoryBench:
        llm: str = "qwen2.5-3b"  # mllm_hf.PRESETS (the paper: Qwen2.5-3B)
        tokenizer: str = "config/dualtoken_384.py"  # a train_tokenizer preset: the code vocabularies

    presets = [a for a in argv if not a.startswith("-")] or sorted(glob.glob("config/mllm_stage*.py"))
    cfg = configurator.parse_config(MemoryBench(), [a for a in argv if a.startswith("-")], "memory", COMMANDS)
    gb = lambda b: f"{b / 1e9:.1f}"
    print(f"per GPU, before activations (GB = 1e9 bytes); fits: the cards of {'/'.join(map(str, GPU_GB))} GB "
          f"whose memory exceeds the total. LLM {cfg.llm}, code vocabularies of {cfg.tokenizer}")
    for preset in presets:
        model, trainable = mllm_hf.stage_model(preset, cfg.llm, cfg.tokenizer)
        n = sum(p.numel() for p in model.parameters())
        k = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"\n{preset}: trainable={trainable}, {n / 1e9:.2f} B parameters, {k / 1e9:.3f} B trainable")
        print_table([[name, gb(b["params"]), gb(b["grads"]), gb(b["adam"]), gb(b["total"]),
                      ", ".join(str(g) for g in GPU_GB if b["total"] < g * 1e9) or "none"]
                     for name, b in memory_rows(model)], ["setup", "params", "grads", "AdamW", "total", "fits"])
    units = dict(root=sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in
                          ("layers", "pix_head", "sem_head")),
                 block=sum(p.numel() for p in model.layers[0].parameters()),
                 head=sum(p.numel() for p in model.pix_head.parameters()))
    print(f"\nFSDP also holds the unit being computed unsharded (bf16 under fsdp_bf16, and its gradient in the "
          f"backward): the root (embeddings, tied head, visual input) {gb(2 * units['root'])} GB, a decoder block "
          f"{gb(2 * units['block'])} GB, a depth head {gb(2 * units['head'])} GB; activations come on top of all this")


# ---------------------------------------------------------------------------------------------- rvq

def _onehot_rvq(book, cse, ema, x, depth, schedule, train, decay=0.99, eps=1e-5):
    """The straightforward quantizer rvq.py replaces, written the way RQ-VAE's VQEmbedding does it: the
    full (N, K) distance matrix per depth and a dense (K, N) one-hot for the EMA counts and sums (matmul),
    restart vectors from a full random permutation of the (tiled) batch. Same math and schedules as
    rvq.ResidualVQ with a shared book, so the two are timed on the same work."""
    K, D = book.shape
    xf = x.reshape(-1, D).float()
    N = xf.shape[0]

    def update(v, c):
        onehot = v.new_zeros(K, v.shape[0])                                # (K, M)
        onehot.scatter_(0, c[None], 1.0)
        cse.mul_(decay).add_(onehot.sum(1), alpha=1 - decay)
        ema.mul_(decay).add_(onehot @ v, alpha=1 - decay)
        if v.shape[0] < K:
            n_rep = (K + v.shape[0] - 1) // v.shape[0]
            v = v.repeat(n_rep, 1)
            v = v + torch.rand_like(v) * (0.01 / D ** 0.5)
        rand = v[torch.randperm(v.shape[0], device=v.device)][:K]         # (K, D)
        used = (cse >= 1).float()
        ema.mul_(used[:, None]).add_(rand * (1 - used[:, None]))
        cse.mul_(used).add_(1 - used)
        n = cse.sum()
        book.copy_(ema / (n * (cse + eps) / (n + K * eps))[:, None])

    r = xf.detach().clone()
    agg, partials, codes, res = torch.zeros_like(r), [], [], []
    with torch.no_grad():
        for d in range(depth):
            dist_ = torch.addmm(r.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1), r, book.t(),
                                alpha=-2.0)                                # (N, K)
            c = dist_.argmin(1)
            del dist_
            q = book[c]
            if train and schedule == "per_depth":
                update(r, c)
            elif train:
                res.append(r.clone())
            r -= q
            agg = agg + q
            partials.append(agg)
            codes.append(c)
        if train and schedule == "deferred":
            update(torch.cat(res), torch.cat(codes))
    loss = torch.stack([(xf - p).pow(2).mean() for p in partials]).mean()
    return xf + (agg - xf).detach(), torch.stack(codes, 1), loss


def bench_rvq(argv):
    """Training and inference step of rvq.ResidualVQ vs the one-hot baseline above at the released
    configuration (B=8 images x 729 positions, K=16384, D=32, depth 8, shared book)."""
    from rvq import ResidualVQ

    @dataclasses.dataclass
    class RVQBench:
        batch: int = 8
        positions: int = 729
        codebook_size: int = 16384
        dim: int = 32
        depth: int = 8
        search_chunk: int = 512
        schedules: str = "per_depth,deferred"
        warmup: int = 1
        iters: int = 3
        device: str = ""

    cfg = configurator.parse_config(RVQBench(), argv, "rvq", COMMANDS)
    dev = cfg.device or default_device()
    torch.manual_seed(0)
    N, K, D, L = cfg.batch * cfg.positions, cfg.codebook_size, cfg.dim, cfg.depth
    x = torch.randn(cfg.batch, cfg.positions, D, device=dev, requires_grad=True)
    print(f"rvq bench on {dev}: {cfg.batch}x{cfg.positions} = {N} vectors, K={K}, D={D}, depth={L}, "
          f"shared book, search_chunk={cfg.search_chunk}, median of {cfg.iters} after {cfg.warmup} warmup")
    rows = []
    for schedule in cfg.schedules.split(","):
        m = ResidualVQ(dim=D, codebook_size=K, depth=L, shared_codebook=True, ema_update=schedule,
                       search_chunk=cfg.search_chunk).to(dev)
        base = [t.clone() for t in (m.codebook[0], m.cluster_size_ema[0], m.embed_ema[0])]

        def ours(train):
            m.train(train)
            if train:
                q, c, loss = m(x)
                (q.sum() + loss).backward()
                x.grad = None
            else:
                with torch.no_grad():
                    m(x)

        def onehot(train):
            if train:
                q, c, loss = _onehot_rvq(*base, x, L, schedule, True)
                (q.sum() + loss).backward()
                x.grad = None
            else:
                with torch.no_grad():
                    _onehot_rvq(*base, x, L, schedule, False)

        for train in (True, False):
            t_o, t_b = timeit([lambda: ours(train), lambda: onehot(train)], dev, cfg.warmup, cfg.iters)
            m_o = peak_memory(lambda: ours(train), dev)
            m_b = peak_memory(lambda: onehot(train), dev)
            mode = "train" if train else "infer"
            rows.append([schedule, mode, f"{t_o * 1e3:.0f}", f"{t_b * 1e3:.0f}", f"{t_b / t_o:.2f}x",
                         f"{m_o / 2**20:.0f}", f"{m_b / 2**20:.0f}", f"{m_b / max(m_o, 1):.1f}x"])
            print("  done", schedule, mode, flush=True)
    print_table(rows, ["schedule", "step", "ours ms", "one-hot ms", "speedup", "ours MiB", "one-hot MiB",
                 "mem ratio"])


# ------------------------------------------------------------------------------------------- siglip

def bench_siglip(argv):
    """Forward of siglip.SigLIPVision vs transformers' SiglipVisionModel (same weights, SDPA attention
    in both, eval, no grad) at a So400m-like width: time and peak memory side by side."""
    from siglip import SigLIP, SigLIPConfig, SigLIPVisionConfig

    @dataclasses.dataclass
    class SigLIPBench:
        width: int = 1152  # So400m: 27 blocks of width 1152, 16 heads, MLP 4304
        heads: int = 16
        mlp: int = 4304
        blocks: int = 3  # a few blocks keep it under ~2 min on a shared 2-core CPU
        image_size: int = 224
        patch_size: int = 14
        batch: int = 1
        warmup: int = 1
        iters: int = 3
        device: str = ""

    cfg = configurator.parse_config(SigLIPBench(), argv, "siglip", COMMANDS)
    dev = cfg.device or default_device()
    try:
        import transformers
    except ImportError:
        sys.exit("bench siglip compares against transformers: pip install -r requirements-dev.txt")
    vc = SigLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                            intermediate_size=cfg.mlp, num_hidden_layers=cfg.blocks,
                            num_attention_heads=cfg.heads)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**dataclasses.asdict(vc)),
                                        ).to(dev).eval()
    ours = SigLIP(SigLIPConfig(vision=vc, text=None))
    ours.load_hf_state_dict(hf.state_dict())  # same weights; checks the name table at this size too
    ours = ours.vision.to(dev).eval()
    x = torch.rand(cfg.batch, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1

    def run_ours():
        with torch.no_grad():
            return ours(x)["pooler_output"]

    def run_hf():
        with torch.no_grad():
            return hf(pixel_values=x).pooler_output

    diff = (run_ours() - run_hf()).abs().max().item()
    grid = cfg.image_size // cfg.patch_size
    print(f"device {dev}, torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attn_implementation={hf.config._attn_implementation}), threads {torch.get_num_threads()}")
    print(f"vision tower: width {cfg.width}, {cfg.heads} heads, MLP {cfg.mlp}, {cfg.blocks} blocks, "
          f"{cfg.image_size} px / {cfg.patch_size} -> {grid}x{grid} tokens, batch {cfg.batch}, fp32; "
          f"max |pooled diff| {diff:.2e}")
    runs = (("nano siglip.py", run_ours), ("transformers", run_hf))
    rows = [[name, t, peak_memory(fn, dev)] for (name, fn), t in zip(runs, timeit([f for _, f in runs], dev, cfg.warmup,
                                                                                  cfg.iters))]
    t0, m0 = rows[0][1], rows[0][2]
    print_table([[n, f"{t * 1e3:.0f}", f"{t / t0:.2f}x", f"{m / 2**20:.0f}", f"{m / max(m0, 1):.2f}x"]
           for n, t, m in rows], ["implementation", "forward ms", "time vs ours", "peak MiB", "mem vs ours"])


# ---------------------------------------------------------------------------------------------- llm

def bench_llm(argv):
    """mllm.MLLM decoding: KV-cache decode, decode.py's static-shape step (eager, then under torch.compile), a
    no-cache loop (whole sequence every step) and transformers' Qwen2ForCausalLM.generate, same weights (loaded
    through from_pretrained), greedy; then image generation (both depth heads, CFG doubled batch): KV caches in
    the trunk and along the depths, the static step, the trunk's cache alone (the depth heads re-run over every
    earlier depth), none (the reference). The release's shapes: --positions=256 --depth=4 (256 px),
    --positions=729 --depth=8 (384 px)."""
    import tempfile

    import mllm
    import mllm_hf

    @dataclasses.dataclass
    class LLMBench:
        n_layer: int = 4  # a small Qwen2-shaped model; keeps the run under ~2 min on a shared 2-core CPU
        n_embd: int = 256
        n_head: int = 4
        n_kv_head: int = 2
        intermediate_size: int = 688
        vocab_size: int = 2048
        batch: int = 1
        prompt_len: int = 32
        new_tokens: int = 32
        positions: int = 16  # image positions generated (a 4x4 grid)
        depth: int = 4  # pixel and semantic depth
        codebook: int = 512
        cfg_scale: float = 3.0
        compile: bool = True  # the rows of the static step under torch.compile (inductor: a first call of minutes on a CPU)
        warmup: int = 0  # untimed calls of each row after its first (the first call is never timed)
        iters: int = 3
        threads: int = 1  # CPU: decoding is many small ops; on a shared CPU extra threads mostly wait
        #                   (measured here: 2 threads were ~6x slower than 1 under load); 0 = torch default
        device: str = ""

    cfg = configurator.parse_config(LLMBench(), argv, "llm", COMMANDS)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = cfg.device or default_device()
    vis = dict(pix_vocab=cfg.codebook, sem_vocab=cfg.codebook, pix_depth=cfg.depth, sem_depth=cfg.depth,
               image_gen_start_id=cfg.vocab_size - 1, bos_id=None, eos_id=None, pad_id=0)
    try:
        import transformers
    except ImportError:
        transformers = None
    print(f"device {dev}, torch {torch.__version__}, transformers "
          f"{transformers.__version__ if transformers else 'absent'}, threads {torch.get_num_threads()}, fp32")
    print(f"LLM: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads / {cfg.n_kv_head} kv, MLP "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}; batch {cfg.batch}, prompt {cfg.prompt_len}, "
          f"{cfg.new_tokens} new tokens, greedy")
    hf = None
    if transformers is not None:
        hcfg = transformers.Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                                        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                        tie_word_embeddings=True, max_position_embeddings=4096)
        hf = transformers.Qwen2ForCausalLM(hcfg).eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = mllm_hf.from_pretrained(d, **vis)
        hf = hf.to(dev)
    else:
        ours = mllm.MLLM(mllm.MLLMConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                         n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                                         intermediate_size=cfg.intermediate_size, **vis))
    ours = ours.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    ours.set_codebooks(torch.randn(cfg.codebook, ours.config.pix_dim, generator=g),
                       torch.randn(cfg.codebook, ours.config.sem_dim, generator=g))
    idx = torch.randint(1, cfg.vocab_size - 1, (cfg.batch, cfg.prompt_len), generator=g).to(dev)
    N, cap = cfg.new_tokens, [list(range(1, 17))] * cfg.batch
    static = [("static cache", dict(use_cache="static"))] + \
        ([("static cache, compiled", dict(compile_decode=True))] if cfg.compile else [])
    text = [("nano mllm.py, KV cache", {})] + static + [("nano mllm.py, no cache", dict(use_cache=False))]
    runs = [(name, lambda kw=kw: ours.generate(idx, N, temperature=0, **kw)) for name, kw in text]
    if hf is not None:
        kw = dict(attention_mask=torch.ones_like(idx), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
        runs.append(("transformers generate", lambda: hf.generate(idx, **kw)))
    _race(runs, "decode", "tokens", cfg.batch * N, dev, cfg)

    print(f"\nimage generation: {cfg.positions} positions, depth {cfg.depth} pixel + {cfg.depth} semantic, "
          f"codebook {cfg.codebook}, CFG {cfg.cfg_scale} (batch x2), top-k 900, top-p 0.96")
    img = [("KV cache, trunk + depth", {})] + static + [("KV cache, trunk only", dict(depth_cache=False)),
                                                         ("no cache", dict(use_cache=False))]
    draw = lambda kw: ours.generate_image(cap, cfg.positions, cfg_scale=cfg.cfg_scale, top_k=900, top_p=0.96,
                                          generator=torch.Generator(device=dev).manual_seed(0), **kw)
    _race([(name, lambda kw=kw: draw(kw)) for name, kw in img], "image generation", "positions",
          cfg.batch * cfg.positions, dev, cfg)


def _race(runs, what, unit, n, dev, cfg):
    """Time [(name, fn)] side by side; print whether all draw the same and each one's rate and first call.
    -> {"same": bool, name: (seconds per call, first call seconds)}"""
    first = []
    for _, fn in runs:  # each one's first call (compiling, for the compiled step) and what it draws
        t0 = time.perf_counter()
        first.append((fn(), time.perf_counter() - t0))
    same = all(all(torch.equal(a, b) for a, b in zip(out, first[0][0])) for out, _ in first)
    print(f"every path draws the same {unit}: {same}")
    times = timeit([fn for _, fn in runs], dev, cfg.warmup, cfg.iters)
    print_table([[name, f"{t * 1e3:.0f}", f"{n / t:.1f}", f"{t / times[0]:.2f}x", f"{t1:.1f}"]
                 for (name, _), t, (_, t1) in zip(runs, times, first)],
                [what, "ms", f"{unit}/s", "time vs first row", "first call s"])
    return dict(same=same, **{name: (t, t1) for (name, _), t, (_, t1) in zip(runs, times, first)})


# ---------------------------------------------------------------------------------------------- gpu

# dense bf16 tensor-core peak TFLOP/s (no 2:4 sparsity), from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names precede family names
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2))


def peak_tflops(device_name, override=0.0):
    """The peak a measured TFLOP/s is compared with for MFU: the override if > 0, else the table's entry for
    this device, else None (MFU unknown)."""
    if override > 0:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


@dataclasses.dataclass
class GPUBench:
    models: str = "tokenizer,mllm,generate"
    steps: int = 30            # timed training steps per model ...
    warmup: int = 3            # ... after these untimed ones (the first compiles)
    max_seconds: float = 60.0  # timed steps per model are cut to fit this (the whole run stays under 8 minutes)
    compile: bool = True
    dtype: str = "bfloat16"
    peak_tflops: float = 0.0   # > 0: use this peak for MFU instead of the table's entry for the device
    device: str = ""           # "" = cuda (required); "cpu" runs the same code (tests; its numbers mean nothing)
    # tokenizer: config/dualtoken_256.py on a SigLIP2-So400m/16-256-shaped tower, random weights, LPIPS on
    # (a random VGG: the compute is the same), GAN off (the first quarter of the released schedule)
    tok_batch: int = 16        # images per GPU per step
    image_size: int = 256
    patch_size: int = 16
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp: int = 4304
    depth: int = 4
    codebook_size: int = 16384
    lpips: bool = True
    dec_ch: int = 128          # decoder base width and latent channels (config/dualtoken_256.py)
    dec_latent: int = 1024
    # MLLM: a Qwen2.5-0.5B-shaped trunk, random weights, 3-layer depth heads of the LLM width; each sequence
    # holds one read and one generated image of image_positions (16x16 for the 256-px tokenizer) and text
    n_layer: int = 24
    n_embd: int = 896
    n_head: int = 14
    n_kv_head: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 151936
    seq_len: int = 1024
    mllm_batch: int = 8        # sequences per GPU per step
    image_positions: int = 256
    # generate: the MLLM above in eval mode draws gen_batch images (CFG doubles the batch) of image_positions
    # positions, both depth heads: the eager KV cache, decode.py's static step eager and compiled
    gen_batch: int = 4
    gen_iters: int = 2


def _gpu_tokenizer(cfg, dev):
    """-> (model, loss_fn, step inputs, params, FLOPs per step, what it is): DualToken as train_tokenizer.py
    trains it (trainable="vision"), a frozen teacher of the same shape."""
    from losses import LPIPS, LossConfig, TokenizerLoss
    from siglip import SigLIP, SigLIPConfig, SigLIPVisionConfig
    from tokenizer import DecoderConfig, DualToken, QuantizerConfig, default_config

    vc = SigLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                            intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads)
    sc = SigLIPConfig(vision=vc, text=None)
    lat = cfg.image_size // 16
    q = dict(codebook_size=cfg.codebook_size, code_dim=32, depth=cfg.depth)
    tc = default_config(sc, layer_sem=cfg.layers - 1, vq_pix=QuantizerConfig(**q, ema_update="per_depth"),
                        vq_sem=QuantizerConfig(**q, ema_update="deferred"),
                        decoder=DecoderConfig(ch=cfg.dec_ch, latent_channels=cfg.dec_latent,
                                              resolution=cfg.image_size, attn_resolutions=(lat,)))
    model = DualToken(tc).to(dev).train()
    teacher = SigLIP(sc).to(dev).eval().requires_grad_(False)
    loss_fn = TokenizerLoss(LossConfig(), LPIPS() if cfg.lpips else None).to(dev)
    x = torch.rand(cfg.tok_batch, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
    n = sum(p.numel() for p in model.parameters())
    what = (f"tokenizer: DualToken {cfg.image_size} px, SigLIP {cfg.layers}x{cfg.width} patch {cfg.patch_size}, "
            f"depth {cfg.depth}, K {cfg.codebook_size}, LPIPS {'on' if cfg.lpips else 'off'}, GAN off; "
            f"{n / 1e6:.0f}M params, {cfg.tok_batch} images/GPU")
    return model, (teacher, loss_fn, tc), x, flops.tokenizer_step(tc, cfg.tok_batch, cfg.lpips), what


def _tokenizer_loss(model, extra, x):
    from tokenizer import teacher_features
    teacher, loss_fn, tc = extra
    t_sem, t_pool = teacher_features(teacher, x, tc.layer_sem)
    out = model(x)
    loss, _ = loss_fn(x, out.recon.float(), out.zq_sem.float(), t_sem.float(), out.pooled.float(),
                      t_pool.float(), out.commit_pix, out.commit_sem, last_layer=None)
    return loss


def _gpu_mllm(cfg, dev):
    """-> as _gpu_tokenizer, for the MLLM as train_mllm.py trains it (trainable="all"). Every row is exactly
    seq_len long: [bos] <im_start> image <im_end> text <image_gen_start> image <image_gen_end> text, so
    nothing is padded (the attention_mask is dropped, as train_mllm.py does, and SDPA stays fused)."""
    import mllm
    import sequences
    V, P, T = cfg.vocab_size, cfg.image_positions, cfg.seq_len
    sp = dict(zip(("pad_id", "bos_id", "eos_id", "im_start_id", "im_end_id", "image_gen_start_id",
                   "image_gen_end_id"), range(V - 7, V)))
    mc = mllm.MLLMConfig(vocab_size=V, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                         n_kv_head=cfg.n_kv_head, intermediate_size=cfg.intermediate_size, max_seq_len=T,
                         pix_vocab=cfg.codebook_size, sem_vocab=cfg.codebook_size, pix_depth=cfg.depth,
                         sem_depth=cfg.depth, **sp)
    model = mllm.MLLM(mc)
    g = torch.Generator().manual_seed(0)
    model.set_codebooks(torch.randn(mc.pix_vocab, mc.pix_dim, generator=g),
                        torch.randn(mc.sem_vocab, mc.sem_dim, generator=g))
    model = model.to(dev).train()
    n_text = T - 1 - 2 * (P + 2)
    if n_text < 2:
        raise UserError(f"--seq_len={T} leaves no room for text beside two images of {P} positions")
    text = lambda k: torch.randint(0, V - 7, (k,), generator=g).tolist()
    rows = [sequences.build_sequence(mc, [("und", P), text(n_text // 2), ("gen", P), text(n_text - n_text // 2)])
            for _ in range(cfg.mllm_batch)]
    b = sequences.collate_sequences(mc, rows)
    b["targets"] = sequences.make_targets(b["idx"], b["image_mask"])
    n_img, n_gen = int(b["image_mask"].sum()), int(b["gen_mask"].sum())
    b["pix_codes"] = torch.randint(0, mc.pix_vocab, (n_img, mc.pix_depth), generator=g)
    b["sem_codes"] = torch.randint(0, mc.sem_vocab, (n_img, mc.sem_depth), generator=g)
    model.check_inputs(**b)
    del b["attention_mask"]
    b = {k: v.to(dev) for k, v in b.items()}
    n = sum(p.numel() for p in model.parameters())
    what = (f"MLLM: {cfg.n_layer} layers x {cfg.n_embd} ({cfg.n_head}/{cfg.n_kv_head} heads, MLP "
            f"{cfg.intermediate_size}, vocab {V}), depth heads 3 x {cfg.depth} depths x K {cfg.codebook_size}; "
            f"{n / 1e6:.0f}M params, {cfg.mllm_batch} x {T} tokens/GPU ({n_img} image positions, {n_gen} generated)")
    return model, None, b, flops.mllm_step(mc, cfg.mllm_batch, T, n_img, n_gen), what


def _bench_generate(cfg, ctx):
    """Image generation at the shapes of _gpu_mllm (release: 256 positions of depth 4 at 256 px, 729 of depth 8
    at 384 px) under the bench's autocast: each path's positions/s and first call (compiling), side by side."""
    import train_utils as tu
    model = _gpu_mllm(cfg, ctx.device)[0].eval()
    cap, dev = [list(range(1, 17))] * cfg.gen_batch, ctx.device
    print(f"\nimage generation: batch {cfg.gen_batch} (x2 with CFG 3), {cfg.image_positions} positions, depth "
          f"{cfg.depth} pixel + {cfg.depth} semantic, codebook {cfg.codebook_size}, top-k 900, top-p 0.96, {cfg.dtype}")
    paths = [("KV cache (eager)", {}), ("static cache (eager)", dict(use_cache="static"))] + \
        ([("static cache, compiled", dict(compile_decode=True))] if cfg.compile else [])

    def draw(kw):
        with tu.autocast_ctx(dev, cfg.dtype), torch.no_grad():
            return model.generate_image(cap, cfg.image_positions, cfg_scale=3.0, top_k=900, top_p=0.96,
                                        generator=torch.Generator(device=dev).manual_seed(0), **kw)
    return _race([(n, lambda kw=kw: draw(kw)) for n, kw in paths], "image generation", "positions",
                 cfg.gen_batch * cfg.image_positions, dev, SimpleNamespace(warmup=0, iters=cfg.gen_iters))


def _bench_one(name, cfg, ctx, peak):
    """Build, count graph breaks, compile, train warmup + steps; -> this rank's measurements."""
    import train_utils as tu
    dev = ctx.device
    torch.manual_seed(0)
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    build, lossf = (_gpu_tokenizer, _tokenizer_loss) if name == "tokenizer" else \
        (_gpu_mllm, lambda m, extra, b: m(**b)[1])
    raw, extra, inp, parts, what = build(cfg, dev)
    autocast = tu.autocast_ctx(dev, cfg.dtype)
    with autocast:  # dynamo's explain on one forward (it resets dynamo's caches: before compiling)
        breaks, why = tu.graph_breaks(lambda: (raw(inp) if name == "tokenizer" else raw(**inp)))
    if ctx.ddp:
        tu.broadcast_buffers_once(raw)
    model = torch.compile(raw, dynamic=True if name == "mllm" else None) if cfg.compile else raw  # as the trainers
    if ctx.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None,
                                                          broadcast_buffers=False)
    opt = tu.adamw(tu.param_groups(raw, 0.1), dev, lr=1e-5)  # as the trainers

    def step(i):
        t0 = time.perf_counter()
        with autocast:
            loss = lossf(model, extra, inp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tu.check_finite({"loss": loss.detach()}, i)  # a host sync per step, as in the trainers
        return time.perf_counter() - t0

    warm = [step(i) for i in range(max(cfg.warmup, 1))]
    # the timed count is fixed before timing and agreed by all ranks (a rank that stopped alone would hang DDP)
    n = torch.tensor(max(1, min(cfg.steps, int(cfg.max_seconds / warm[-1]))), device=dev)
    if ctx.ddp:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    times = sorted(step(len(warm) + i) for i in range(int(n)))
    dt = times[len(times) // 2]
    total = sum(parts.values())
    items = cfg.tok_batch if name == "tokenizer" else cfg.mllm_batch * cfg.seq_len
    return dict(what=what, breaks=breaks, why=why, compile=warm[0] - dt if cfg.compile else None, n=len(times),
                step=dt, per_s=items / dt, tflops=total / dt / 1e12, parts=parts, flops=total, peak=peak,
                unit="images" if name == "tokenizer" else "tokens",
                mem=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def _report(rows):
    r0, mfu = rows[0], lambda tf, peak: "unknown" if peak is None else f"{tf / peak:.1%}"
    print(f"\n{r0['what']}")
    print(f"  FLOPs per GPU and step (flops.py): {r0['flops'] / 1e12:.2f} T: " +
          ", ".join(f"{k} {v / r0['flops']:.0%}" for k, v in r0["parts"].items()))
    print(f"  graph breaks in the compiled forward: {r0['breaks']}" + "".join(f"\n    {w}" for w in r0["why"]))
    comp = "off" if r0["compile"] is None else f"{r0['compile']:.0f} s (the first step minus a steady one)"
    print(f"  compile: {comp}; step = the median of {r0['n']} timed steps")
    rows_out = [[str(i), f"{r['step'] * 1e3:.0f}", f"{r['per_s']:,.0f}", f"{r['tflops']:.1f}",
                 mfu(r["tflops"], r["peak"]), f"{r['mem']:.1f}"] for i, r in enumerate(rows)]
    if len(rows) > 1:
        tf = sum(r["tflops"] for r in rows)
        rows_out.append(["all", "", f"{sum(r['per_s'] for r in rows):,.0f}", f"{tf:.1f}",
                         mfu(tf, None if r0["peak"] is None else r0["peak"] * len(rows)), ""])
    print_table(rows_out, ["rank", "step ms", f"{r0['unit']}/s", "TFLOP/s", "MFU", "peak GiB"])


# bench.py gpu --device=cpu: tiny shapes for the sizes left at their defaults (a test of the code path, no measurement)
CPU_SHAPES = dict(image_size=32, patch_size=8, width=64, layers=8, heads=4, mlp=128, depth=2, codebook_size=64,
                  lpips=False, tok_batch=2, dec_ch=32, dec_latent=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                  intermediate_size=128, vocab_size=300, seq_len=64, mllm_batch=2, image_positions=16)


def bench_gpu(argv):
    """Train the tokenizer and the MLLM at realistic widths for a few dozen steps on cuda with bf16 autocast
    and torch.compile, as the trainers do; under torchrun, with DDP. Prints per model and rank: step time,
    images/s or tokens/s, TFLOP/s from flops.py's count, MFU against the device's peak, peak memory, compile
    time and graph breaks. Random weights and synthetic batches: throughput does not depend on the values."""
    import train_utils as tu
    cfg = configurator.parse_config(GPUBench(), argv, "gpu", COMMANDS)
    if cfg.device not in ("", "cpu"):
        raise UserError(f"--device={cfg.device!r}: '' (cuda) or 'cpu' (a test of this code, not a measurement)")
    if cfg.device == "cpu":  # every size the user left at its GPU default shrinks: the full models need a GPU's memory
        base = GPUBench()
        for k, v in CPU_SHAPES.items():
            if getattr(cfg, k) == getattr(base, k):
                setattr(cfg, k, v)
    if not cfg.device and not torch.cuda.is_available():
        print("bench.py gpu needs a CUDA GPU (torch.cuda.is_available() is False here): nothing measured")
        return None
    names = [m for m in cfg.models.split(",") if m]
    if set(names) - {"tokenizer", "mllm", "generate"}:
        raise UserError(f"--models={cfg.models!r}: a comma-separated subset of tokenizer,mllm,generate")
    ctx = tu.setup_ddp(cfg.device or "cuda")
    dev_name = torch.cuda.get_device_name(ctx.device) if ctx.device.startswith("cuda") else "cpu"
    peak = peak_tflops(dev_name, cfg.peak_tflops)
    if ctx.is_master:
        print(f"{dev_name} x{ctx.world}, torch {torch.__version__}, {cfg.dtype} autocast, compile={cfg.compile}; "
              f"MFU against {f'{peak:g} TFLOP/s (dense bf16)' if peak else 'an unknown peak (pass --peak_tflops)'}")
    results = {}
    for name in names:
        if name == "generate":  # one GPU draws (the master; other ranks wait at the next model or the end)
            results[name] = _bench_generate(cfg, ctx) if ctx.is_master else None
            continue
        try:
            r = _bench_one(name, cfg, ctx, peak)
        except torch.cuda.OutOfMemoryError as e:
            r = dict(oom=str(e).splitlines()[0])
        rows = [r]
        if ctx.ddp:
            rows = [None] * ctx.world
            torch.distributed.all_gather_object(rows, r)
        if ctx.is_master:
            oom = [i for i, x in enumerate(rows) if "oom" in x]
            if oom:
                print(f"\n{name}: out of memory on rank(s) {oom} ({rows[oom[0]]['oom']}); try a smaller "
                      f"--{'tok_batch' if name == 'tokenizer' else 'mllm_batch'}")
            else:
                _report(rows)
        results[name] = rows
        torch._dynamo.reset()  # the next model compiles from a clean slate
        torch.cuda.empty_cache()
    tu.cleanup_ddp()
    return results


COMMANDS = {"rvq": bench_rvq, "siglip": bench_siglip, "llm": bench_llm, "gpu": bench_gpu, "memory": bench_memory}


def main(argv):
    name, argv = configurator.command(argv, COMMANDS)
    return COMMANDS[name](argv)


if __name__ == "__main__":
    from configurator import run_main
    run_main(main)
