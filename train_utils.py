"""
Training mechanics shared by train_siglip.py, train_tokenizer.py and train_mllm.py, nanoGPT style.

Nothing here knows about a model: process setup (DDP from the environment), precision, the learning
rate schedule, optimizer groups, exact resume (RNG + data position), crash-safe checkpoint writes, a
JSONL log, a NaN guard, and the checks that keep a user's mistake from costing a model (config values
before any work, an out_dir that already holds one, a resume with another config). Each helper states the
convention it follows so the three trainers agree.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import threading
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from configurator import PROGRESS, UserError, atomic_write
from folders import check_outputs, hold_folder, path_fields


def default_device():
    """cuda > mps > cpu, as a string usable by torch.device and by autocast_ctx."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class DDPContext:
    rank: int
    world: int
    local_rank: int
    device: str
    is_master: bool
    ddp: bool


def setup_ddp(device=None):
    """Env-based DDP: `torchrun` sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python` sets none of them
    and runs single-process. Backend nccl on cuda (one GPU per local rank), gloo on cpu."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = device or default_device()
        return DDPContext(rank=0, world=1, local_rank=0, device=device, is_master=True, ddp=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DDPContext(rank=rank, world=world, local_rank=local_rank, device=device,
                      is_master=rank == 0, ddp=True)


def cleanup_ddp():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_ctx(device, dtype="bfloat16"):
    """bf16 autocast on cuda (no loss scaling needed: bf16 has fp32's exponent range). fp16 under-
    flows small gradients, so it is only correct together with a torch.amp.GradScaler, which the
    caller must create. CPU and MPS run plain fp32 here: bf16 autocast on CPU is much slower."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if not str(device).startswith("cuda") or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def grad_accum_steps(global_batch, micro_batch, world):
    """The global batch is fixed by the config; accumulation is derived from the world size so a run
    on 1 GPU and on 8 GPUs takes the same optimizer steps."""
    per_step = micro_batch * world
    if global_batch <= 0 or micro_batch <= 0 or global_batch % per_step:
        raise UserError(f"global batch {global_batch} is not a positive multiple of micro batch "
                        f"{micro_batch} x world size {world} = {per_step}")
    return global_batch // per_step


def cosine_lr(step, warmup, total, lr, min_lr):
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine decay to min_lr at `total`
    (and min_lr after), as in nanoGPT's get_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (lr - min_lr)


def cycle_lr(step, warmup, cycles, min_frac):
    """Warm restarts (SGDR, Loshchilov & Hutter 2017) -> the lr factor at `step`. cycles: ((steps, peak), ...)
    run in turn, each a warmup to `peak` then cosine to peak * min_frac (cosine_lr restarted); min_frac of the
    last peak after them. A restart at a lower peak lets a model that plateaued at the end of one decay
    settle further without starting over (train_mllm's long shapes preset)."""
    start = 0
    for n, peak in cycles:
        if step < start + n:
            return cosine_lr(step - start, warmup, n, peak, peak * min_frac)
        start += n
    return cycles[-1][1] * min_frac


def check_cycles(cycles, max_steps):
    """lr_cycles must be ((steps >= 1, peak > 0), ...) whose steps sum to max_steps: a schedule that ends
    before or after the run would silently train at a rate nobody chose."""
    try:
        ok = all(len(c) == 2 and int(c[0]) == c[0] >= 1 and c[1] > 0 for c in cycles)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"--lr_cycles={cycles!r}: expected ((steps, peak), ...) with steps >= 1 and peak > 0, "
                        f"e.g. ((4000, 1.0), (1000, 0.3))")
    total = sum(int(c[0]) for c in cycles)
    if cycles and total != max_steps:
        raise UserError(f"--lr_cycles={cycles!r}: its steps sum to {total}, --max_steps={max_steps}: they must "
                        f"be equal")


