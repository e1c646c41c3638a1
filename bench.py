"""
Benchmarks, one per component: `python bench.py rvq|siglip|llm|memory [--key=value ...]`.

Each benchmark measures on whatever device is present (cuda > mps > cpu), prints one table with the
project's implementation next to a straightforward or reference implementation, and gives ratios.
These are measurements, not tests: nothing here asserts a speed.
"""
import sys
import time

import torch


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def timeit(fn, device, warmup=1, iters=3):
    """Median wall time of fn() in seconds, after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))



# ---------------------------------------------------------------------------------------------- memory

GPU_GB = (24, 40, 80, 141)


def stage_model(preset, llm="qwen2.5-3b", tokenizer="config/dualtoken_384.py"):
    """The MLLM a train_mllm stage preset trains, built on the meta device (no memory): the released LLM shape
    `llm` (mllm_hf.PRESETS) plus the image tokens, the code vocabularies of a train_tokenizer preset, the
    preset's visual-side keys, and its trainable set. -> (model, trainable)."""
    import dataclasses

    import configurator
    import mllm
    import mllm_hf
    import pipeline
    from text import IMAGE_TOKENS
    st, tk = configurator.preset_values(preset, "mllm"), configurator.preset_values(tokenizer, "tokenizer")
    miss = [k for k in ("codebook_size", "code_dim", "depth") if k not in tk]
    if miss or llm not in mllm_hf.PRESETS:
        raise configurator.UserError(f"memory: {tokenizer} lacks {miss}" if miss else
                                     f"--llm={llm!r}: expected one of {sorted(mllm_hf.PRESETS)}")
    vis = dict(pix_vocab=tk["codebook_size"], sem_vocab=tk["codebook_size"], pix_dim=tk["code_dim"],
               sem_dim=tk["code_dim"], pix_depth=tk.get("pix_depth") or tk["depth"], sem_depth=tk["depth"])
    # the preset's MLLMConfig keys that are not the LLM's (head sizes, gen_sem, ...): what build_model passes on
    own = {f.name for f in dataclasses.fields(mllm.MLLMConfig)} - set(mllm_hf.PRESETS[llm])
    vis.update({k: v for k, v in st.items() if k in own and k not in vis})
    cfg = mllm_hf.preset_config(llm, **vis)
    cfg.vocab_size += len(IMAGE_TOKENS)  # from_pretrained(new_tokens=IMAGE_TOKENS) appends them
    with torch.device("meta"):
        model = mllm.MLLM(cfg)
    trainable = st.get("trainable", "all")  # train_mllm's default
    pipeline.set_trainable(model, trainable)
    return model, trainable


def memory_rows(model, worlds=(1, 2, 4, 8)):
    """[(setup, {params, grads, adam, buffers, total} in bytes per GPU)]: DDP (the same on any number of GPUs),
    then FSDP over each N in `worlds` (train_utils.state_bytes)."""
    import train_utils as tu
    out = []
    for name, world, fsdp in [("ddp, any N", 1, False)] + [(f"fsdp, N={n}", n, True) for n in worlds]:
        b = tu.state_bytes(model, world, fsdp)
        out.append((name, {**b, "total": sum(b.values())}))
    return out


