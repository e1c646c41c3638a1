"""
Pretrain a small SigLIP (image + text towers, pairwise sigmoid loss) from scratch: the teacher that the
DualToken tokenizer starts from and stays distilled to.

    python train_siglip.py config/shapes.py                      # CPU / one GPU
    torchrun --standalone --nproc_per_node=8 train_siglip.py config/shapes.py
    python train_siglip.py config/shapes.py --resume=True        # continue exactly where it stopped

out_dir holds a Hugging Face-format SigLIP (config.json + model.safetensors, `SigLIP.from_pretrained`),
`train_state.pt` (weights, optimizer, step, RNG, data position: everything exact resume needs),
`log.jsonl` and `eval.json` (zero-shot accuracy on held-out single-object shapes images, 18 classes).
"""
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import data
import train_utils as tu
from configurator import PROGRESS, UserError, config_dict, parse_config, run_main
from siglip import SigLIP, SigLIPConfig, SigLIPTextConfig, SigLIPVisionConfig
from siglip import zero_shot_accuracy, zero_shot_classifier
from text import ByteTokenizer


@dataclass
class TrainSigLIPConfig:
    SECTION = "siglip"  # reads the `siglip_config = dict(...)` section of a pipeline preset
    out_dir: str = "out-siglip"
    # data: "shapes" (the built-in world) or a folder for data.ImageCaptionDataset
    data: str = "shapes"
    image_size: int = 64
    max_objects: int = 2             # shapes: 1..max_objects objects per training image
    train_size: int = 1_000_000      # shapes: length of the (procedural) train split
    eval_size: int = 540             # held-out single-object val images for zero-shot
    templates: tuple = ("a {}", "a photo of a {}", "a small {}", "a large {}")
    # shapes: each object's size and position phrases are dropped from its caption with this
    # probability, so the text tower also sees "a red circle" (the zero-shot prompts) and learns
    # colour and shape as separate words rather than one long caption string
    caption_drop: float = 0.5
    # model (SigLIP shapes; text projection = vision width, as SigLIP compares the two directly)
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 96                # byte tokens incl. eos; a two-object shapes caption is <= 92
    # optimisation
    batch_size: int = 64             # global batch per optimizer step (= the sigmoid loss's negatives)
    micro_batch: int = 64            # per process per forward; accumulation = batch / (micro * world)
    max_steps: int = 1000
    stop_step: int = 0               # stop (with a checkpoint) after this step; 0: run to max_steps
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.05
    beta2: float = 0.95
    grad_clip: float = 1.0
    # system
    seed: int = 0
    device: str = ""                 # "" -> cuda > mps > cpu
    dtype: str = "bfloat16"          # autocast dtype on cuda; CPU always runs fp32
    compile: Optional[bool] = None   # None -> on for cuda only
    log_interval: int = 10
    eval_interval: int = 250
    ckpt_interval: int = 250
    resume: bool = False
    overwrite: bool = False          # replace a model already in out_dir (else: refused, see tu.guard_out_dir)
    threads: int = 0                 # CPU intra-op threads; 0: torch's default


# how this config's fields must relate (tu.check_values; each field's own range is in tu.VALUE_RULES)
RULES = (
    ("vision_width", lambda c: c.vision_width % c.vision_heads == 0,
     lambda c: f"need a multiple of --vision_heads={c.vision_heads} (each head takes width / heads channels)"),
    ("text_width", lambda c: c.text_width % c.text_heads == 0,
     lambda c: f"need a multiple of --text_heads={c.text_heads} (each head takes width / heads channels)"),
)


def validate(cfg):
    """Every check that needs no model or data, before any work: a mistake costs a second, not a run."""
    tu.check_train_config(cfg, RULES)
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"--image_size={cfg.image_size} is not a multiple of --patch_size={cfg.patch_size} "
                        f"(the last {cfg.image_size % cfg.patch_size} pixel rows/columns would be dropped)")
    if cfg.data != "shapes":
        tu.require_path(cfg.data, "data", "any", "'shapes', a folder of images + .txt captions or a .jsonl")
        if cfg.data.endswith(".jsonl"):
            data.read_jsonl(cfg.data)  # every record checked now, naming file:line
    elif cfg.eval_size < 1:
        raise UserError(f"--eval_size={cfg.eval_size}: need >= 1 held-out image for the zero-shot evaluation")
    tu.guard_out_dir(cfg)