def param_groups(model, weight_decay, parts=None):
    """AdamW groups: decay only >=2-D weights (matmuls, embeddings, convs); biases, norm gains and
    scalar parameters (e.g. SigLIP's logit scale / bias) are not decayed. parts: {name: (base_lr, keep(p))}
    splits the trainable parameters further, a decay and a no-decay group per part, each with its base_lr and
    a name (train_mllm: the LLM and the visual modules), empty groups left out. Without parts both groups
    are kept even when empty: the layout train_siglip's and train_tokenizer's optimizer states hold."""
    params = [p for p in model.parameters() if p.requires_grad]
    if parts is None:
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = []
    for name, (lr, keep) in parts.items():
        for decay in (True, False):
            g = [p for p in params if keep(p) and (p.dim() >= 2) == decay]
            if g:
                groups.append(dict(params=g, weight_decay=weight_decay if decay else 0.0, base_lr=lr,
                                   name=f"{name}_{'decay' if decay else 'no_decay'}"))
    return groups


def adamw(groups, device, adam=False, **kw):
    """torch.optim.AdamW (Adam with adam=True) over groups, fused on CPU and CUDA: one kernel per step updates
    every tensor instead of a loop of small ops (torch's default outside CUDA) or foreach batches (its CUDA
    default). Same update up to float rounding; over the shipped shapes MLLM's parameters on the CPU one step took
    2.5 ms against 9.5 (docs/experiments.md, "drawing and training speed"). Other devices get torch's default."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return (torch.optim.Adam if adam else torch.optim.AdamW)(groups, fused=fused or None, **kw)


def rng_state():
    """Every RNG a training step may touch, as tensors and plain types so the checkpoint loads with
    torch.load(weights_only=True) (no numpy objects in the pickle)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states(ctx):
    """rng_state() of every rank, gathered (a collective: call on all ranks). Ranks hold different RNG
    states, and exact resume restores each one."""
    rng = rng_state()
    if not ctx.ddp:
        return [rng]
    rngs = [None] * ctx.world
    torch.distributed.all_gather_object(rngs, rng)
    return rngs


def restore_rng_states(states, ctx, where):
    """This rank's RNGs from a checkpoint's all_rng_states list; exact resume needs the same world size."""
    if len(states) != ctx.world:
        raise UserError(f"{where} has RNG states for {len(states)} processes, this run has {ctx.world}: exact "
                        f"resume needs the same world size")
    state = states[ctx.rank]
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def state_digest(obj):
    """sha256 of a checkpoint's contents, in order: every tensor's dtype, shape and bytes, every other value's
    repr (a list and a tuple alike: a tuple may come back as either). Computed from the objects, not the file,
    so it says whether what torch.load returned is what was saved, whatever the zip container holds."""
    h = hashlib.sha256()

    def walk(o):
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k, v in o.items():
                walk(k)
                walk(v)
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode() + b";")
    walk(obj)
    return h.hexdigest()


@contextlib.contextmanager
def checkpoint_commit(step):
    """Around writing train_state.pt: Ctrl-C waits until the file is written and PROGRESS names its step, so the
    line it prints names the checkpoint on disk. A SIGINT arriving mid-save is held and raised at the block's end:
    the Python handler is swapped, not the signal mask, because the OS may hand the signal to any thread (BLAS,
    tqdm) and Python would then raise KeyboardInterrupt inside torch.save's writes."""
    import signal
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    held = []
    old = signal.signal(signal.SIGINT, lambda *a: held.append(a)) if main else None
    try:
        yield
        PROGRESS["checkpoint"] = step  # what a resume starts from, from here on
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
    if held and callable(old):
        old(*held[0])  # Python's default handler raises KeyboardInterrupt
    elif held and old != signal.SIG_IGN:
        raise KeyboardInterrupt


def save_train_state(state, path):
    """A trainer's train_state.pt: `state` (a dict) with its state_digest under "sha256", written atomically.
    load_train_state checks the digest, so a damaged checkpoint is refused instead of resumed."""
    atomic_save({**state, "sha256": state_digest(state)}, path)


