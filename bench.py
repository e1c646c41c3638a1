"""
Benchmarks, one per component: `python bench.py rvq|siglip|llm [--key=value ...]`.

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


if __name__ == "__main__":
    names = sorted(k[len("bench_"):] for k in globals() if k.startswith("bench_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python bench.py {{{'|'.join(names)}}} [--key=value ...]")
    globals()["bench_" + sys.argv[1]](sys.argv[2:])