def build_model(cfg, vocab_size):
    v = SigLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                           intermediate_size=cfg.mlp_ratio * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads)
    t = SigLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_width,
                         intermediate_size=cfg.mlp_ratio * cfg.text_width, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_len,
                         projection_size=cfg.vision_width, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)
    return SigLIP(SigLIPConfig(vision=v, text=t))


def make_data(cfg):
    """-> (train dataset, zero-shot eval set or None). Shapes eval images are from the val split (its
    keys are disjoint from train's by construction) and hold one object, so the 18 "colour shape"
    classes are unambiguous."""
    if cfg.data != "shapes":
        return data.ImageCaptionDataset(cfg.data, transform=data.train_transform(cfg.image_size)), None
    world = data.ShapesWorld(data.ShapesConfig(image_size=cfg.image_size, max_objects=cfg.max_objects,
                                               seed=cfg.seed))
    train = data.ShapesDataset(world, "train", cfg.train_size)
    val = data.ShapesDataset(world, "val", cfg.eval_size, num_objects=1)
    classes = world.class_names()
    items = [val[i] for i in range(len(val))]
    images = torch.stack([it["image"] for it in items])  # (N, 3, H, W)
    labels = torch.tensor([classes.index(f"{it['objects'][0]['color']} {it['objects'][0]['shape']}")
                           for it in items])
    return train, dict(images=images, labels=labels, classes=classes)


@torch.no_grad()
def evaluate(model, text_tok, cfg, ev, device):
    """Zero-shot top-1/top-5 over the class names with the prompt templates averaged (CLIP ensembling)."""
    was_training = model.training
    model.eval()
    clf = zero_shot_classifier(model, text_tok, ev["classes"], list(cfg.templates))
    emb = torch.cat([model.encode_image(x.to(device)) for x in ev["images"].split(256)])  # (N, D)
    acc = zero_shot_accuracy(emb, clf, ev["labels"], topk=(1, 5))
    model.train(was_training)
    return {"zero_shot_top1": acc[1], "zero_shot_top5": acc[5], "n_images": len(ev["labels"])}