def write_json(obj, path):
    """A JSON file a user keeps (results, exports' config.json), written atomically, indented."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


class JsonlLogger:
    """One JSON object per line, appended and closed at every write so a crash loses at most the line
    being written. Only the master process writes (enabled=ctx.is_master). fresh=True (a run that does
    not resume): an earlier run's log in the same out_dir is emptied, so the log describes the model
    beside it (the out_dir guard already required --overwrite=True to replace that model). resume_step
    (a run resumed from the checkpoint of that step): the rows of later steps, which the resumed run
    logs again, are dropped first (and a line a crash cut short), so no step appears twice."""

    def __init__(self, path, enabled=True, fresh=False, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if fresh and os.path.exists(path):
                open(path, "w").close()
            elif resume_step is not None and os.path.exists(path):
                self._keep_until(resume_step)

    def _keep_until(self, step):
        keep = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)) or row["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.path, lambda f: f.write("".join(keep).encode()))

    def log(self, **row):
        if not self.enabled:
            return
        row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def check_finite(terms, step):
    """Stop at the first non-finite loss term, naming it, instead of training on NaNs."""
    for name, v in terms.items():
        if not math.isfinite(float(v)):
            raise FloatingPointError(f"non-finite loss term {name!r} = {float(v)} at step {step}")


# -----------------------------------------------------------------------------
# the parts of a trainer's step loop


def start_log(cfg, ctx, st, step):
    """-> the run's log.jsonl (JsonlLogger: a fresh one, or a resumed run's cut at its checkpoint `step`), with
    PROGRESS (Ctrl-C's line) set to this run."""
    PROGRESS.update(out_dir=cfg.out_dir, step=step, checkpoint=step if st is not None else None)
    return JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=ctx.is_master, fresh=st is None,
                       resume_step=None if st is None else step)


def progress_bar(total, step, master, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=step, disable=not master, desc=desc, dynamic_ncols=True)


def wrap_ddp(model, ctx, **kw):
    """DistributedDataParallel over the ranks (build -> compile -> DDP), or the model itself in one process."""
    if not ctx.ddp:
        return model
    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kw)


def sync_on_last(model, micro, accum):
    """DDP all-reduces gradients in the backward of the last micro-step only; DDP reads the flag at the forward, so
    it is set before it. (FSDP reduce-scatters every micro-step, see sharding.py; one process has nothing to do.)"""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = micro == accum - 1


def stop_if_nonfinite(terms, step, last_good, out_dir, logger, **logged):
    """check_finite; a non-finite term is logged (with `logged`) and raised as a FloatingPointError naming the last
    good checkpoint. Nothing is saved: the weights may already hold the NaN."""
    try:
        check_finite(terms, step)
    except FloatingPointError as e:
        where = f"step {last_good} in {out_dir}" if last_good is not None else "none written yet"
        msg = f"{e}; stopped without saving, the last good checkpoint is {where}"
        logger.log(event="nonfinite", step=step, message=msg, **logged)
        cleanup_ddp()
        raise FloatingPointError(msg) from None


def optimizer_step(opt, model, grad_clip):
    """Clip the trainable parameters' gradient norm (grad_clip > 0), step, and clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def param_counts(model):
    """-> (parameters, trainable parameters), in numbers of elements."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def broadcast_buffers_once(model, src=0):
    """Copy every buffer of `model` from rank `src` to all ranks (no-op without DDP). Call once, after
    building / resuming and before training. DDP with broadcast_buffers=False (right for EMA codebooks
    that rvq all-reduces itself) also skips its initial buffer sync: parameters are broadcast at wrap
    time, buffers are not, so a buffer drawn at random after a per-rank seed (a quantizer's codebook and
    EMA statistics) would start different on every rank while only rank 0's is saved."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, src)


def graph_breaks(fn, *args, **kwargs):
    """Dynamo graph breaks in one call fn(*args, **kwargs) -> (count, [one "file:line: reason" per break]).
    torch._dynamo.explain traces fn as torch.compile would, without generating code, and runs it once. A
    break splits the compiled region: the host waits for the device there and inductor cannot fuse across
    it, so a training step should keep only the breaks its data forces (bench.py gpu prints the count,
    tests/test_bench.py keeps it from growing). explain resets dynamo's caches: call it before compiling."""
    import torch._dynamo
    e = torch._dynamo.explain(fn)(*args, **kwargs)
    where = lambda st: f"{os.path.basename(st[-1].filename)}:{st[-1].lineno}" if st else "?"
    reasons = [f"{where(r.user_stack)}: {r.reason.splitlines()[0]}" for r in e.break_reasons]
    return e.graph_break_count, reasons


