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
import os
import time
from dataclasses import dataclass, field, replace
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
from tokenizer import DualToken, DualTokenConfig, teacher_features


@dataclass
class TrainTokenizerConfig:
    SECTION = "tokenizer"  # reads the `tokenizer_config = dict(...)` section of a pipeline preset
    # the model's fields this trainer sets from its teacher: no keys
    DERIVED = {"siglip": "the teacher (init_from)", "decoder.resolution": "the teacher's image size",
               "decoder_latent_shape": "the teacher's image size and decoder.ch_mult"}
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
    # the tokenizer (tokenizer.DualTokenConfig: layer_recon, layer_sem, the ablation switches ...; its quantizers
    # and decoder as groups: --vq_pix.depth=4, decoder=dict(ch=64) in a preset)
    model: DualTokenConfig = field(default_factory=DualTokenConfig)
    # which parameters train. "vision": the released stage 1, the whole vision tower + new modules.
    # "after_sem": the cheap stage, patch/position embeddings and blocks 1..layer_sem frozen (the pixel
    # branch then learns on fixed features, the semantic tail adapts to the quantized input).
    # The text tower and logit scale / bias are always frozen (zero-shot needs the teacher's text space).
    trainable: str = "vision"
    # objective: the weights of losses.LossConfig (design §3 values), keys by their own names (--w_rec=5.0)
    loss: LossConfig = field(default_factory=LossConfig)
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