@tu.holds("out_dir")
def train(cfg):
    t_start = time.time()
    validate(cfg)
    state_path = os.path.join(cfg.out_dir, "train_state.pt")
    st = tu.load_train_state(state_path, cfg) if cfg.resume else None  # before any work: it may refuse
    ctx = tu.setup_ddp(cfg.device or None)
    device, master = ctx.device, ctx.is_master
    torch.manual_seed(cfg.seed + ctx.rank)
    accum = tu.grad_accum_steps(cfg.batch_size, cfg.micro_batch, ctx.world)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    text_tok = ByteTokenizer()
    train_ds, ev = make_data(cfg)
    random.seed(cfg.seed * 1000 + ctx.rank)  # caption dropout; saved with the RNG state for resume
    sampler = tu.ShardedSampler(len(train_ds), cfg.seed, ctx.rank, ctx.world, cfg.micro_batch)

    # build -> load (resume) -> compile -> DDP; always save / evaluate the unwrapped `raw` model
    raw = build_model(cfg, text_tok.vocab_size).to(device)
    opt = tu.adamw(tu.param_groups(raw, cfg.weight_decay), device, lr=cfg.lr, betas=(0.9, cfg.beta2))
    step = 0
    if st is not None:
        raw.load_state_dict(st["model"])  # strict: the preset must describe the same model
        opt.load_state_dict(st["optimizer"])
        sampler.load_state_dict(st["sampler"])
        tu.restore_rng_states(st["rng"], ctx, "train_state.pt")
        step = st["step"]
    n_params = sum(p.numel() for p in raw.parameters())
    use_compile = device.startswith("cuda") if cfg.compile is None else cfg.compile
    model = torch.compile(raw) if use_compile else raw
    if ctx.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if
                                                          device.startswith("cuda") else None)
    autocast = tu.autocast_ctx(device, cfg.dtype)
    logger = tu.JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=master, fresh=st is None,
                            resume_step=None if st is None else step)
    PROGRESS.update(out_dir=cfg.out_dir, step=step, checkpoint=step if st is not None else None)  # Ctrl-C's line
    if master:
        print(f"SigLIP {n_params / 1e6:.2f}M params, device {device} x{ctx.world}, accum {accum}, "
              f"from step {step}")
        logger.log(event="start", step=step, params=n_params, world=ctx.world, config=config_dict(cfg))

    def checkpoint():
        rngs = tu.all_rng_states(ctx)  # every rank's, so resume restores each exactly
        if master:
            # the HF folder is the product; train_state.pt (written atomically, with the weights) is
            # what resume reads, so a crash mid-export never breaks a resume
            with tu.checkpoint_commit(step):
                tu.save_train_state({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                     "sampler": sampler.state_dict(), "rng": rngs, "config": config_dict(cfg)},
                                    state_path)
            raw.save_pretrained(cfg.out_dir)

    def run_eval():
        if ev is None or not master:
            return None
        res = dict(step=step, **evaluate(raw, text_tok, cfg, ev, device))
        print(f"step {step}: zero-shot top-1 {res['zero_shot_top1']:.4f}, top-5 {res['zero_shot_top5']:.4f} "
              f"({res['n_images']} held-out single-object images, {len(ev['classes'])} classes)")
        logger.log(event="eval", **res)
        return res

    last_step = cfg.stop_step or cfg.max_steps
    bar = tqdm(total=last_step, initial=step, disable=not master, desc="siglip", dynamic_ncols=True)
    t0, seen, result = time.time(), 0, None
    while step < last_step:
        lr = tu.cosine_lr(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(accum):
            batch = data.collate([train_ds[i] for i in next(sampler)])
            pixels = batch["image"].to(device, non_blocking=True)
            captions = batch["caption"]
            if cfg.data == "shapes" and cfg.caption_drop > 0:
                captions = [data.caption(o, cfg.caption_drop, random) for o in batch["objects"]]
            ids = text_tok(captions, cfg.max_len)
            raw.text.check_ids(ids)  # on the CPU batch: the compiled forward skips this host read
            ids = ids.to(device, non_blocking=True)
            if ctx.ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                # negatives are the micro-batch on this process (SigLIP's chunked cross-device loss
                # would also pair with other ranks' texts; not needed at this scale)
                loss = raw.sigmoid_loss(model(pixels, ids).float()) / accum
            loss.backward()
            loss_sum += loss.detach()
        tu.check_finite({"sigmoid_loss": loss_sum}, step)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += cfg.batch_size
        bar.update(1)
        if master and (tu.every(step, cfg.log_interval) or step == last_step):
            dt = time.time() - t0
            row = dict(step=step, loss=float(loss_sum), lr=lr,  # rank 0's share
                       logit_scale=raw.logit_scale.exp().item(), logit_bias=raw.logit_bias.item(),
                       img_per_s=seen / dt, elapsed_s=time.time() - t_start)
            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}")
            logger.log(event="train", **row)
        PROGRESS["step"] = step  # after its log line: the step Ctrl-C names is logged
        if tu.every(step, cfg.ckpt_interval) or step == last_step:
            checkpoint()
        if tu.every(step, cfg.eval_interval) or step == last_step:
            result = run_eval()
    bar.close()
    if master and result is not None:
        result.update(wall_s=time.time() - t_start, templates=list(cfg.templates),
                      classes=ev["classes"], config=config_dict(cfg))
        tu.write_json(result, os.path.join(cfg.out_dir, "eval.json"))
        print(f"done in {result['wall_s']:.0f} s; wrote {cfg.out_dir}/eval.json")
    tu.cleanup_ddp()
    return result


def main(argv):
    return train(parse_config(TrainSigLIPConfig(), argv))


if __name__ == "__main__":
    run_main(main)
