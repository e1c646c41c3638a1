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


if __name__ == "__main__":
    names = sorted(k[len("bench_"):] for k in globals() if k.startswith("bench_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python bench.py {{{'|'.join(names)}}} [--key=value ...]")
    globals()["bench_" + sys.argv[1]](sys.argv[2:])