# how this config's fields must relate (tu.check_values; each field's own range is in tu.VALUE_RULES), checked before
# the teacher loads; DualTokenConfig checks the rest against the teacher's tower then
RULES = (
    ("layer_recon", lambda c: 0 <= c.model.layer_recon <= c.model.layer_sem,
     lambda c: f"need 0 .. --layer_sem={c.model.layer_sem} (the pixel codes come from a block at or below the semantic "
               f"one)"),
    ("tie_branches", lambda c: not c.model.tie_branches or (c.model.semantic_branch and
                                                            c.model.layer_recon == c.model.layer_sem),
     lambda c: f"one quantizer for both needs --semantic_branch=True and --layer_recon == --layer_sem (got "
               f"{c.model.semantic_branch}, {c.model.layer_recon}, {c.model.layer_sem})"),
    ("layer_shortcut", lambda c: c.model.layer_shortcut is None or 1 <= c.model.layer_shortcut <= c.model.layer_sem,
     lambda c: f"need None or 1 .. --layer_sem={c.model.layer_sem}"),
    ("decoder.ch", lambda c: all(c.model.decoder.ch * m % 32 == 0 for m in c.model.decoder.ch_mult)
     and c.model.decoder.latent_channels % 32 == 0,
     lambda c: f"every decoder width (decoder.ch x decoder.ch_mult {tuple(c.model.decoder.ch_mult)}, "
               f"decoder.latent_channels {c.model.decoder.latent_channels}) must be a multiple of 32 (GroupNorm's "
               f"groups)"),
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
    R, d = teacher.config.vision.image_size, cfg.model.decoder
    lat = R // 2 ** (len(d.ch_mult) - 1)  # the decoder's input grid
    levels = [lat * 2 ** i for i in range(len(d.ch_mult))]
    if not set(d.attn_resolutions) <= set(levels):
        raise UserError(f"--decoder.attn_resolutions={tuple(d.attn_resolutions)}: the decoder of a {R} px teacher "
                        f"works at {tuple(levels)} px (the latent grid {lat} and its doublings)")
    dcfg = replace(cfg.model, siglip=teacher.config, decoder_latent_shape=(lat, lat), decoder=replace(d, resolution=R))
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


def objective(cfg, device):
    """-> (TokenizerLoss with the config's weights, a line saying whether LPIPS is in it)."""
    lpips, lpips_msg = lpips_or_none(cfg.lpips_vgg_path, cfg.lpips_lin_path)
    loss_fn = TokenizerLoss(cfg.loss, lpips).to(device)
    return loss_fn, lpips_msg


def optimizers(cfg, raw, device):
    """-> (the tokenizer's AdamW, the discriminator, its Adam); no discriminator (None, None) while gan_start < 0."""
    opt = tu.adamw(tu.param_groups(raw, cfg.weight_decay), device, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.gan_start < 0:
        return opt, None, None
    disc = Discriminator(cfg.disc_width).to(device)
    return opt, disc, tu.adamw(disc.parameters(), device, adam=True, lr=cfg.disc_lr, betas=(0.5, 0.9))  # released betas


def resume(st, state_path, cfg, ctx, raw, opt, disc, d_opt):
    """Load train_state.pt (`st`, None: a new run) into everything that trains, and this rank's RNG states ->
    (step, consumed micro-batches: the data position, from which the sampler's state follows, so a DataLoader may
    read ahead in workers without making the saved position wrong)."""
    if st is None:
        return 0, 0
    # strict copy INTO the existing tensors (load_weights would assign new ones, orphaning the optimizer's)
    raw.load_state_dict(st["model"], strict=True)  # codebooks and EMA buffers included
    opt.load_state_dict(st["optimizer"])
    if (disc is None) != (st.get("disc") is None):
        raise UserError(f"{state_path} was written with gan_start={st['config']['gan_start']}, this run has "
                        f"gan_start={cfg.gan_start}: the discriminator state does not match")
    if disc is not None:
        disc.load_state_dict(st["disc"])
        d_opt.load_state_dict(st["disc_optimizer"])
    tu.restore_rng_states(st["rng"], ctx, state_path)
    return st["step"], st["consumed"]


def compiled(raw, disc, cfg, ctx):
    """-> (the tokenizer, the discriminator) as the step runs them: compile (on cuda by default) -> DDP."""
    use_compile = ctx.device.startswith("cuda") if cfg.compile is None else cfg.compile
    if use_compile and disc is not None:
        # the GAN's adaptive weight differentiates the losses through the compiled decoder with
        # retain_graph=True, which AOTAutograd's donated buffers (a memory saving) refuse at the first GAN step
        from torch._functorch import config as functorch_config
        functorch_config.donated_buffer = False
    model = torch.compile(raw) if use_compile else raw
    # codebooks are EMA buffers that rvq all-reduces itself; rebroadcasting them from rank 0 each forward (DDP's
    # default) would only cost time. False also skips DDP's initial buffer sync: broadcast_buffers_once did it
    model = tu.wrap_ddp(model, ctx, broadcast_buffers=False)
    return model, (tu.wrap_ddp(disc, ctx) if disc is not None else None)


def generator_loss(model, raw, teacher, loss_fn, x, disc):
    """One micro-batch through the tokenizer -> (loss, its terms, the tokenizer's output). `disc`: the GAN term's
    discriminator (None: GAN off), frozen here, so G's term leaves no gradient in D. Recon-only runs have no
    teacher pass and no semantic terms; runs without a semantic quantizer of their own (recon-only, tied) have no
    commit_sem term."""
    c = raw.config
    if c.semantic_branch:
        t_sem, t_pool = teacher_features(teacher, x, c.layer_sem)
    out = model(x)
    sem = ((out.zq_sem.float(), t_sem.float(), out.pooled.float(), t_pool.float()) if c.semantic_branch
           else (None, None, None, None))
    commit_sem = out.commit_sem if raw.quantizer_sem is not None else None
    if disc is not None:
        disc.requires_grad_(False)
    loss, terms = loss_fn(x, out.recon.float(), *sem, out.commit_pix, commit_sem, disc=disc,
                          last_layer=raw.decoder.conv_out.weight)  # where the adaptive weight compares gradients
    return loss, terms, out


def discriminator_step(cfg, step, disc, d_model, d_opt, loss_fn, pairs, autocast, sums):
    """D's own step on this step's (x, x_hat) pairs, with its own optimizer and schedule -> its lr. Its loss terms
    are added to `sums`, averaged over the micro-steps."""
    disc.requires_grad_(True)
    d_lr = tu.cosine_lr(step - cfg.gan_start, cfg.disc_warmup, cfg.max_steps - cfg.gan_start, cfg.disc_lr,
                        cfg.disc_min_lr)
    for g in d_opt.param_groups:
        g["lr"] = d_lr
    for micro, (x, x_hat) in enumerate(pairs):
        tu.sync_on_last(d_model, micro, len(pairs))
        with autocast:
            d_loss, d_terms = loss_fn.d_loss(d_model, x, x_hat)
        tu.check_finite(d_terms, step)
        (d_loss / len(pairs)).backward()
        for k, v in d_terms.items():
            sums[k] = sums.get(k, 0.0) + v / len(pairs)
    d_opt.step()
    d_opt.zero_grad(set_to_none=True)
    return d_lr


def checkpoint(cfg, ctx, raw, opt, disc, d_opt, step, consumed):
    """train_state.pt (weights included: what resume reads, written atomically in one file, with every rank's RNG
    states so resume restores each exactly) and the exported folder, the product (each of its files atomic too)."""
    rngs = tu.all_rng_states(ctx)  # a collective: every rank
    if ctx.is_master:
        with tu.checkpoint_commit(step):
            tu.save_train_state({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                 "consumed": consumed, "disc": disc.state_dict() if disc is not None else None,
                                 "disc_optimizer": d_opt.state_dict() if disc is not None else None,
                                 "rng": rngs, "config": config_dict(cfg)}, os.path.join(cfg.out_dir, "train_state.pt"))
        raw.save_pretrained(cfg.out_dir)  # atomic: config.json + model.safetensors


def log_step(logger, bar, step, lr, d_lr, seen, dt, t_start, sums, stats):
    row = dict(step=step, lr=lr, disc_lr=d_lr, img_per_s=seen / dt, elapsed_s=time.time() - t_start,
               **sums, **stats)  # loss terms: rank 0's share, averaged over micro-steps
    bar.set_postfix(loss=f"{sums['total']:.3f}", rec=f"{sums['rec_mse']:.4f}", img_s=f"{seen / dt:.0f}")
    logger.log(event="train", **row)


def save_images(x, recon, step, out_dir):
    """The last micro-batch's first 8 images over their reconstructions (samples/step_*.png)."""
    shown = psnr(x[:8], recon[:8].detach()).mean().item()
    data.grid_png([list(data.to_image(x[:8])), list(data.to_image(recon[:8]))],
                  os.path.join(out_dir, "samples", f"step_{step:06d}.png"),
                  labels=[f"step {step}: training images", f"their reconstructions (PSNR {shown:.2f} dB)"])


def report(raw, teacher, text_tok, cfg, ev, device, teacher_acc, step, logger):
    """The held-out evaluation (rank 0), printed and logged -> (its dict, the teacher's zero-shot, kept)."""
    res, teacher_acc = evaluate(raw, teacher, text_tok, cfg, ev, device, teacher_acc)
    res = dict(step=step, **res)
    zs, cs = res["zero_shot_top1"], res["codes_sem"]
    zs = "n/a" if zs is None else f"{zs:.4f}"
    cs = "n/a" if cs is None else f"{cs['usage_any_depth']:.3f}"
    print(f"step {step}: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}, zero-shot top-1 {zs} (teacher "
          f"{res['teacher_zero_shot_top1']:.4f}), codebook usage pix {res['codes_pix']['usage_any_depth']:.3f} "
          f"sem {cs}")
    logger.log(event="eval", **res)
    return res, teacher_acc


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
    train_ds, ev = make_data(cfg, raw.config.siglip.vision.image_size)
    text_tok = None if ev is None else siglip_tokenizer(folders=[cfg.init_from], shapes=cfg.data == "shapes")[0]
    loss_fn, lpips_msg = objective(cfg, device)
    opt, disc, d_opt = optimizers(cfg, raw, device)
    step, consumed = resume(st, state_path, cfg, ctx, raw, opt, disc, d_opt)
    batches = batch_stream(train_ds, cfg, ctx, consumed)
    if ctx.ddp:  # codebooks / EMA statistics were drawn after a per-rank seed: rank 0's for all
        tu.broadcast_buffers_once(raw)
    n_params, n_train = tu.param_counts(raw)
    model, d_model = compiled(raw, disc, cfg, ctx)
    autocast = tu.autocast_ctx(device, cfg.dtype)
    logger = tu.start_log(cfg, ctx, st, step)
    if master:
        print(f"DualToken {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, {cfg.trainable}), "
              f"device {device} x{ctx.world}, accum {accum}, from step {step}")
        print(lpips_msg)  # once: says whether the perceptual term is in the loss
        print("GAN off" if disc is None else f"GAN on from step {cfg.gan_start}")
        logger.log(event="start", step=step, params=n_params, trainable=n_train, world=ctx.world,
                   lpips=lpips_msg, config=config_dict(cfg))

    last_step, last_good = cfg.stop_step or cfg.max_steps, step if st is not None else None
    teacher_acc, result = None, None
    bar = tu.progress_bar(last_step, step, master, "tokenizer")
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
            tu.sync_on_last(model, micro, accum)
            with autocast:
                loss, terms, out = generator_loss(model, raw, teacher, loss_fn, x, disc if gan_on else None)
            tu.stop_if_nonfinite(terms, step, last_good, cfg.out_dir, logger, **terms)
            (loss / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / accum
            if gan_on:
                pairs.append((x, out.recon.detach()))
        tu.optimizer_step(opt, raw, cfg.grad_clip)
        d_lr = discriminator_step(cfg, step, disc, d_model, d_opt, loss_fn, pairs, autocast, sums) if gan_on else None
        step += 1
        seen += cfg.batch_size
        bar.update(1)
        if master and (tu.every(step, cfg.log_interval) or step == last_step):
            stats = {f"{q}_{s}": [round(v, 4) for v in out.stats[q][s].tolist()]
                     for q in out.stats for s in ("usage", "perplexity")}
            log_step(logger, bar, step, lr, d_lr, seen, time.time() - t0, t_start, sums, stats)
        PROGRESS["step"] = step  # after its log line: the step Ctrl-C names is logged
        if master and cfg.image_interval and (tu.every(step, cfg.image_interval) or step == last_step):
            save_images(x, out.recon, step, cfg.out_dir)
        if tu.every(step, cfg.ckpt_interval) or step == last_step:
            checkpoint(cfg, ctx, raw, opt, disc, d_opt, step, consumed)
            last_good = step
        if (tu.every(step, cfg.eval_interval) or step == last_step) and ev is not None and master:
            result, teacher_acc = report(raw, teacher, text_tok, cfg, ev, device, teacher_acc, step, logger)
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
    sampler = tu.sampler_after(len(ds), cfg, ctx, consumed)
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
