"""
Sharded training (FSDP2, torch.distributed.fsdp.fully_shard): parameters, gradients and AdamW state split over
the ranks, their checkpoints, and what training keeps in memory per GPU (state_bytes, `python bench.py memory`).
train_mllm.py --parallel=fsdp uses it; a DDP or one-process run needs only checkpoint_blocks and state_bytes.
"""
import os

import torch
import torch.distributed as dist

from configurator import UserError
from train_utils import save_train_state

# What a sharded run does between micro-steps of one optimizer step (gradient accumulation): parameters stay
# sharded (fsdp_shard: every unit all-gathers its parameters just before its forward, frees them after it, and
# gathers them again for its backward, so a micro-step all-gathers each unit twice); gradients are reduce-scattered
# at the end of every micro-step's backward and summed into each rank's fp32 gradient shard. The alternative,
# set_requires_gradient_sync(False) until the last micro-step, communicates less but keeps every unsharded gradient
# on every GPU until then: the gradient memory of DDP, which is what FSDP is used here to remove.


def fsdp_policy(device, dtype):
    """FSDP2's mixed precision, the counterpart of autocast_ctx under FSDP: on cuda with bfloat16, each unit's
    parameters are all-gathered and computed in bf16 while the sharded master weights, the gradients'
    reduce-scatter and AdamW's state stay fp32 (no autocast needed: the compute dtype is the parameters').
    None elsewhere (CPU and MPS run fp32, as autocast_ctx; fp16 would need a GradScaler)."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if not str(device).startswith("cuda") or dtype != "bfloat16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_shard(model, units, policy=None):
    """Shard `model` (built on the meta device: this only replaces each parameter by its DTensor shard) the way
    torchtitan applies FSDP2: every module in `units` (decoder blocks, depth heads) is one unit, all-gathered
    just before its forward and freed after it (reshard_after_forward: ZeRO-3, so at most a unit or two is
    ever unsharded on a GPU), then the root takes the rest (embeddings, a tied head, final norm). A parameter
    shared by two modules (a tied head) must sit in one unit: both live in the root here. Then to_empty and
    fsdp_load_full give the shards their values."""
    from torch.distributed.fsdp import fully_shard
    kw = {} if policy is None else dict(mp_policy=policy)
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_load_full(model, full, device):
    """Materialise a sharded model on `device` and fill every shard from `full`, a full state dict only rank 0
    holds (other ranks pass None): set_model_state_dict broadcasts it one tensor at a time and each rank keeps
    its own rows, so the whole model never exists on a GPU, and in CPU memory on rank 0 only. Strict: every
    key, every shape (StateDictOptions.strict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model.to_empty(device=device)
    set_model_state_dict(model, full if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def fsdp_full_state_dict(model):
    """The sharded model's full state dict gathered into rank 0's CPU memory ({} on the other ranks): what
    the export writes and what evaluation runs on. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def init_optimizer_state(opt):
    """Create every parameter's optimizer state now, equal to what its first real step would create (zero
    moments, step 0): one zero-gradient step at lr 0 (torch.distributed.checkpoint's own recipe, which leaves
    the weights bit-for-bit unchanged: decay x (1 - 0) and an update x 0), then the step counters back to 0.
    Without it a trainable parameter that never gets a gradient (stage 2's depth heads: no generation samples)
    has no state, and a sharded checkpoint could not be loaded back strictly."""
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    for st in opt.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"].zero_()
        elif "step" in st:
            st["step"] = 0


def save_sharded(model, opt, path, extra):
    """Exact-resume state of a sharded run. Every rank writes its own shards of the model and optimizer state
    (torch.distributed.checkpoint) into a folder beside `path`, first as <folder>.tmp, renamed when every rank
    is done; then rank 0 writes `path` (a train_state.pt: `extra`, e.g. step and config, plus the folder's name
    under "sharded"), atomically and last. That replace is the commit: a crash at any moment leaves the
    previous train_state.pt naming its own untouched folder. Older folders are removed after the commit."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root, base = os.path.split(os.path.abspath(path))
    name = f"{base}.shards.{extra['step']:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    master = dist.get_rank() == 0
    if master:
        os.makedirs(root, exist_ok=True)
        for d in (tmp, final):  # a crashed attempt at this step (never committed: train_state.pt names older)
            if os.path.isdir(d):
                shutil.rmtree(d)
    dist.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    dist.barrier()
    if master:
        os.replace(tmp, final)
        save_train_state({**extra, "sharded": name}, path)
        for d in os.listdir(root):
            if d.startswith(f"{base}.shards.") and d != name:
                shutil.rmtree(os.path.join(root, d))
    dist.barrier()


def load_sharded(model, opt, path, st):
    """Load what save_sharded wrote (`st`: the train_state.pt at `path`, read by load_train_state) into the
    sharded model and its optimizer (after init_optimizer_state), strictly; any world size can read it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if "sharded" not in st:
        raise UserError(f"{path} holds a whole model (--parallel=ddp): resume it with --parallel=ddp")
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), st["sharded"])
    if not os.path.isdir(folder):
        raise UserError(f"{path} names the sharded state {folder}, which does not exist")
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def checkpoint_blocks(blocks):
    """Activation checkpointing per block: in the forward each block keeps only its inputs and recomputes its
    activations in its backward (torch.utils.checkpoint, non-reentrant), about one more forward of compute for
    the activation memory of all blocks but one. The block's own forward is wrapped, not the module: parameter
    names (checkpoints, exports) are unchanged, and under FSDP the recomputation runs inside the block's
    backward, where its parameters are already gathered (apply it before fsdp_shard)."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for b in blocks:
        b.forward = partial(checkpoint, b.forward, use_reentrant=False)


def state_bytes(model, world=1, fsdp=False):
    """Per-GPU bytes of what training keeps between steps, before activations: fp32 parameters (the master
    weights; a tied tensor counted once), an fp32 gradient and AdamW's two fp32 moments per trainable parameter
    (requires_grad), and the buffers. DDP: all of it on every GPU. FSDP over `world` GPUs: each parameter's
    shard as fully_shard cuts it (dim 0 in `world` chunks of ceil(n0 / world) rows: rank 0's, the largest);
    buffers stay whole on every rank. Works on a model built on the meta device. Returns a dict of bytes."""
    def n(p):  # elements of p on the fullest GPU
        if not fsdp or p.dim() == 0 or p.shape[0] == 0:
            return p.numel()
        return -(-p.shape[0] // world) * (p.numel() // p.shape[0])
    ps = list(model.parameters())  # a tied tensor once
    tr = [n(p) for p in ps if p.requires_grad]
    return dict(params=4 * sum(n(p) for p in ps), grads=4 * sum(tr), adam=8 * sum(tr),
                buffers=sum(b.numel() * b.element_size() for b in model.buffers()))