def sampler_after(n, cfg, ctx, consumed):
    """The ShardedSampler of this rank over `n` items, placed after `consumed` micro-batches of every rank."""
    sampler = ShardedSampler(n, cfg.seed, ctx.rank, ctx.world, cfg.micro_batch)
    total = consumed * ctx.world * cfg.micro_batch
    sampler.load_state_dict({"epoch": total // n, "pos": total % n, "n": n, "seed": cfg.seed})
    return sampler


class ShardedSampler:
    """Infinite, deterministic, resumable batches of dataset indices for one DDP rank.

    The index stream is perm(epoch 0) ++ perm(epoch 1) ++ ..., each a permutation of range(n) seeded
    by (seed, epoch). Global batch k is the stream slice [k*W*B, (k+1)*W*B) and rank r takes its r-th
    B-slice: ranks are disjoint within a global batch, every index is seen once per epoch (no drop, no
    padding; a batch may straddle two epochs) and the whole thing is a function of (epoch, position),
    which is all a checkpoint needs to continue with exactly the next batch. Iterate it in the main
    process: a DataLoader with workers would read ahead and make the saved position wrong.
    """

    def __init__(self, n, seed, rank, world, batch_size):
        if n <= 0 or batch_size <= 0 or not 0 <= rank < world:
            raise ValueError(f"ShardedSampler: need n > 0, batch_size > 0, 0 <= rank < world; got "
                             f"n={n} batch_size={batch_size} rank={rank} world={world}")
        self.n, self.seed, self.rank, self.world, self.batch_size = n, seed, rank, world, batch_size
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self):
        need, out = self.world * self.batch_size, []
        while len(out) < need:
            take = min(need - len(out), self.n - self.pos)
            out += self._permutation(self.epoch)[self.pos:self.pos + take]
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        B = self.batch_size
        return out[self.rank * B:(self.rank + 1) * B]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state):
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for n={state['n']} seed={state['seed']}, this sampler "
                             f"has n={self.n} seed={self.seed}: resuming would not continue the stream")
        self.epoch, self.pos = state["epoch"], state["pos"]


# -----------------------------------------------------------------------------
# a user's mistake must never cost a model: config checks, the out_dir guard, resume against the saved config

# The config keys a resume may change: when and how often things happen, where, on what hardware, what the
# held-out evaluation covers and how it samples. Every other key changes the model, the objective or the
# training data stream, so a resume that changes it is refused by name. (cfg_scale ... top_p are
# codec.SAMPLING_KEYS, the evaluation's image sampler; `tokenizer` is a path whose content train_mllm checks
# by hash; train_mllm's code cache refuses an eval_size / eval_data it was not built with.)
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "stop_step", "resume", "overwrite", "out_dir", "cache_dir", "prepare", "prepare_batch",
    "log_interval", "eval_interval", "ckpt_interval", "sample_interval", "image_interval",
    "eval_size", "eval_data", "classnames", "eval_batch", "eval_qa", "eval_gen", "device", "dtype", "compile",
    "threads", "num_workers", "cfg_scale", "temperature", "fine_temperature", "top_k", "top_p", "tokenizer",
    "activation_checkpointing", "fsdp_bf16", "lr_cycles"})  # lr_cycles: the schedule, like max_steps

# the files whose presence means an out_dir holds a model (or a run that can be resumed)
MODEL_FILES = ("train_state.pt", "model.safetensors")

INTERVAL_KEYS = ("log_interval", "eval_interval", "ckpt_interval", "sample_interval", "image_interval")


def every(step, interval):
    """True when `step` is a multiple of `interval`; interval 0 means never (the trainers still log,
    checkpoint and evaluate at their last step)."""
    return interval > 0 and step % interval == 0


def check_train_config(cfg, rules=()):
    """The checks every trainer's config gets before any work starts (fields a config lacks are skipped):
    step counts and batch sizes positive, intervals >= 0 (0 = only at the last step), stop_step within
    the schedule, then check_values(cfg, rules)."""
    def need(key, ok, what):
        if hasattr(cfg, key) and not ok(getattr(cfg, key)):
            raise UserError(f"--{key}={getattr(cfg, key)!r}: {what}")
    need("max_steps", lambda v: v >= 1, "need at least 1 step")
    need("stop_step", lambda v: 0 <= v <= cfg.max_steps, f"need 0 (run to max_steps) .. max_steps={cfg.max_steps}")
    for k in ("batch_size", "micro_batch", "eval_batch", "prepare_batch", "train_size"):
        need(k, lambda v: v >= 1, "need >= 1")
    for k in INTERVAL_KEYS:
        need(k, lambda v: v >= 0, "need >= 1, or 0 for off (the last step still logs, saves and evaluates)")
    need("warmup", lambda v: v >= 0, "need >= 0")
    need("threads", lambda v: v >= 0, "need >= 0 (0: torch's default)")
    check_values(cfg, rules)


