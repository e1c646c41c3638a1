"""
Training mechanics shared by train_siglip.py, train_tokenizer.py and train_mllm.py, nanoGPT style.

Nothing here knows about a model: process setup (DDP from the environment), precision, the learning
rate schedule, optimizer groups, exact resume (RNG + data position), crash-safe checkpoint writes, a
JSONL log and a NaN guard. Each helper states the convention it follows so the three trainers agree.
"""
import contextlib
import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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
        raise ValueError(f"global batch {global_batch} is not a positive multiple of micro batch "
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


def param_groups(model, weight_decay):
    """AdamW groups: decay only >=2-D weights (matmuls, embeddings, convs); biases, norm gains and
    scalar parameters (e.g. SigLIP's logit scale / bias) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path, write):
    """Write to a temporary file in the same folder (same filesystem, so os.replace is atomic), fsync
    it, then replace: a crash mid-save leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


class JsonlLogger:
    """One JSON object per line, appended and closed at every write so a crash loses at most the line
    being written. Only the master process writes (enabled=ctx.is_master)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

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


def unwrap(model):
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`): save and evaluate this
    one, so checkpoint keys never carry `module.` / `_orig_mod.` prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


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