def bench_memory(argv):
    """Per-GPU memory of what MLLM training keeps between steps (fp32 master weights, fp32 gradients and AdamW's
    two fp32 moments per trainable parameter, the codebook buffers), DDP vs FSDP over N GPUs, for train_mllm
    stage presets built on the meta device (default: every config/mllm_stage*.py), and the cards it fits on
    before activations. `python bench.py memory [config/mllm_stage2.py ...] [--llm=qwen2.5-3b]
    [--tokenizer=config/dualtoken_384.py]`. Arithmetic, no device: it runs anywhere."""
    import dataclasses
    import glob

    import configurator

    @dataclasses.dataclass
    class MemoryBench:
        llm: str = "qwen2.5-3b"  # mllm_hf.PRESETS (the paper: Qwen2.5-3B)
        tokenizer: str = "config/dualtoken_384.py"  # a train_tokenizer preset: the code vocabularies

    presets = [a for a in argv if not a.startswith("--")] or sorted(glob.glob("config/mllm_stage*.py"))
    cfg = configurator.parse_config(MemoryBench(), [a for a in argv if a.startswith("--")])
    gb = lambda b: f"{b / 1e9:.1f}"
    print(f"per GPU, before activations (GB = 1e9 bytes); fits: the cards of {'/'.join(map(str, GPU_GB))} GB "
          f"whose memory exceeds the total. LLM {cfg.llm}, code vocabularies of {cfg.tokenizer}")
    for preset in presets:
        model, trainable = stage_model(preset, cfg.llm, cfg.tokenizer)
        n = sum(p.numel() for p in model.parameters())
        k = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"\n{preset}: trainable={trainable}, {n / 1e9:.2f} B parameters, {k / 1e9:.3f} B trainable")
        table([[name, gb(b["params"]), gb(b["grads"]), gb(b["adam"]), gb(b["total"]),
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
    import dataclasses

    import configurator
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

    cfg = configurator.parse_config(RVQBench(), argv)
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
            t_o = timeit(lambda: ours(train), dev, cfg.warmup, cfg.iters)
            t_b = timeit(lambda: onehot(train), dev, cfg.warmup, cfg.iters)
            m_o = peak_memory(lambda: ours(train), dev)
            m_b = peak_memory(lambda: onehot(train), dev)
            mode = "train" if train else "infer"
            rows.append([schedule, mode, f"{t_o * 1e3:.0f}", f"{t_b * 1e3:.0f}", f"{t_b / t_o:.2f}x",
                         f"{m_o / 2**20:.0f}", f"{m_b / 2**20:.0f}", f"{m_b / max(m_o, 1):.1f}x"])
            print("  done", schedule, mode, flush=True)
    table(rows, ["schedule", "step", "ours ms", "one-hot ms", "speedup", "ours MiB", "one-hot MiB",
                 "mem ratio"])


# ------------------------------------------------------------------------------------------- siglip

def bench_siglip(argv):
    """Forward of siglip.SigLIPVision vs transformers' SiglipVisionModel (same weights, SDPA attention
    in both, eval, no grad) at a So400m-like width: time and peak memory side by side."""
    import dataclasses

    import configurator
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

    cfg = configurator.parse_config(SigLIPBench(), argv)
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
    rows = []
    for name, fn in (("nano siglip.py", run_ours), ("transformers", run_hf)):
        t = timeit(fn, dev, cfg.warmup, cfg.iters)
        m = peak_memory(fn, dev)
        rows.append([name, t, m])
    t0, m0 = rows[0][1], rows[0][2]
    table([[n, f"{t * 1e3:.0f}", f"{t / t0:.2f}x", f"{m / 2**20:.0f}", f"{m / max(m0, 1):.2f}x"]
           for n, t, m in rows], ["implementation", "forward ms", "time vs ours", "peak MiB", "mem vs ours"])


# ---------------------------------------------------------------------------------------------- llm

def bench_llm(argv):
    """mllm.MLLM decoding: KV-cache decode vs a no-cache loop (whole sequence every step) vs
    transformers' Qwen2ForCausalLM.generate, same weights (loaded through from_pretrained), greedy;
    then image generation (both depth heads, CFG doubled batch) with and without the LLM KV cache."""
    import dataclasses
    import tempfile

    import configurator
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
        warmup: int = 1
        iters: int = 3
        threads: int = 1  # CPU: decoding is many small ops; on a shared CPU extra threads mostly wait
        device: str = ""  # (measured here: 2 threads were ~6x slower than 1 under load); 0 = torch default

    cfg = configurator.parse_config(LLMBench(), argv)
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
    N = cfg.new_tokens
    runs = [("nano mllm.py, KV cache", lambda: ours.generate(idx, N, temperature=0)),
            ("nano mllm.py, no cache", lambda: ours.generate(idx, N, temperature=0, use_cache=False))]
    if hf is not None:
        kw = dict(attention_mask=torch.ones_like(idx), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
        runs.append(("transformers generate", lambda: hf.generate(idx, **kw)))
    outs = [fn() for _, fn in runs]
    same = all(torch.equal(o, outs[0]) for o in outs)
    print(f"all continuations identical: {same}")
    rows = [[name, timeit(fn, dev, cfg.warmup, cfg.iters)] for name, fn in runs]
    t0 = rows[0][1]
    table([[n, f"{t * 1e3:.0f}", f"{cfg.batch * N / t:.1f}", f"{t / t0:.2f}x"] for n, t in rows],
          ["decode", "ms", "tokens/s", "time vs cache"])

    print(f"\nimage generation: {cfg.positions} positions, depth {cfg.depth} pixel + {cfg.depth} semantic, "
          f"codebook {cfg.codebook}, CFG {cfg.cfg_scale} (batch x2), top-k 900, top-p 0.96")
    caps = [list(range(1, 17))] * cfg.batch

    def img(use_cache):
        return ours.generate_image(caps, cfg.positions, cfg_scale=cfg.cfg_scale, top_k=900, top_p=0.96,
                                   generator=torch.Generator(device=dev).manual_seed(0), use_cache=use_cache)

    a, b = img(True), img(False)
    print(f"cache and no-cache codes identical: {torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])}")
    rows = [[name, timeit(lambda: img(c), dev, cfg.warmup, cfg.iters)] for name, c in
            (("KV cache", True), ("no cache", False))]
    t0 = rows[0][1]
    table([[n, f"{t * 1e3:.0f}", f"{cfg.batch * cfg.positions / t:.1f}", f"{t / t0:.2f}x"] for n, t in rows],
          ["image generation", "ms", "positions/s", "time vs cache"])


def main(argv):
    from configurator import UserError
    names = sorted(k[len("bench_"):] for k in globals() if k.startswith("bench_"))
    if not argv or argv[0] not in names:
        raise UserError(f"usage: python bench.py {{{'|'.join(names)}}} [--key=value ...]")
    return globals()["bench_" + argv[0]](argv[1:])


if __name__ == "__main__":
    from configurator import run_main
    run_main(main)