def device_problem(device):
    """Why `device` (cpu, cuda, cuda:N, mps; '' = the default) cannot be used on this machine, or None."""
    kind, _, index = device.partition(":")
    if not device or kind == "cpu" and not index:
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA GPU that torch can use (--device=cpu, or '' for the default)"
        n = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= n):
            return f"this machine has {n} CUDA GPU(s): cuda:0 .. cuda:{n - 1}"
        return None
    if kind == "mps" and not index:
        ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        return None if ok else "MPS (Apple's GPU) is not available on this machine (--device=cpu)"
    return "expected cpu, cuda, cuda:N or mps"


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


# The values every config is checked against before any work, for the fields it has (None, where a field allows
# it, passes: it means "off" or "as recorded"). (keys, ok(value), what a good value is). Relations between fields
# of one model (heads dividing widths) are in the table beside that config (RULES in the trainers).
VALUE_RULES = (
    (("lr", "vis_lr", "disc_lr"), lambda v: _finite(v) and v > 0, "need a finite number > 0"),
    (("min_lr", "disc_min_lr", "weight_decay", "grad_clip", "vis_gain", "text_loss_weight", "pix_loss_weight",
      "sem_loss_weight", "gen_caption_loss", "gen_ground_loss", "weight_shortcut") + tuple(
        f"w_{k}" for k in ("sem_tok", "sem_pool", "commit", "rec", "edge", "lpips", "gan")),
     lambda v: _finite(v) and v >= 0, "need a finite number >= 0"),
    (("min_lr_frac", "caption_drop", "caption_dropout", "vq_pix.decay", "vq_sem.decay"),
     lambda v: _finite(v) and 0 <= v <= 1, "need a number in [0, 1]"),
    (("beta1", "beta2"), lambda v: _finite(v) and 0 <= v < 1, "need a number in [0, 1)"),
    (("temperature",), lambda v: _finite(v) and v >= 0, "need a finite number >= 0 (0: greedy)"),
    (("cfg_scale", "fine_temperature", "top_p", "adaptive_lo", "adaptive_hi"), _finite,
     "need a finite number (see the key's comment for what <= 0 means)"),
    (("batch_size", "micro_batch", "eval_batch", "prepare_batch", "max_new_tokens", "image_size", "patch_size",
      "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers", "text_heads", "mlp_ratio",
      "max_len", "codebook_size", "code_dim", "depth", "dec_ch", "n_layer", "n_embd", "n_head", "n_kv_head",
      "intermediate_size", "head_n_layer", "head_n_embd", "head_n_head", "qa_per_image", "disc_width") + tuple(
        f"{g}.{k}" for g in ("vq_pix", "vq_sem") for k in ("codebook_size", "code_dim", "depth")) + tuple(
        f"decoder.{k}" for k in ("ch", "latent_channels")), lambda v: isinstance(v, int) and v >= 1,
     "need an integer >= 1"),
    (("threads", "num_workers", "grid_scale", "decoder.num_res_blocks", "decoder.patch_skip", "max_images"),
     lambda v: isinstance(v, int) and v >= 0, "need an integer >= 0"),
    (("dtype",), lambda v: v in ("bfloat16", "float16", "float32"), "expected bfloat16, float16 or float32"),
)


def check_values(cfg, rules=()):
    """Every VALUE_RULES entry for the fields `cfg` has, the device, then `rules`: ((key, ok(cfg), what), ...),
    the relations of one config's fields. The first failure is a UserError naming the key and its value."""
    from configurator import value
    for keys, ok, what in VALUE_RULES:
        for k in keys:
            v = value(cfg, k)
            if v is not None and not ok(v):
                raise UserError(f"--{k}={v!r}: {what}")
    problem = device_problem(getattr(cfg, "device", "") or "")
    if problem:
        raise UserError(f"--device={cfg.device!r}: {problem}")
    for key, ok, what in rules:
        if not ok(cfg):
            raise UserError(f"--{key}={value(cfg, key)!r}: {what(cfg) if callable(what) else what}")


