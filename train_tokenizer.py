"""
Train the DualToken tokenizer (design §3): a SigLIP vision tower with a pixel RVQ on a shallow block
(decoded by a conv decoder) and a semantic RVQ on a deep block whose codes re-enter the remaining blocks
and stay distilled to a frozen copy of the original SigLIP (the teacher).

    python train_siglip.py config/shapes.py && python train_tokenizer.py config/shapes.py    # CPU
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/dualtoken_384.py \\
        --init_from=/path/to/siglip2-so400m-patch14-384 --data=/path/to/cc12m.jsonl
    python train_tokenizer.py config/shapes.py --resume=True         # continue exactly where it stopped

out_dir holds the tokenizer (config.json + model.safetensors, `DualToken.from_pretrained(out_dir)`),
`train_state.pt` (weights, both optimizers, step, RNG states, data position: what exact resume reads,
torch.load(weights_only=True)), `log.jsonl` (every loss term, adaptive weight, per-depth codebook usage
and perplexity, learning rates), `samples/step_*.png` (originals over reconstructions) and `eval.json`
(held-out PSNR and SSIM, zero-shot through the quantized semantic path vs the teacher, codebook usage).
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

import data
import train_utils as tu
from configurator import PROGRESS, UserError, config_dict, parse_config, run_main
from losses import Discriminator, LossConfig, TokenizerLoss, lpips_or_none
from metrics import psnr, ssim
from rvq import code_stats
from siglip import zero_shot_accuracy, zero_shot_classifier
from text import siglip_tokenizer
from tokenizer import DecoderConfig, DualToken, QuantizerConfig, default_config, teacher_features


@dataclass
class TrainTokenizerConfig:
    SECTION = "tokenizer"  # reads the `tokenizer_config = dict(...)` section of a pipeline preset
    out_dir: str = "out-tokenizer"
    init_from: str = ""              # HF-format SigLIP folder: the tokenizer's init AND the frozen teacher
    # data: "shapes" (the built-in world), an ImageFolder root (class subfolders) or an image-caption
    # source (folder of image + same-name .txt, or .jsonl); captions are not used by this stage
    data: str = "shapes"
    eval_data: str = ""              # real data: an ImageFolder root for held-out PSNR / zero-shot
    classnames: str = ""             # eval_data's zero-shot names, one per line ('' -> ImageNet's for 1000 folders)
    max_objects: int = 2             # shapes: 1..max_objects objects per training image
    train_size: int = 1_000_000      # shapes: length of the (procedural) train split
    eval_size: int = 540             # held-out images for PSNR and zero-shot (single-object for shapes)
    templates: tuple = ("a {}", "a photo of a {}", "a small {}", "a large {}")  # train_siglip's prompts
    num_workers: int = 0             # real data: DataLoader workers (0 keeps random crops bit-exact on resume)
    # tokenizer (tokenizer.DualTokenConfig); layer_sem 0 -> the tower's second-to-last block
    layer_recon: int = 6
    layer_shortcut: Optional[int] = 4   # None: no shortcut (the paper does not have it)
    weight_shortcut: float = 0.6
    layer_sem: int = 0
    codebook_size: int = 16384
    code_dim: int = 32
    depth: int = 8
    pix_depth: int = 0               # 0 -> depth; else the pixel RVQ's own depth (the semantic one keeps depth)
    vq_decay: float = 0.99
    shared_codebook: bool = True     # released: one book for every depth; False: a book per depth (not released)
    dec_ch: int = 128
    dec_ch_mult: tuple = (1, 1, 4, 4, 8)   # high -> low resolution; the latent grid is R / 2^(len-1)
    dec_num_res_blocks: int = 2
    dec_attn_resolutions: Optional[tuple] = None  # None -> attention at the latent grid only
    dec_latent_channels: int = 1024
    dec_patch_skip: int = 0          # not in the release (0): hidden width of the per-cell MLP that paints
                                     # each latent cell's pixel patch, added to the output (tokenizer.Decoder)
    # ablation switches (ablation.py, design §9): False -> pixel branch only, recon loss only;
    # tie_branches -> one quantizer at layer_recon == layer_sem, decoded AND distilled (VILA-U-like)
    semantic_branch: bool = True
    tie_branches: bool = False
    # not in the release (True): False with layer_recon=0 makes every pixel code stack a function of its own
    # patch only (tokenizer.DualTokenConfig.pix_attn)
    pix_attn: bool = True
    # which parameters train. "vision": the released stage 1, the whole vision tower + new modules.
    # "after_sem": the cheap stage, patch/position embeddings and blocks 1..layer_sem frozen (the pixel
    # branch then learns on fixed features, the semantic tail adapts to the quantized input).
    # The text tower and logit scale / bias are always frozen (zero-shot needs the teacher's text space).
    trainable: str = "vision"
    # objective (losses.LossConfig; design §3 values)
    w_sem_tok: float = 5.0
    w_sem_pool: float = 1.0
    w_commit: float = 5.0
    w_rec: float = 5.0
    w_edge: float = 0.0              # not in the release (0): L1 of pixel differences (losses.edge_loss)
    w_lpips: float = 1.0
    w_gan: float = 0.75
    adaptive_lo: float = 0.3
    adaptive_hi: float = 10.0
    lpips_vgg_path: str = ""         # torchvision vgg16-397923af.pth
    lpips_lin_path: str = ""         # lpips weights/v0.1/vgg.pth; both empty -> LPIPS off
    gan_start: int = -1              # step at which the GAN term and D training start; -1 = GAN off
    disc_width: int = 64
    disc_lr: float = 7.2e-5
    disc_min_lr: float = 0.0
    disc_warmup: int = 0             # D schedule: warmup from gan_start, cosine to disc_min_lr at max_steps
    # optimisation (released: AdamW 7.2e-5, betas (0.5, 0.9), wd 1e-4 on >=2-D weights, 10k warmup,
    # cosine to 0, no clipping, global batch 256)
    batch_size: int = 256            # global batch per optimizer step
    micro_batch: int = 32            # per process per forward; accumulation = batch / (micro * world)
    max_steps: int = 100_000
    stop_step: int = 0               # stop (with a checkpoint) after this step; 0: run to max_steps
    lr: float = 7.2e-5
    min_lr: float = 0.0
    warmup: int = 10_000
    weight_decay: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    grad_clip: float = 0.0           # 0: no clipping (released)
    grad_checkpointing: bool = False  # recompute each ViT block in backward: less memory, ~30% slower
    # system
    seed: int = 0
    device: str = ""                 # "" -> cuda > mps > cpu
    dtype: str = "bfloat16"          # autocast dtype on cuda; CPU always runs fp32
    compile: Optional[bool] = None   # None -> on for cuda only
    log_interval: int = 10
    image_interval: int = 500        # PNG grid of originals vs reconstructions; 0: never
    eval_interval: int = 2000
    eval_batch: int = 64
    ckpt_interval: int = 1000
    resume: bool = False
    overwrite: bool = False          # replace a model already in out_dir (else: refused, see tu.guard_out_dir)


# -----------------------------------------------------------------------------
# model, teacher, data


# how this config's fields must relate (tu.check_values; each field's own range is in tu.VALUE_RULES); layer_sem 0
# means the teacher's second-to-last block, known only once it loads (DualTokenConfig checks the rest then)
RULES = (
    ("layer_recon", lambda c: not c.layer_sem or 0 <= c.layer_recon <= c.layer_sem,
     lambda c: f"need 0 .. --layer_sem={c.layer_sem} (the pixel codes come from a block at or below the semantic one)"),
    ("tie_branches", lambda c: not c.tie_branches or (c.semantic_branch and (not c.layer_sem or
                                                                              c.layer_recon == c.layer_sem)),
     lambda c: f"one quantizer for both needs --semantic_branch=True and --layer_recon == --layer_sem (got "
               f"{c.semantic_branch}, {c.layer_recon}, {c.layer_sem})"),
    ("layer_shortcut", lambda c: c.layer_shortcut is None or (c.layer_shortcut >= 1 and
                                                             (not c.layer_sem or c.layer_shortcut <= c.layer_sem)),
     lambda c: f"need None or 1 .. --layer_sem={c.layer_sem or 'the second-to-last block'}"),
    ("dec_ch", lambda c: all(c.dec_ch * m % 32 == 0 for m in c.dec_ch_mult) and c.dec_latent_channels % 32 == 0,
     lambda c: f"every decoder width (dec_ch x dec_ch_mult {tuple(c.dec_ch_mult)}, dec_latent_channels "
               f"{c.dec_latent_channels}) must be a multiple of 32 (GroupNorm's groups)"),
)


def validate(cfg):
    """Every check that needs no model or data, before any work: a mistake costs a second, not a run."""
    tu.check_train_config(cfg, RULES)
    tu.require_path(cfg.init_from, "init_from", "dir", "a SigLIP folder (config.json + model.safetensors); for "
                    "shapes run `python train_siglip.py config/shapes.py` first")
    if cfg.data != "shapes":
        tu.require_path(cfg.data, "data", "any", "'shapes', an ImageFolder root, a folder of images + .txt "
                        "captions or a .jsonl")
        if cfg.data.endswith(".jsonl"):
            data.read_jsonl(cfg.data)  # every record checked now (file:line), before the teacher loads
    if cfg.eval_data:
        tu.require_path(cfg.eval_data, "eval_data", "dir", "an ImageFolder root")
    elif cfg.classnames:
        raise UserError(f"--classnames={cfg.classnames!r} names --eval_data's class folders; give --eval_data too")
    if cfg.data == "shapes" and cfg.eval_size < 1:
        raise UserError(f"--eval_size={cfg.eval_size}: need >= 1 held-out image")
    if cfg.trainable not in ("vision", "after_sem"):
        raise UserError(f"--trainable={cfg.trainable!r}: expected 'vision' or 'after_sem'")
    if cfg.lpips_vgg_path or cfg.lpips_lin_path:  # LPIPS needs both files
        tu.require_path(cfg.lpips_vgg_path, "lpips_vgg_path", "file", "torchvision's vgg16-397923af.pth")
        tu.require_path(cfg.lpips_lin_path, "lpips_lin_path", "file", "LPIPS weights/v0.1/vgg.pth")
    tu.guard_out_dir(cfg)


def build(cfg):
    """-> (tokenizer, frozen teacher) from the SigLIP folder `init_from` (DualToken.from_siglip)."""
    if not cfg.init_from or not os.path.isdir(cfg.init_from):
        raise UserError(f"init_from={cfg.init_from!r}: need a SigLIP folder (config.json + model.safetensors); "
                        f"for shapes run `python train_siglip.py config/shapes.py` first")
    from siglip import SigLIP
    teacher = SigLIP.from_pretrained(cfg.init_from)
    v = teacher.config.vision
    n_up = len(cfg.dec_ch_mult) - 1
    lat = v.image_size // 2 ** n_up
    attn = (lat,) if cfg.dec_attn_resolutions is None else tuple(cfg.dec_attn_resolutions)
    q = dict(codebook_size=cfg.codebook_size, code_dim=cfg.code_dim, depth=cfg.depth, decay=cfg.vq_decay,
             shared_codebook=cfg.shared_codebook)
    dcfg = default_config(
        teacher.config, layer_recon=cfg.layer_recon, layer_shortcut=cfg.layer_shortcut,
        weight_shortcut=cfg.weight_shortcut, layer_sem=cfg.layer_sem or v.num_hidden_layers - 1,
        vq_pix=QuantizerConfig(**{**q, "depth": cfg.pix_depth or cfg.depth}, ema_update="per_depth"), vq_sem=QuantizerConfig(**q, ema_update="deferred"),
        decoder_latent_shape=(lat, lat), semantic_branch=cfg.semantic_branch, tie_branches=cfg.tie_branches,
        pix_attn=cfg.pix_attn,
        decoder=DecoderConfig(ch=cfg.dec_ch, ch_mult=tuple(cfg.dec_ch_mult), num_res_blocks=cfg.dec_num_res_blocks,
                              attn_resolutions=attn, latent_channels=cfg.dec_latent_channels,
                              resolution=v.image_size, patch_skip=cfg.dec_patch_skip))
    model = DualToken(dcfg)
    model.siglip.load_state_dict(teacher.state_dict())  # strict: same config, same keys
    teacher.eval().requires_grad_(False)
    return model, teacher


def set_trainable(model, mode):
    if mode not in ("vision", "after_sem"):
        raise ValueError(f"trainable={mode!r}: expected 'vision' or 'after_sem'")
    model.requires_grad_(True)
    s = model.siglip
    if s.text is not None:
        s.text.requires_grad_(False)
        s.logit_scale.requires_grad_(False)
        s.logit_bias.requires_grad_(False)
    if mode == "after_sem":
        vis = s.vision
        vis.patch.requires_grad_(False)
        vis.pos.requires_grad_(False)
        for blk in vis.blocks[:model.config.layer_sem]:
            blk.requires_grad_(False)
    c = model.config
    if not c.semantic_branch:
        # recon-only: the blocks after the pixel branch's input, the post LN and the MAP head never get a
        # gradient; frozen, DDP does not fail on them and the trainable count printed at start is honest
        vis = s.vision
        for m in [*vis.blocks[max(c.layer_recon, c.layer_shortcut or 0):], vis.post_ln, vis.head]:
            if m is not None:
                m.requires_grad_(False)


def enable_grad_checkpointing(vision):
    """Recompute every ViT block in backward. Done by wrapping each block's forward on the instance, so
    module names (and so checkpoint keys) do not change."""
    from torch.utils.checkpoint import checkpoint
    for blk in vision.blocks:
        f = blk.forward
        blk.forward = lambda h, f=f: checkpoint(f, h, use_reentrant=False) if torch.is_grad_enabled() else f(h)


def make_data(cfg, R):
    """-> (train dataset, eval dict or None). Shapes eval: val-split images (keys disjoint from train by
    construction); zero-shot on single-object images (the 18 "colour shape" classes are unambiguous, the
    same set train_siglip scores the teacher on), PSNR on those and on 1..max_objects images."""
    if cfg.data != "shapes":
        tf = data.train_transform(R)  # RandomResizedCrop scale (0.9, 1), no flip (released)
        has_classes = os.path.isdir(cfg.data) and any(os.path.isdir(os.path.join(cfg.data, d))
                                                      for d in os.listdir(cfg.data))
        train = data.ImageFolderDataset(cfg.data, tf) if has_classes else data.ImageCaptionDataset(cfg.data, tf)
        if not cfg.eval_data:
            return train, None
        ds = data.ImageFolderDataset(cfg.eval_data, data.eval_transform(R))
        g = torch.Generator().manual_seed(1234)  # a fixed, class-mixed subset
        idx = torch.randperm(len(ds), generator=g)[:cfg.eval_size].tolist()
        items = [ds[i] for i in idx]
        return train, dict(images=torch.stack([it["image"] for it in items]),
                           labels=torch.tensor([it["label"] for it in items]),
                           classes=ds.class_names(cfg.classnames), multi=None)
    world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.seed))
    train = data.ShapesDataset(world, "train", cfg.train_size)
    single = data.ShapesDataset(world, "val", cfg.eval_size, num_objects=1)
    multi = data.ShapesDataset(world, "val", cfg.eval_size)
    classes = world.class_names()
    items = [single[i] for i in range(len(single))]
    labels = [classes.index(f"{it['objects'][0]['color']} {it['objects'][0]['shape']}") for it in items]
    return train, dict(images=torch.stack([it["image"] for it in items]), labels=torch.tensor(labels),
                       classes=classes, multi=torch.stack([multi[i]["image"] for i in range(len(multi))]))

# -----------------------------------------------------------------------------
# evaluation and pictures


@torch.no_grad()
def evaluate(raw, teacher, text_tok, cfg, ev, device, teacher_acc=None):
    """PSNR, SSIM (metrics.py, as eval.py), zero-shot (quantized semantic path; and the teacher, computed once) and codebook usage."""
    was = raw.training
    raw.eval()  # the quantizers must not move their codebooks on held-out data

    def run(images, with_ssim):
        out = {"psnr": [], "ssim": [], "pooled": [], "pix": [], "sem": []}
        for x in images.split(cfg.eval_batch):
            x = x.to(device)
            o = raw(x)
            out["psnr"].append(psnr(x, o.recon).cpu())
            if with_ssim:  # float64 filtering: ~1/4 of a decoder pass, so only on the headline set
                out["ssim"].append(ssim(x, o.recon).cpu())
            out["pix"].append(o.pix_codes.reshape(-1, o.pix_codes.shape[-1]).cpu())
            if sem_on:
                out["pooled"].append(o.pooled.float().cpu())
            if own_sem:
                out["sem"].append(o.sem_codes.reshape(-1, o.sem_codes.shape[-1]).cpu())
        return {k: torch.cat(v) for k, v in out.items() if v}

    # no semantic branch (recon-only ablations): zero-shot is "n/a" (None), never a number from another path;
    # tied (one quantizer): the semantic codes are the pixel codes, reported once under codes_pix
    sem_on, own_sem = raw.config.semantic_branch, raw.quantizer_sem is not None
    multi = ev.get("multi")
    a = run(ev["images"], with_ssim=multi is None)
    # the tokenizer's text tower is the teacher's, frozen: one classifier serves both image embeddings
    clf = zero_shot_classifier(raw.siglip, text_tok, ev["classes"], list(cfg.templates))
    k5 = (1, 5) if len(ev["classes"]) >= 5 else (1,)
    acc = zero_shot_accuracy(a["pooled"], clf.cpu(), ev["labels"], topk=k5) if sem_on else {1: None}
    if teacher_acc is None:
        t_emb = torch.cat([teacher.encode_image(x.to(device)).float().cpu() for x in ev["images"].split(cfg.eval_batch)])
        teacher_acc = zero_shot_accuracy(t_emb, clf.cpu(), ev["labels"], topk=k5)
    res = {"psnr": a["psnr"].mean().item(), "ssim": a["ssim"].mean().item() if multi is None else None,
           "zero_shot_top1": acc[1], "teacher_zero_shot_top1": teacher_acc[1],
           "zero_shot_gap": teacher_acc[1] - acc[1] if sem_on else None, "n_images": len(ev["labels"])}
    codes_pix, codes_sem = a["pix"], a.get("sem")
    if multi is not None:
        m = run(multi, with_ssim=True)
        res["psnr_single_object"], res["psnr"] = res["psnr"], m["psnr"].mean().item()
        res["ssim"] = m["ssim"].mean().item()
        codes_pix = torch.cat([codes_pix, m["pix"]])
        codes_sem = torch.cat([codes_sem, m["sem"]]) if own_sem else None
    K_pix, K_sem = raw.config.vq_pix.codebook_size, raw.config.vq_sem.codebook_size
    res["codes_pix"] = {k: v.tolist() for k, v in code_stats(codes_pix, K_pix).items()}
    res["codes_sem"] = {k: v.tolist() for k, v in code_stats(codes_sem, K_sem).items()} if own_sem else None
    raw.train(was)
    return res, teacher_acc


# -----------------------------------------------------------------------------
# training


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

    # build -> load (resume) -> compile -> DDP; always save / evaluate the unwrapped `raw` model
    raw, teacher = build(cfg)
    set_trainable(raw, cfg.trainable)
    raw, teacher = raw.to(device), teacher.to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(raw.siglip.vision)
    R, layer_sem = raw.config.siglip.vision.image_size, raw.config.layer_sem
    sem_on = raw.config.semantic_branch
    train_ds, ev = make_data(cfg, R)
    text_tok = None if ev is None else siglip_tokenizer(folders=[cfg.init_from], shapes=cfg.data == "shapes")[0]
    lpips, lpips_msg = lpips_or_none(cfg.lpips_vgg_path, cfg.lpips_lin_path)
    loss_fn = TokenizerLoss(LossConfig(w_sem_tok=cfg.w_sem_tok, w_sem_pool=cfg.w_sem_pool, w_commit=cfg.w_commit,
                                       w_rec=cfg.w_rec, w_edge=cfg.w_edge, w_lpips=cfg.w_lpips, w_gan=cfg.w_gan,
                                       adaptive_lo=cfg.adaptive_lo, adaptive_hi=cfg.adaptive_hi), lpips).to(device)
    opt = torch.optim.AdamW(tu.param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    disc = d_opt = None
    if cfg.gan_start >= 0:
        disc = Discriminator(cfg.disc_width).to(device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))  # released betas
    # the data position is the number of micro-batches consumed: the sampler state follows from it, so a
    # DataLoader may read ahead in workers without making the saved position wrong
    consumed = 0
    step = 0
    if st is not None:
        # strict copy INTO the existing tensors (load_weights would assign new ones, orphaning the optimizer's)
        raw.load_state_dict(st["model"], strict=True)  # codebooks and EMA buffers included
        opt.load_state_dict(st["optimizer"])
        if (disc is None) != (st.get("disc") is None):
            raise UserError(f"{state_path} was written with gan_start={st['config']['gan_start']}, this run has "
                            f"gan_start={cfg.gan_start}: the discriminator state does not match")
        if disc is not None:
            disc.load_state_dict(st["disc"])
            d_opt.load_state_dict(st["disc_optimizer"])
        if len(st["rng"]) != ctx.world:
            raise UserError(f"{state_path} has RNG states for {len(st['rng'])} processes, this run has "
                            f"{ctx.world}: exact resume needs the same world size")
        tu.set_rng_state(st["rng"][ctx.rank])
        step, consumed = st["step"], st["consumed"]
    batches = batch_stream(train_ds, cfg, ctx, consumed)
    if ctx.ddp:  # codebooks / EMA statistics were drawn after a per-rank seed: rank 0's for all
        tu.broadcast_buffers_once(raw)

    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    use_compile = device.startswith("cuda") if cfg.compile is None else cfg.compile
    if use_compile and disc is not None:
        # the GAN's adaptive weight differentiates the losses through the compiled decoder with
        # retain_graph=True, which AOTAutograd's donated buffers (a memory saving) refuse at the first GAN step
        from torch._functorch import config as functorch_config
        functorch_config.donated_buffer = False
    model = torch.compile(raw) if use_compile else raw
    d_model = disc
    if ctx.ddp:
        # codebooks are EMA buffers that rvq all-reduces itself; rebroadcasting them from rank 0 each
        # forward (DDP's default) would only cost time. False also skips DDP's initial buffer sync:
        # broadcast_buffers_once above did it
        ids = [ctx.local_rank] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if disc is not None:
            d_model = torch.nn.parallel.DistributedDataParallel(disc, device_ids=ids)
    autocast = tu.autocast_ctx(device, cfg.dtype)
    logger = tu.JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=master, fresh=st is None,
                            resume_step=None if st is None else step)
    PROGRESS.update(out_dir=cfg.out_dir, step=step, checkpoint=step if st is not None else None)  # Ctrl-C's line
    if master:
        print(f"DualToken {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, {cfg.trainable}), "
              f"device {device} x{ctx.world}, accum {accum}, from step {step}")
        print(lpips_msg)  # once: says whether the perceptual term is in the loss
        print("GAN off" if disc is None else f"GAN on from step {cfg.gan_start}")
        logger.log(event="start", step=step, params=n_params, trainable=n_train, world=ctx.world,
                   lpips=lpips_msg, config=config_dict(cfg))
    last_layer = raw.decoder.conv_out.weight  # where the adaptive weight compares gradients
    last_good = step if st is not None else None

    def checkpoint():
        nonlocal last_good
        rngs = tu.all_rng_states(ctx)  # every rank's, so resume restores each exactly
        if master:
            # train_state.pt (weights included) is what resume reads, written atomically in one file; the
            # exported folder is the product, each of its files atomic too
            tu.save_train_state({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                 "consumed": consumed, "disc": disc.state_dict() if disc is not None else None,
                                 "disc_optimizer": d_opt.state_dict() if disc is not None else None,
                                 "rng": rngs, "config": config_dict(cfg)}, state_path)
            PROGRESS["checkpoint"] = step  # what a resume starts from, from here on
            raw.save_pretrained(cfg.out_dir)  # atomic: config.json + model.safetensors
        last_good = step

    teacher_acc, result = None, None

    def run_eval():
        nonlocal teacher_acc
        if ev is None or not master:
            return None
        res, teacher_acc = evaluate(raw, teacher, text_tok, cfg, ev, device, teacher_acc)
        res = dict(step=step, **res)
        zs, cs = res["zero_shot_top1"], res["codes_sem"]
        zs = "n/a" if zs is None else f"{zs:.4f}"
        cs = "n/a" if cs is None else f"{cs['usage_any_depth']:.3f}"
        print(f"step {step}: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}, zero-shot top-1 {zs} (teacher "
              f"{res['teacher_zero_shot_top1']:.4f}), codebook usage pix {res['codes_pix']['usage_any_depth']:.3f} "
              f"sem {cs}")
        logger.log(event="eval", **res)
        return res

    last_step = cfg.stop_step or cfg.max_steps
    from tqdm import tqdm
    bar = tqdm(total=last_step, initial=step, disable=not master, desc="tokenizer", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < last_step:
        lr = tu.cosine_lr(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        gan_on = disc is not None and step >= cfg.gan_start
        sums, pairs = {}, []
        for micro in range(accum):
            x = next(batches).to(device, non_blocking=True)
            consumed += 1
            if ctx.ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                if sem_on:
                    t_sem, t_pool = teacher_features(teacher, x, layer_sem)
                out = model(x)
                # recon-only runs have no teacher pass and no semantic terms; runs without a semantic
                # quantizer of their own (recon-only, tied) have no commit_sem term
                sem = ((out.zq_sem.float(), t_sem.float(), out.pooled.float(), t_pool.float()) if sem_on
                       else (None, None, None, None))
                commit_sem = out.commit_sem if raw.quantizer_sem is not None else None
                if gan_on:
                    disc.requires_grad_(False)  # G's term must not leave gradients in D
                loss, terms = loss_fn(x, out.recon.float(), *sem, out.commit_pix, commit_sem,
                                      disc=disc if gan_on else None, last_layer=last_layer)
            try:
                tu.check_finite(terms, step)
            except FloatingPointError as e:
                where = f"step {last_good} in {cfg.out_dir}" if last_good is not None else "none written yet"
                msg = f"{e}; stopped without saving, the last good checkpoint is {where}"
                logger.log(event="nonfinite", step=step, message=msg, **terms)
                tu.cleanup_ddp()
                raise FloatingPointError(msg) from None
            (loss / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / accum
            if gan_on:
                pairs.append((x, out.recon.detach()))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        d_lr = None
        if gan_on:
            # D's own step on this step's (x, x_hat) pairs, its own optimizer and schedule
            disc.requires_grad_(True)
            d_lr = tu.cosine_lr(step - cfg.gan_start, cfg.disc_warmup, cfg.max_steps - cfg.gan_start,
                                cfg.disc_lr, cfg.disc_min_lr)
            for g in d_opt.param_groups:
                g["lr"] = d_lr
            for micro, (x, x_hat) in enumerate(pairs):
                if ctx.ddp:
                    d_model.require_backward_grad_sync = micro == accum - 1
                with autocast:
                    d_loss, d_terms = loss_fn.d_loss(d_model, x, x_hat)
                tu.check_finite(d_terms, step)
                (d_loss / accum).backward()
                for k, v in d_terms.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
        step += 1
        PROGRESS["step"] = step
        seen += cfg.batch_size
        bar.update(1)
        if master and (tu.every(step, cfg.log_interval) or step == last_step):
            dt = time.time() - t0
            stats = {f"{q}_{s}": [round(v, 4) for v in out.stats[q][s].tolist()]
                     for q in out.stats for s in ("usage", "perplexity")}
            row = dict(step=step, lr=lr, disc_lr=d_lr, img_per_s=seen / dt, elapsed_s=time.time() - t_start,
                       **sums, **stats)  # loss terms: rank 0's share, averaged over micro-steps
            bar.set_postfix(loss=f"{sums['total']:.3f}", rec=f"{sums['rec_mse']:.4f}", img_s=f"{seen / dt:.0f}")
            logger.log(event="train", **row)
        if master and cfg.image_interval and (tu.every(step, cfg.image_interval) or step == last_step):
            shown = psnr(x[:8], out.recon[:8].detach()).mean().item()
            data.grid_png([list(data.to_image(x[:8])), list(data.to_image(out.recon[:8]))],  # originals over recons
                          os.path.join(cfg.out_dir, "samples", f"step_{step:06d}.png"),
                          labels=[f"step {step}: training images", f"their reconstructions (PSNR {shown:.2f} dB)"])
        if tu.every(step, cfg.ckpt_interval) or step == last_step:
            checkpoint()
        if tu.every(step, cfg.eval_interval) or step == last_step:
            result = run_eval()
    bar.close()
    if master and result is not None:
        result.update(wall_s=time.time() - t_start, templates=list(cfg.templates), classes=ev["classes"],
                      lpips=lpips_msg, config=config_dict(cfg))
        tu.write_json(result, os.path.join(cfg.out_dir, "eval.json"))
        print(f"done in {result['wall_s']:.0f} s; wrote {cfg.out_dir}/eval.json")
    tu.cleanup_ddp()
    return raw, result


def batch_stream(ds, cfg, ctx, consumed):
    """Infinite iterator of (B, 3, R, R) image batches for this rank, starting after `consumed`
    micro-batches (ShardedSampler positions are a function of that count)."""
    sampler = tu.ShardedSampler(len(ds), cfg.seed, ctx.rank, ctx.world, cfg.micro_batch)
    total = consumed * ctx.world * cfg.micro_batch
    sampler.load_state_dict({"epoch": total // len(ds), "pos": total % len(ds), "n": len(ds), "seed": cfg.seed})
    collate = lambda items: data.collate(items)["image"]
    if cfg.num_workers == 0:  # main process: transforms draw from the checkpointed RNG, resume is exact
        return (collate([ds[i] for i in idx]) for idx in sampler)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=ctx.device.startswith("cuda"),
                                         persistent_workers=True)
    return iter(loader)


def main(argv):
    return train(parse_config(TrainTokenizerConfig(), argv))


if __name__ == "__main__":
    run_main(main)