def require_path(value, key, kind="dir", hint=""):
    """A path the run cannot start without: refuse it now, naming the key, not after minutes of work."""
    ok = {"dir": os.path.isdir, "file": os.path.isfile, "any": os.path.exists}[kind]
    if not value or not ok(value):
        what = {"dir": "a folder", "file": "a file", "any": "a file or folder"}[kind]
        got = "is empty" if not value else ("does not exist" if not os.path.exists(value) else f"is not {what}")
        raise UserError(f"--{key}={value!r} {got}: need {what}" + (f"; {hint}" if hint else ""))


def holds(key, also=(), unused=()):
    """Decorator for a command `fn(cfg)` that writes the folder cfg.<key> (and the folders cfg.<also>): before
    any work its outputs are checked against every path the config reads (folders.check_outputs; the
    keys `unused` are neither), then it runs holding cfg.<key> (folders.hold_folder: one writer per
    folder, released on return, on an error and when the process dies)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            outs = (key, *also)
            reads = path_fields(cfg, skip=(*outs, *unused))
            check_outputs(reads, dirs=[(f"--{k}", getattr(cfg, k)) for k in outs])
            with hold_folder(getattr(cfg, key)):
                return fn(cfg, *args, **kwargs)
        return run
    return wrap


def guard_out_dir(cfg):
    """Training into an out_dir that already holds a model needs --resume=True (continue it) or
    --overwrite=True (replace it): a finished model is never replaced by accident."""
    if cfg.resume or getattr(cfg, "overwrite", False):
        return
    found = [f for f in MODEL_FILES if os.path.isfile(os.path.join(cfg.out_dir, f))]
    if found:
        raise UserError(f"out_dir {cfg.out_dir!r} already holds a model ({', '.join(found)}): pass --resume=True "
                        f"to continue it, --overwrite=True to replace it, or another --out_dir")


def _plain(v):
    """Config values as JSON sees them, so a tuple in the new config equals the list a checkpoint kept."""
    return json.loads(json.dumps(v))


def config_changes(saved, new, groups=(), prefix=""):
    """Keys outside RESUME_MAY_CHANGE whose value differs between a checkpoint's config and this run's:
    {key: (saved, new)}, the keys of the `groups` (decoder) by their dotted names (decoder.ch). A key only one side
    has (a field added to the code since) is not compared."""
    out = {}
    for k, v in new.items():
        if k not in saved or k in RESUME_MAY_CHANGE:
            continue
        if k in groups and isinstance(v, dict) and isinstance(saved[k], dict):
            out.update(config_changes(saved[k], v, (), prefix + k + "."))
        elif _plain(saved[k]) != _plain(v):
            out[prefix + k] = (_plain(saved[k]), _plain(v))
    return out


def load_train_state(path, cfg, map_location="cpu"):
    """train_state.pt for --resume=True: present, readable (a damaged file is named, not a zip-reader
    traceback) and written with the same model / objective / data config as this run."""
    from configurator import config_dict, keys
    if not os.path.isfile(path):
        raise UserError(f"--resume=True but there is no {path} (train without --resume first)")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated / damaged file: zip, pickle or storage errors
        first = str(e).split(". ")[0]  # torch appends a paragraph of advice
        raise UserError(f"cannot read {path} ({type(e).__name__}: {first}); it is damaged or not a train_state.pt") from None
    if not isinstance(st, dict) or ("model" not in st and "sharded" not in st):
        raise UserError(f"{path} is not a train_state.pt written by these trainers")
    saved = st.pop("sha256", None)  # None: written before checkpoints carried a digest
    if saved is not None and state_digest(st) != saved:
        raise UserError(f"{path} is damaged: its contents do not match the sha256 recorded when it was saved (step "
                        f"{st.get('step', '?')}); no earlier checkpoint is kept (each save replaces the previous "
                        f"one): train again with --overwrite=True or into another --out_dir")
    groups = [k for k, (obj, name, _) in keys(cfg).items() if dataclasses.is_dataclass(getattr(obj, name))]
    diff = config_changes(st.get("config") or {}, config_dict(cfg), groups)
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in sorted(diff.items())))
        raise UserError(f"--resume=True with a config that changes the model or the data stream ({shown}; "
                        f"saved in {path}): resume with the saved values, or train into a new --out_dir")
    return st
